"""What devices report, as the job engine hears it: connects, versions, progress, requests, replies.

`DeviceReports` implements `otabox.server.mqtt.device_hooks.JobHooks`; it changes tasks through
the engine's primitives so a device report and a tick decide by the same rules.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from otabox import protocol, rollout
from otabox.models import IN_FLIGHT, Job, JobMode, JobPolicy, JobStatus, JobType, TaskState
from otabox.server.jobs.engine import JobEngine
from otabox.server.store import Store

log = logging.getLogger(__name__)


class DeviceReports:
    def __init__(self, engine: JobEngine, store: Store) -> None:
        self.engine = engine
        self.store = store

    async def on_connected(self, product_key: str, device_key: str) -> None:
        if not await self.engine.live():
            return
        task = await self.store.active_task(product_key, device_key)
        if task is not None and task.status == TaskState.PUBLISHED:
            job = await self.store.get_job(task.job_id)
            if job and job.status in (JobStatus.RUNNING, JobStatus.PAUSED) and job.spec.mode == JobMode.PUSH:
                # It may have missed the push while offline (or mid-way): the store says it is owed one.
                self.engine.send_upgrade(job, await self.engine.firmware(job.firmware_id), device_key)
        self.engine.kick()

    async def on_inform(self, product_key: str, device_key: str, version: str) -> None:
        live = await self.engine.live()
        task = await self.store.active_task(product_key, device_key) if live else None
        if task is None:
            if time.time() <= self.engine.watch_until:
                await self._check_rollback(product_key, device_key, version)
            if live:
                await self.join_incremental(product_key, device_key)
            return
        if task.from_version is None and version != task.to_version:
            # Its source version (`rollout.inform_outcome`); a pending task's push picks its delta by it.
            await self.store.learn_source_version(product_key, device_key, version)
        if task.status == TaskState.PENDING:
            if version == task.to_version:
                await self.engine.finish(
                    task, TaskState.SUCCEEDED, desc=f"already running {version}", expect=(TaskState.PENDING,)
                )
            return
        outcome = rollout.inform_outcome(version, task.from_version, task.to_version)
        if outcome is None:
            return
        status, desc = outcome
        if status == TaskState.SUCCEEDED:
            await self.engine.finish(task, TaskState.SUCCEEDED, desc=desc)
        else:
            await self.engine.fail(task, None, desc)

    async def _check_rollback(self, product_key: str, device_key: str, version: str) -> None:
        """A device without an active task reports a version: did it go back to the image it left?"""
        task = await self.store.last_succeeded(product_key, device_key)
        if task is None:
            return
        job = await self.store.get_job(task.job_id)
        if job is None or not rollout.rolled_back(
            version, task.from_version, task.to_version, task.finished_at, job.spec.rollback_watch_seconds, time.time()
        ):
            return
        if await self.store.transition(
            task.job_id,
            product_key,
            device_key,
            expect=(TaskState.SUCCEEDED,),
            status=TaskState.ROLLED_BACK,
            desc=f"rolled back to {version}",
        ):
            log.warning("device %s/%s rolled back to %s after job %s", product_key, device_key, version, job.id)
            self.engine.jobs_changed()

    async def on_progress(self, product_key: str, device_key: str, step: int, desc: str | None) -> int:
        if step >= 0:
            # The common case in one op: no read before the write (the store decides on the
            # task row inside the write's transaction; see `report_progress`).
            stored = await self.store.report_progress(product_key, device_key, step, desc)
            return protocol.CODE_OK if stored else protocol.CODE_NOT_FOUND
        task = await self.store.active_task(product_key, device_key)
        if task is None or task.status not in IN_FLIGHT:
            return protocol.CODE_NOT_FOUND
        await self.engine.fail(task, step, desc or rollout.step_label(step))
        return protocol.CODE_OK

    async def offers(self, product_key: str, device_key: str) -> list[dict[str, Any]]:
        task = await self.store.active_task(product_key, device_key)
        if task is None:
            return []
        job = await self.store.get_job(task.job_id)
        if job is None or job.status != JobStatus.RUNNING or job.spec.mode != JobMode.REQUEST:
            return []
        now = time.time()
        if not rollout.window_open(job.spec.schedule, now):
            return []
        fw = await self.engine.firmware(job.firmware_id)
        if task.status == TaskState.PENDING:
            if job.spec.waves and task.wave > max(1, job.current_wave):
                return []
            if not await self.engine.claim_offer(job, device_key, now):
                return []
        return [self.engine.offer(job, fw, device_key, await self.engine.delta_for(job, fw, task.from_version))]

    async def on_upgrade_reply(self, product_key: str, device_key: str, code: int, message: str | None) -> None:
        if code == protocol.CODE_OK:
            return
        task = await self.store.active_task(product_key, device_key)
        if task is not None and task.status in IN_FLIGHT:
            await self.engine.fail(task, None, message or f"device refused the upgrade (code {code})")

    # ------------------------------------------------------------ incremental jobs

    async def incremental_jobs(self, product_key: str) -> list[Job]:
        return [
            j
            for j in await self.engine.live()
            if j.product_key == product_key and j.spec.policy == JobPolicy.INCREMENTAL and j.type == JobType.UPGRADE
        ]

    async def devices_created(self, product_key: str, device_keys: Sequence[str]) -> None:
        """Devices were registered: incremental jobs whose scope they match pick them up."""
        if not await self.incremental_jobs(product_key):
            return  # the common case, and one query for a whole import
        for dk in device_keys:
            await self.join_incremental(product_key, dk)

    async def join_incremental(self, product_key: str, device_key: str) -> None:
        """A device that newly matches an incremental job's scope joins it, in the wave it fills."""
        jobs = await self.incremental_jobs(product_key)
        device = await self.store.get_device(product_key, device_key) if jobs else None
        if device is None:
            return
        for job in jobs:
            if rollout.in_scope(device, job.spec.scope, job.to_version):
                if rollout.is_downgrade(device.version, job.to_version) and not job.spec.allow_downgrade:
                    log.info(
                        "device %s/%s on %s not added to job %s: a downgrade",
                        product_key,
                        device_key,
                        device.version,
                        job.id,
                    )
                    return
                wave = 0
                if job.spec.waves:
                    per_wave = await self.store.wave_counts(job.id)
                    sizes = [sum(per_wave.get(i, {}).values()) for i in range(1, len(job.spec.waves) + 1)]
                    wave = rollout.joiner_wave(sizes, job.spec.waves)
                if await self.store.add_job_task(job, device_key, device.version, wave):
                    log.info("device %s/%s joined incremental job %s", product_key, device_key, job.id)
                    self.engine.kick()
                return
