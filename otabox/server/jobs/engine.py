"""The job engine: reads the store, asks `rollout`, acts (push, time out, retry, open waves, abort, complete).

All state lives in the store; timers are recomputed from stored timestamps on every tick, so a
restart (even after SIGKILL) simply continues. Each tick queries only what can change: tasks
due by the `due_at`/`retry_at` indexes and the few live jobs. What devices report is handled
in `reports.py`, which uses the primitives here (finish, fail, offer, send).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any, Protocol

from otabox import protocol, rollout
from otabox.models import (
    IN_FLIGHT,
    SYSTEM,
    Delta,
    DeltaMode,
    Firmware,
    FirmwareStatus,
    Job,
    JobEvent,
    JobMode,
    JobPolicy,
    JobStatus,
    JobType,
    PauseCause,
    Task,
    TaskState,
)
from otabox.server.deltas import DeltaService
from otabox.server.store import JobLogEntry, Store

log = logging.getLogger(__name__)

# Most tasks published in one tick of one job: one transaction, and a bound on the tick's length.
PUSH_BATCH = 1000


class Cluster(Protocol):
    """The nodes sharing the store (otabox.server.cluster): whether this one decides, delivery through any."""

    leader: bool

    def deliver(self, product_key: str, device_key: str, suffix: str, payload: bytes, qos: int = 1) -> bool: ...

    def kick_leader(self) -> None: ...

    def jobs_changed(self) -> None: ...

    async def confirm(self) -> bool: ...

    async def claim(self, job_id: str, device_key: str) -> bool: ...


class UrlMaker(Protocol):
    def file_url(self, fw: Firmware, device_key: str) -> str: ...

    def delta_url(self, fw: Firmware, delta: Delta, device_key: str) -> str: ...


class JobEngine:
    """Drives jobs on a timer and when kicked (a device connected, a task finished, a job changed).

    With several nodes, only the leader's engine decides; the others' ticks only refresh what
    their devices' reports read (the live jobs, the rollback watch), and their kicks and claims
    go to the leader.
    """

    def __init__(self, store: Store, cluster: Cluster, urls: UrlMaker, interval: float, deltas: DeltaService) -> None:
        self.store = store
        self.cluster = cluster
        self.urls = urls
        self.deltas = deltas
        self.interval = interval
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._buckets: dict[str, rollout.TokenBucket] = {}
        self._budget_lock = asyncio.Lock()
        self._firmware: dict[str, Firmware] = {}
        self._ids = itertools.count(int(time.time() * 1000) % 10**9)
        self.ticks = 0
        self._live: list[Job] | None = None
        # Until when a succeeded task may still be watched for a rollback (an upper bound):
        # version reports after that cost no query (the common case once a rollout has settled).
        self.watch_until = 0.0

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.watch_until = await self.store.rollback_watch_until(time.time())
        self._task = asyncio.create_task(self._run(), name="otabox-job-engine")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # gather, not `except CancelledError`: that would also swallow a cancel of our caller.
            await asyncio.gather(task, return_exceptions=True)

    def kick(self) -> None:
        """Run a tick soon (the leader's)."""
        self._wake.set()
        if not self.cluster.leader:
            self.cluster.kick_leader()

    def jobs_changed(self) -> None:
        """A job was created or changed outside the engine: forget the cached list, tick soon, tell the other nodes."""
        self.jobs_changed_here()
        self.cluster.jobs_changed()

    def jobs_changed_here(self) -> None:
        """`jobs_changed` on this node only (another node said so)."""
        self._live = None
        self._wake.set()

    async def live(self) -> list[Job]:
        """Live jobs (scheduled, running, paused), cached between ticks for the device hot paths.

        With none, no task can be active: connect and inform then cost no query at all.
        """
        if self._live is None:
            self._live = await self.store.live_jobs()
        return self._live

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job engine tick failed")
            # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancel that
            # arrives as the wait ends (a kick at stop), and stop() then waits for ever.
            try:
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

    # ------------------------------------------------------------ the tick

    async def tick(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.ticks += 1
        if not self.cluster.leader or not await self.cluster.confirm():
            self._live = None
            self.watch_until = max(self.watch_until, await self.store.rollback_watch_until(now))
            return
        for task in await self.store.due_tasks(now):
            await self.finish(task, TaskState.TIMEOUT, desc="timed out: no result within timeoutSeconds")
        for task in await self.store.due_retries(now):
            job = await self.store.get_job(task.job_id)
            if job is None or job.status not in (JobStatus.RUNNING, JobStatus.PAUSED):
                continue
            await self.store.transition(
                job.id,
                task.product_key,
                task.device_key,
                expect=(TaskState.FAILED,),
                status=TaskState.PENDING,
                attempt=task.attempt + 1,
                retry_at=None,
                due_at=None,
                progress=None,
                step=None,
                desc=f"retry (attempt {task.attempt + 1})",
                finished_at=None,
            )
        self._live = None
        for job in await self.live():
            await self._drive(job, now)
        self._live = None  # statuses may have changed while driving

    async def _drive(self, job: Job, now: float) -> None:
        spec = job.spec
        status = job.status
        if status == JobStatus.SCHEDULED:
            if spec.schedule.start is not None and now < spec.schedule.start:
                return
            await self.store.set_job(job.id, status=JobStatus.RUNNING, started_at=now, reason="")
            status = JobStatus.RUNNING
        ended = rollout.window_ended(spec.schedule, now)
        if ended:
            n = await self.store.bulk_transition(
                job.id,
                (TaskState.PENDING,),
                None,
                status=TaskState.CANCELED,
                desc="schedule window ended",
                finished_at=now,
            )
            if n:
                log.info("job %s: %d pending tasks canceled at the end of its window", job.id, n)
        counts = await self.store.job_counts(job.id)
        if rollout.should_abort(counts, spec.abort_ratio, spec.abort_min_finished):
            await self._abort(job, counts, now)
            return
        finishing = (spec.policy == JobPolicy.SNAPSHOT or ended) and (status != JobStatus.PAUSED or ended)
        if finishing and rollout.snapshot_done(counts, await self.store.retries_pending(job.id)):
            summary = ", ".join(f"{s} {n}" for s, n in counts.items() if n)
            await self.store.set_job(
                job.id,
                status=JobStatus.COMPLETED,
                finished_at=now,
                reason="",
                event=JobLogEntry(JobEvent.COMPLETED, SYSTEM, summary),
            )
            log.info("job %s completed: %s", job.id, counts)
            return
        if status != JobStatus.RUNNING:
            return
        wave = await self._advance_waves(job)
        if wave is None:
            return
        if spec.mode == JobMode.PUSH and rollout.window_open(spec.schedule, now):
            await self._push(job, wave, counts, now)

    async def _advance_waves(self, job: Job) -> int | None:
        """The highest open wave (0 without waves), or None when the job just paused."""
        waves = job.spec.waves
        if not waves:
            return 0
        current = max(1, job.current_wave)
        while True:
            decision = rollout.wave_decision(await self.store.job_counts(job.id, current), waves[current - 1], current)
            if decision.action == "pause":
                await self.store.set_job(
                    job.id,
                    status=JobStatus.PAUSED,
                    reason=decision.reason,
                    pause_cause=PauseCause.WAVE_GATE,
                    event=JobLogEntry(JobEvent.PAUSED, SYSTEM, decision.reason, current),
                )
                log.warning("job %s paused: %s", job.id, decision.reason)
                return None
            if decision.action == "advance" and current < len(waves):
                current += 1
                await self.store.set_job(
                    job.id,
                    current_wave=current,
                    event=JobLogEntry(JobEvent.WAVE_OPENED, SYSTEM, f"wave {current - 1} passed", current),
                )
                log.info("job %s: wave %d started", job.id, current)
                continue
            if current != job.current_wave:
                await self.store.set_job(job.id, current_wave=current)
            return current

    async def _abort(self, job: Job, counts: dict[TaskState, int], now: float) -> None:
        failed, finished = rollout.failures(counts)
        reason = f"aborted: {failed} of {finished} finished tasks failed"
        entry = JobLogEntry(JobEvent.ABORTED, SYSTEM, reason)
        await self.store.end_job(job.id, JobStatus.ABORTED, entry, (TaskState.PENDING,), now)
        log.warning("job %s %s", job.id, reason)

    def _bucket(self, job: Job, now: float) -> rollout.TokenBucket:
        bucket = self._buckets.get(job.id)
        if bucket is None:
            bucket = self._buckets[job.id] = rollout.TokenBucket(job.spec.rate_per_minute)
        bucket.refill(now)
        return bucket

    async def _push(self, job: Job, wave: int, counts: dict[TaskState, int], now: float) -> None:
        async with self._budget_lock:
            in_flight = sum(counts.get(s, 0) for s in IN_FLIGHT)
            bucket = self._bucket(job, now)
            budget = rollout.push_budget(job.spec.max_concurrency, in_flight, bucket.available())
            if budget <= 0:
                return
            batch = min(budget, PUSH_BATCH)
            tasks = await self.store.pushable_tasks(job.id, wave, batch)
            fw = await self.firmware(job.firmware_id)
            # One transaction for the whole batch; only tasks still pending are published.
            published = await self.store.publish_tasks(
                job.id, job.product_key, [t.device_key for t in tasks], now, now + job.spec.timeout_seconds
            )
            bucket.take(len(published))
            versions = {t.device_key: t.from_version for t in tasks}
            for dk in published:
                self.send_upgrade(job, fw, dk, await self.delta_for(job, fw, versions.get(dk)))
        if len(tasks) == batch:
            # More may be pushable right away (rate and concurrency permitting). Not only when the
            # budget is used up: a job without limits pushed one batch per tick (50,000 devices:
            # 69 s, the machine 70 % idle).
            self.kick()

    async def resend_published(self) -> int:
        """A new leader sends again the pushes of tasks still published (not yet confirmed): the
        old leader may have died between publishing them and their delivery. A device that got
        the first takes the second for the same job as the same offer. How many were sent."""
        sent = 0
        for job in await self.live():
            if job.status != JobStatus.RUNNING or job.spec.mode != JobMode.PUSH:
                continue
            fw = await self.firmware(job.firmware_id)
            tasks, _ = await self.store.find_tasks(job.id, TaskState.PUBLISHED, "", PUSH_BATCH * 100, 0)
            for task in tasks:
                self.send_upgrade(job, fw, task.device_key, await self.delta_for(job, fw, task.from_version))
                sent += 1
        return sent

    def tokens(self, job: Job, now: float) -> int:
        """New pushes the job's rate limit allows now (for `waiting`)."""
        return self._bucket(job, now).available()

    async def claim_offer(self, job: Job, device_key: str, now: float) -> bool:
        """Request mode: move a pending task to published if concurrency and rate allow; True when moved.

        The budget is the leader's: another node asks it.
        """
        if not self.cluster.leader:
            return await self.cluster.claim(job.id, device_key)
        async with self._budget_lock:
            counts = await self.store.job_counts(job.id)
            bucket = self._bucket(job, now)
            in_flight = sum(counts.get(s, 0) for s in IN_FLIGHT)
            if rollout.push_budget(job.spec.max_concurrency, in_flight, bucket.available()) <= 0:
                return False
            if not await self.store.transition(
                job.id,
                job.product_key,
                device_key,
                expect=(TaskState.PENDING,),
                status=TaskState.PUBLISHED,
                published_at=now,
                due_at=now + job.spec.timeout_seconds,
                progress=None,
                step=None,
                desc="offered",
            ):
                return False
            bucket.take(1)
            return True

    async def firmware(self, firmware_id: str) -> Firmware:
        fw = self._firmware.get(firmware_id)
        if fw is None:
            fw = await self.store.get_firmware(firmware_id)
            if fw is None:
                raise LookupError(f"firmware {firmware_id} is gone")
            self._firmware[firmware_id] = fw
        return fw

    async def delta_for(self, job: Job, fw: Firmware, from_version: str | None) -> Delta | None:
        """The delta to offer a device on `from_version` beside the full image, if any."""
        if job.spec.delta == DeltaMode.OFF:
            return None
        return await self.deltas.for_device(fw, from_version)

    def offer(self, job: Job, fw: Firmware, device_key: str, delta: Delta | None = None) -> dict[str, Any]:
        """The params of an upgrade push / getversion offer (device protocol 3.2).

        The full image's params are always there (a device that knows nothing of deltas reads
        only those); `delta` sits beside them.
        """
        params: dict[str, Any] = {
            "version": fw.version,
            "sign": fw.sign,
            "signMethod": fw.sign_method,
            "fileUrl": self.urls.file_url(fw, device_key),
            "fileSize": fw.size,
            "firmwareName": fw.name,
            "desc": fw.desc,
            "jobId": job.id,
        }
        if fw.signature:
            params["signature"] = fw.signature
        if delta is not None:
            params["delta"] = {
                "from": delta.from_version,
                "algorithm": delta.algorithm,
                "fileUrl": self.urls.delta_url(fw, delta, device_key),
                "fileSize": delta.size,
                "sign": delta.sign(fw.sign_method),
                "signMethod": fw.sign_method,
            }
        return params

    def send_upgrade(self, job: Job, fw: Firmware, dk: str, delta: Delta | None = None) -> bool:
        # String ids: the EnOS Python SDK breaks on numeric ids in pushes.
        payload = protocol.request(str(next(self._ids)), "ota.device.upgrade", self.offer(job, fw, dk, delta))
        return self.cluster.deliver(job.product_key, dk, protocol.UPGRADE, payload, qos=1)

    # ------------------------------------------------------------ results

    async def finish(
        self,
        task: Task,
        status: TaskState,
        *,
        desc: str | None,
        step: int | None = None,
        expect: tuple[TaskState, ...] = IN_FLIGHT,
        retry_at: float | None = None,
    ) -> bool:
        """End a task (timeout, result); False when it was no longer in `expect`."""
        now = time.time()
        changes: dict[str, Any] = {
            "status": status,
            "desc": desc,
            "finished_at": now,
            "due_at": None,
            "retry_at": retry_at,
        }
        if step is not None:
            changes["step"] = step
        if status == TaskState.SUCCEEDED:
            changes["progress"] = 100
        ok = await self.store.transition(task.job_id, task.product_key, task.device_key, expect=expect, **changes)
        if ok:
            self.kick()
            if status == TaskState.SUCCEEDED:
                job = await self.store.get_job(task.job_id)
                if job is not None:
                    self.watch_until = max(self.watch_until, now + job.spec.rollback_watch_seconds)
                    await self._maybe_verified(job)
        return ok

    async def fail(self, task: Task, step: int | None, desc: str) -> None:
        """A device-reported failure: failed, with a retry due when the job's policy grants one."""
        job = await self.store.get_job(task.job_id)
        when = None
        if job is not None:
            when = rollout.retry_at(task.attempt, job.spec.retry_count, job.spec.retry_interval, time.time())
        await self.finish(task, TaskState.FAILED, desc=desc, step=step, retry_at=when)

    async def _maybe_verified(self, job: Job) -> None:
        if job.type != JobType.VERIFY:
            return
        fw = await self.store.get_firmware(job.firmware_id)
        if fw is None or fw.status == FirmwareStatus.VERIFIED:
            return
        succeeded = await self.store.succeeded_count(job.id)
        if succeeded < fw.min_success_for_verified:
            return
        desc = f"{fw.name} {fw.version} verified: {succeeded} device(s) succeeded, {fw.min_success_for_verified} needed"
        if await self.store.verify_firmware(fw.id, job.id, desc):
            self._firmware.pop(fw.id, None)
            log.info("firmware %s verified by job %s", fw.id, job.id)
