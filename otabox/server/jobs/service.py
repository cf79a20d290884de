"""Job operations shared by the API, the console and (through the API) the CLI: create, pause,
resume, cancel, cancel or retry tasks. Business rules live here, not in HTTP handlers.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from otabox import jobspec, rollout
from otabox.errors import BadRequest, Conflict, NotFound
from otabox.models import (
    ACTIVE,
    JOB_DONE,
    LIVE_JOBS,
    DeltaMode,
    FirmwareStatus,
    Job,
    JobEvent,
    JobPolicy,
    JobStatus,
    JobType,
    PauseCause,
    TaskState,
)
from otabox.server.jobs.engine import JobEngine
from otabox.server.store import JobLogEntry, Store

# Device keys named in an error message, at most.
LISTED = 10


class JobService:
    def __init__(self, store: Store, engine: JobEngine) -> None:
        self.store = store
        self.engine = engine

    async def get(self, job_id: str) -> Job:
        """Raises NotFound."""
        job = await self.store.get_job(job_id)
        if job is None:
            raise NotFound(f"job {job_id!r} not found")
        return job

    async def create(self, body: Mapping[str, Any]) -> tuple[Job, list[str]]:
        """Validate a POST /jobs body and create the job; returns it with warnings for the operator.

        Raises BadRequest (also for a scope that matches no device, unknown device keys and, without
        allowDowngrade, devices on a higher version), NotFound or Conflict.
        """
        spec = jobspec.validate(body)
        jobspec.check_required(body)
        fw_id = str(body["firmwareId"])
        fw = await self.store.get_firmware(fw_id)
        if fw is None:
            raise NotFound(f"firmware {fw_id!r} not found")
        jtype = JobType(body.get("type", JobType.UPGRADE))
        if jtype == JobType.UPGRADE and fw.enable_verification and fw.status != FirmwareStatus.VERIFIED:
            raise Conflict("firmware must be verified first (enableVerification is on)", code="unverified")
        name = body.get("name") or f"{jtype} {fw.name} {fw.version}"
        if spec.scope.device_keys:
            known = await self.store.existing_device_keys(fw.product_key, spec.scope.device_keys)
            unknown = [k for k in spec.scope.device_keys if k not in known]
            if unknown:
                raise BadRequest(
                    f"scope.deviceKeys: no such device in product {fw.product_key!r}: {_listed(unknown)}",
                    code="unknown-devices",
                )
        devices, busy = await self.store.scope_devices(fw.product_key, spec.scope, fw.version)
        if jtype == JobType.VERIFY:
            found = {d.device_key for d in devices}
            missing = [k for k in spec.scope.device_keys if k not in found]
            if missing:
                raise Conflict(
                    f"devices not found, busy or already on {fw.version}: {', '.join(missing)}",
                    code="devices-unavailable",
                )
        lower = [d for d in devices if rollout.is_downgrade(d.version, fw.version)]
        if lower and not spec.allow_downgrade:
            raise BadRequest(
                f"{len(lower)} device(s) in scope report a higher version than {fw.version}"
                f" ({_listed([f'{d.device_key} on {d.version}' for d in lower])}): narrow the scope"
                ' or set "allowDowngrade": true',
                code="downgrade",
            )
        warnings: list[str] = []
        if not devices:
            why = f"{busy} matching device(s) are busy in other jobs" if busy else "no device matches the scope"
            if spec.policy == JobPolicy.SNAPSHOT:
                raise BadRequest(f"nothing to do: {why} (devices already on {fw.version} are left out)", code="empty")
            warnings.append(f"the job starts empty: {why}; devices join as they come to match")
        waves = rollout.assign_waves(len(devices), spec.waves)
        now = time.time()
        start = spec.schedule.start
        scheduled = start is not None and start > now
        job = Job(
            id="job-" + uuid.uuid4().hex[:12],
            name=name,
            type=jtype,
            firmware_id=fw.id,
            product_key=fw.product_key,
            to_version=fw.version,
            status=JobStatus.SCHEDULED if scheduled else JobStatus.RUNNING,
            status_reason="",
            pause_cause=PauseCause.NONE,
            current_wave=1 if spec.waves else 0,
            skipped=busy,
            created_at=now,
            started_at=None if scheduled else now,
            finished_at=None,
            spec=spec,
        )
        await self.store.create_job(job, [(d.device_key, d.version, w) for d, w in zip(devices, waves, strict=True)])
        if jtype == JobType.UPGRADE and spec.delta == DeltaMode.AUTO:
            await self.engine.deltas.prepare(fw, {d.version for d in devices if d.version})
        self.engine.jobs_changed()
        return job, warnings

    async def pause(self, job: Job, actor: str) -> Job:
        if job.status not in (JobStatus.RUNNING, JobStatus.SCHEDULED):
            raise Conflict(f"cannot pause a {job.status} job", code="bad-state")
        await self.store.set_job(
            job.id,
            status=JobStatus.PAUSED,
            reason=f"paused by {actor}",
            pause_cause=PauseCause.OPERATOR,
            event=JobLogEntry(JobEvent.PAUSED, actor, f"paused by {actor}", job.current_wave or None),
        )
        return await self._changed(job)

    async def resume(self, job: Job, actor: str) -> Job:
        decision = rollout.resume(job.status, job.pause_cause, job.current_wave, len(job.spec.waves))
        if decision is None:
            raise Conflict(f"cannot resume a {job.status} job", code="bad-state")
        opened = decision.wave != job.current_wave
        desc = f"resumed by {actor}" + (f", opening wave {decision.wave} past its gate" if opened else "")
        await self.store.set_job(
            job.id,
            status=JobStatus.RUNNING,
            reason="",
            pause_cause=PauseCause.NONE,
            current_wave=decision.wave,
            event=JobLogEntry(JobEvent.RESUMED, actor, desc, decision.wave or None),
        )
        return await self._changed(job)

    async def cancel(self, job: Job, actor: str) -> Job:
        if job.status in JOB_DONE:
            raise Conflict(f"cannot cancel a {job.status} job", code="bad-state")
        now = time.time()
        entry = JobLogEntry(JobEvent.CANCELED, actor, f"canceled by {actor}")
        await self.store.end_job(job.id, JobStatus.CANCELED, entry, ACTIVE, now)
        return await self._changed(job)

    async def change(self, job: Job, action: str, actor: str) -> Job:
        """pause, resume or cancel by name (the API's `POST /jobs/{id}/{action}`). Raises NotFound, Conflict."""
        if action == "pause":
            return await self.pause(job, actor)
        if action == "resume":
            return await self.resume(job, actor)
        if action == "cancel":
            return await self.cancel(job, actor)
        raise NotFound(f"unknown action {action!r}")

    async def cancel_tasks(self, job: Job, device_keys: Sequence[str], actor: str) -> int:
        n = await self.store.bulk_transition(
            job.id,
            ACTIVE,
            device_keys,
            status=TaskState.CANCELED,
            desc=f"canceled by {actor}",
            finished_at=time.time(),
            due_at=None,
        )
        self.engine.jobs_changed()
        return n

    async def retry_tasks(self, job: Job, device_keys: Sequence[str], actor: str) -> int:
        """Operator retry of finished, unsuccessful tasks; returns how many restarted. Raises Conflict."""
        if job.status in (JobStatus.CANCELED, JobStatus.ABORTED):
            raise Conflict(f"cannot retry tasks of a {job.status} job", code="bad-state")
        n = 0
        for dk in device_keys:
            n += await self.store.retry_task(job.id, job.product_key, dk)
        if n and job.status == JobStatus.COMPLETED:
            await self.store.set_job(
                job.id,
                status=JobStatus.RUNNING,
                reason="",
                reopen=True,
                event=JobLogEntry(JobEvent.RESUMED, actor, f"reopened by {actor}: {n} task(s) retried"),
            )
        self.engine.jobs_changed()
        return n

    async def waiting(self, job: Job, counts: dict[TaskState, int], now: float) -> rollout.WaitState | None:
        """Why no task of the job can move now (None while something can)."""
        if job.status not in LIVE_JOBS:
            return None
        wave = max(1, job.current_wave) if job.spec.waves else 0
        pending = counts.get(TaskState.PENDING, 0)
        # Without waves every pending task is in the open "wave": the counts say how many.
        open_pending = await self.store.pending_in_waves(job.id, wave) if job.spec.waves and pending else pending
        online = bool(open_pending) and await self.store.pending_online(job.id, wave)
        return rollout.waiting(
            job.status,
            job.pause_cause,
            job.spec,
            counts,
            open_wave_pending=open_pending,
            any_online_pending=online,
            tokens=self.engine.tokens(job, now),
            now=now,
        )

    async def _changed(self, job: Job) -> Job:
        self.engine.jobs_changed()
        return await self.get(job.id)


def _listed(items: Sequence[str]) -> str:
    more = f" and {len(items) - LISTED} more" if len(items) > LISTED else ""
    return ", ".join(items[:LISTED]) + more
