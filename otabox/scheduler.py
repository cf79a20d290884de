"""The job engine: reads the store, asks rollout.py, acts (push, offer, time out, retry, advance, abort).

All state lives in SQLite; timers are recomputed from stored timestamps on every tick, so a
restart (even after SIGKILL) simply continues. Each tick queries only what can change:
tasks due by the `due_at`/`retry_at` indexes and the few live jobs.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any, Protocol

from otabox import protocol, rollout
from otabox.rollout import IN_FLIGHT, Policy
from otabox.store import Store

log = logging.getLogger(__name__)


class Sender(Protocol):
    def deliver(self, product_key: str, device_key: str, suffix: str, payload: bytes, qos: int = 1) -> bool: ...


class UrlMaker(Protocol):
    def file_url(self, fw: dict[str, Any], device_key: str) -> str: ...


def policy_of(job: dict[str, Any]) -> Policy:
    """Rebuild the Policy from a stored job (spec keys as in the API)."""
    sched = job.get("schedule") or {}
    daily = sched.get("dailyWindow")
    retry = job.get("retry") or {}
    abort = job.get("abort") or {}
    return Policy(
        mode=job.get("mode", "push"),
        policy=job.get("policy", "snapshot"),
        max_concurrency=job.get("maxConcurrency"),
        rate_per_minute=job.get("ratePerMinute"),
        timeout_seconds=float(job.get("timeoutSeconds", 7200)),
        retry_count=int(retry.get("count", 0)),
        retry_interval=float(retry.get("intervalSeconds", 0)),
        abort_ratio=abort.get("failureRatio"),
        abort_min_finished=int(abort.get("minFinished", 1)),
        waves=tuple(rollout.Wave(w["percent"], w.get("successRatio")) for w in job.get("waves") or ()),
        schedule=rollout.Schedule(
            start=sched.get("startEpoch"),
            end=sched.get("endEpoch"),
            daily=(rollout.parse_hhmm(daily[0]), rollout.parse_hhmm(daily[1])) if daily else None,
            tz_offset_minutes=int(sched.get("timezoneOffsetMinutes", 0)),
        ),
    )


class Scheduler:
    """Drives jobs; also implements devices.JobHooks for what devices report."""

    def __init__(self, store: Store, sender: Sender, urls: UrlMaker, interval: float) -> None:
        self.store = store
        self.sender = sender
        self.urls = urls
        self.interval = interval
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._buckets: dict[str, rollout.TokenBucket] = {}
        self._budget_lock = asyncio.Lock()
        self._firmware: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(int(time.time() * 1000) % 10**9)
        self.ticks = 0
        self._live: list[dict[str, Any]] | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="otabox-scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def kick(self) -> None:
        """Run a tick soon (a device connected, a task finished)."""
        self._wake.set()

    def jobs_changed(self) -> None:
        """A job was created or changed outside the scheduler: forget the cached list, tick soon."""
        self._live = None
        self.kick()

    async def live(self) -> list[dict[str, Any]]:
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
                log.exception("scheduler tick failed")
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass
            self._wake.clear()

    # ------------------------------------------------------------ the tick

    async def tick(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.ticks += 1
        for task in await self.store.due_tasks(now):
            await self._finish(task, "timeout", desc="timed out: no result within timeoutSeconds", expect=IN_FLIGHT)
        for task in await self.store.due_retries(now):
            job = await self.store.get_job(task["jobId"])
            if job is None or job["status"] not in ("running", "paused"):
                continue
            await self.store.transition(
                job["id"],
                task["productKey"],
                task["deviceKey"],
                expect=("failed",),
                status="pending",
                attempt=task["attempt"] + 1,
                retry_at=None,
                due_at=None,
                progress=None,
                step=None,
                desc=f"retry (attempt {task['attempt'] + 1})",
                finished_at=None,
            )
        self._live = None
        for job in await self.live():
            await self._drive(job, now)
        self._live = None  # statuses may have changed while driving

    async def _drive(self, job: dict[str, Any], now: float) -> None:
        p = policy_of(job)
        jid = job["id"]
        if job["status"] == "scheduled":
            if p.schedule.start is not None and now < p.schedule.start:
                return
            await self.store.set_job(jid, status="running", started_at=now, status_reason="")
            job["status"] = "running"
        if rollout.window_ended(p.schedule, now):
            n = await self.store.bulk_transition(
                jid, ("pending",), None, status="canceled", desc="schedule window ended", finished_at=now
            )
            if n:
                log.info("job %s: %d pending tasks canceled at the end of its window", jid, n)
        counts = await self.store.job_counts(jid)
        if rollout.should_abort(counts, p.abort_ratio, p.abort_min_finished):
            await self._abort(job, counts, now)
            return
        ended = rollout.window_ended(p.schedule, now)
        finishing = (p.policy == "snapshot" or ended) and (job["status"] != "paused" or ended)
        if finishing and rollout.snapshot_done(counts, await self.store.retries_pending(jid)):
            await self.store.set_job(jid, status="completed", finished_at=now, status_reason="")
            log.info("job %s completed: %s", jid, counts)
            return
        if job["status"] != "running":
            return
        wave = await self._advance_waves(job, p)
        if wave is None:
            return
        if p.mode == "push" and rollout.window_open(p.schedule, now):
            await self._push(job, p, wave, counts, now)

    async def _advance_waves(self, job: dict[str, Any], p: Policy) -> int | None:
        """The highest open wave (0 without waves), or None when the job just paused."""
        if not p.waves:
            return 0
        current = max(1, job["currentWave"])
        while True:
            decision = rollout.wave_decision(
                await self.store.job_counts(job["id"], current), p.waves[current - 1], current
            )
            if decision.action == "pause":
                await self.store.set_job(job["id"], status="paused", status_reason=decision.reason)
                log.warning("job %s paused: %s", job["id"], decision.reason)
                return None
            if decision.action == "advance" and current < len(p.waves):
                current += 1
                await self.store.set_job(job["id"], current_wave=current)
                log.info("job %s: wave %d started", job["id"], current)
                continue
            if current != job["currentWave"]:
                await self.store.set_job(job["id"], current_wave=current)
            return current

    async def _abort(self, job: dict[str, Any], counts: dict[str, int], now: float) -> None:
        failures = counts.get("failed", 0) + counts.get("timeout", 0)
        finished = failures + counts.get("succeeded", 0)
        reason = f"aborted: {failures} of {finished} finished tasks failed"
        await self.store.set_job(job["id"], status="aborted", status_reason=reason, finished_at=now)
        await self.store.bulk_transition(
            job["id"], ("pending",), None, status="canceled", desc="job aborted", finished_at=now, retry_at=None
        )
        await self.store.bulk_transition(job["id"], ("failed",), None, retry_at=None)
        log.warning("job %s %s", job["id"], reason)

    def _bucket(self, job_id: str, p: Policy, now: float) -> rollout.TokenBucket:
        bucket = self._buckets.get(job_id)
        if bucket is None:
            bucket = self._buckets[job_id] = rollout.TokenBucket(p.rate_per_minute)
        bucket.refill(now)
        return bucket

    async def _push(self, job: dict[str, Any], p: Policy, wave: int, counts: dict[str, int], now: float) -> None:
        async with self._budget_lock:
            in_flight = sum(counts.get(s, 0) for s in IN_FLIGHT)
            bucket = self._bucket(job["id"], p, now)
            budget = rollout.push_budget(p.max_concurrency, in_flight, bucket.available())
            if budget <= 0:
                return
            tasks = await self.store.pushable_tasks(job["id"], wave, min(budget, 1000))
            fw = await self._fw(job["firmwareId"])
            # One transaction for the whole batch; only tasks still pending are published.
            published = await self.store.publish_tasks(
                job["id"], job["productKey"], [t["deviceKey"] for t in tasks], now, now + p.timeout_seconds
            )
            bucket.take(len(published))
            for dk in published:
                self._send_upgrade(job, fw, job["productKey"], dk)
        if len(tasks) == budget:
            self.kick()  # more may be pushable right away (rate and concurrency permitting)

    async def _fw(self, firmware_id: str) -> dict[str, Any]:
        fw = self._firmware.get(firmware_id)
        if fw is None:
            fw = await self.store.get_firmware(firmware_id)
            if fw is None:
                raise LookupError(f"firmware {firmware_id} is gone")
            self._firmware[firmware_id] = fw
        return fw

    def offer(self, job: dict[str, Any], fw: dict[str, Any], device_key: str) -> dict[str, Any]:
        """The params of an upgrade push / getversion offer (spec 3.2)."""
        params = {
            "version": fw["version"],
            "sign": fw["md5"] if fw["signMethod"] == "md5" else fw["sha256"],
            "signMethod": fw["signMethod"],
            "fileUrl": self.urls.file_url(fw, device_key),
            "fileSize": fw["size"],
            "firmwareName": fw["name"],
            "desc": fw["desc"],
            "jobId": job["id"],
        }
        if fw.get("signature"):
            params["signature"] = fw["signature"]
        return params

    def _send_upgrade(self, job: dict[str, Any], fw: dict[str, Any], pk: str, dk: str) -> bool:
        # String ids: the EnOS Python SDK breaks on numeric ids in pushes.
        payload = protocol.request(str(next(self._ids)), "ota.device.upgrade", self.offer(job, fw, dk))
        return self.sender.deliver(pk, dk, protocol.UPGRADE, payload, qos=1)

    # ------------------------------------------------------------ results

    async def _finish(
        self,
        task: dict[str, Any],
        status: str,
        *,
        desc: str | None,
        step: int | None = None,
        expect: tuple[str, ...] = IN_FLIGHT,
        retry_at: float | None = None,
    ) -> bool:
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
        if status == "succeeded":
            changes["progress"] = 100
        ok = await self.store.transition(task["jobId"], task["productKey"], task["deviceKey"], expect=expect, **changes)
        if ok:
            self.kick()
            if status == "succeeded":
                await self._maybe_verified(task["jobId"])
        return ok

    async def _fail(self, task: dict[str, Any], step: int | None, desc: str) -> None:
        job = await self.store.get_job(task["jobId"])
        p = policy_of(job) if job else Policy()
        when = rollout.retry_at(task["attempt"], p.retry_count, p.retry_interval, time.time())
        await self._finish(task, "failed", desc=desc, step=step, retry_at=when)

    async def _maybe_verified(self, job_id: str) -> None:
        job = await self.store.get_job(job_id)
        if job is None or job["type"] != "verify":
            return
        fw = await self.store.get_firmware(job["firmwareId"])
        if (
            fw
            and fw["status"] != "verified"
            and await self.store.succeeded_count(job_id) >= fw["minSuccessForVerified"]
        ):
            await self.store.set_firmware_status(fw["id"], "verified")
            self._firmware.pop(fw["id"], None)
            log.info("firmware %s verified by job %s", fw["id"], job_id)

    # ------------------------------------------------------------ devices.JobHooks

    async def on_connected(self, product_key: str, device_key: str) -> None:
        if not await self.live():
            return
        task = await self.store.active_task(product_key, device_key)
        if task is not None and task["status"] == "published":
            job = await self.store.get_job(task["jobId"])
            if job and job["status"] in ("running", "paused") and job.get("mode") == "push":
                # It may have missed the push while offline (or mid-way): the store says it is owed one.
                self._send_upgrade(job, await self._fw(job["firmwareId"]), product_key, device_key)
        self.kick()

    async def on_inform(self, product_key: str, device_key: str, version: str) -> None:
        if not await self.live():
            return
        task = await self.store.active_task(product_key, device_key)
        if task is None:
            await self.join_incremental(product_key, device_key)
            return
        if task["status"] == "pending":
            if version == task["toVersion"]:
                await self._finish(task, "succeeded", desc=f"already running {version}", expect=("pending",))
            return
        outcome = rollout.inform_outcome(version, task["fromVersion"], task["toVersion"])
        if outcome is None:
            return
        status, desc = outcome
        if status == "succeeded":
            await self._finish(task, "succeeded", desc=desc)
        else:
            await self._fail(task, None, desc)

    async def on_progress(self, product_key: str, device_key: str, step: int, desc: str | None) -> int:
        task = await self.store.active_task(product_key, device_key)
        if task is None or task["status"] not in IN_FLIGHT:
            return protocol.CODE_NOT_FOUND
        if step < 0:
            await self._fail(task, step, desc or rollout.step_label(step))
            return protocol.CODE_OK
        job = await self.store.get_job(task["jobId"])
        timeout = policy_of(job).timeout_seconds if job else 7200.0
        now = time.time()
        if task["status"] == "published":
            # The first progress report is the device's confirmation; the timeout restarts.
            await self.store.transition(
                task["jobId"],
                product_key,
                device_key,
                expect=("published",),
                status="upgrading",
                upgrading_at=now,
                due_at=now + timeout,
                progress=step,
                step=step,
                desc=desc,
            )
        else:
            best = max(step, task["progress"] or 0)
            await self.store.transition(
                task["jobId"],
                product_key,
                device_key,
                kind="progress",
                expect=("upgrading",),
                progress=best,
                step=best,
                desc=desc,
            )
        return protocol.CODE_OK

    async def offers(self, product_key: str, device_key: str) -> list[dict[str, Any]]:
        task = await self.store.active_task(product_key, device_key)
        if task is None:
            return []
        job = await self.store.get_job(task["jobId"])
        if job is None or job["status"] != "running" or job.get("mode") != "request":
            return []
        p = policy_of(job)
        now = time.time()
        if not rollout.window_open(p.schedule, now):
            return []
        fw = await self._fw(job["firmwareId"])
        if task["status"] == "pending":
            if p.waves and task["wave"] > max(1, job["currentWave"]):
                return []
            async with self._budget_lock:
                counts = await self.store.job_counts(job["id"])
                bucket = self._bucket(job["id"], p, now)
                in_flight = sum(counts.get(s, 0) for s in IN_FLIGHT)
                if rollout.push_budget(p.max_concurrency, in_flight, bucket.available()) <= 0:
                    return []
                if not await self.store.transition(
                    job["id"],
                    product_key,
                    device_key,
                    expect=("pending",),
                    status="published",
                    published_at=now,
                    due_at=now + p.timeout_seconds,
                    progress=None,
                    step=None,
                    desc="offered",
                ):
                    return []
                bucket.take(1)
        return [self.offer(job, fw, device_key)]

    async def on_upgrade_reply(self, product_key: str, device_key: str, code: int, message: str | None) -> None:
        if code == protocol.CODE_OK:
            return
        task = await self.store.active_task(product_key, device_key)
        if task is not None and task["status"] in IN_FLIGHT:
            await self._fail(task, None, message or f"device refused the upgrade (code {code})")

    async def incremental_jobs(self, product_key: str) -> list[dict[str, Any]]:
        return [
            j
            for j in await self.live()
            if j["productKey"] == product_key and j.get("policy") == "incremental" and j["type"] == "upgrade"
        ]

    async def join_incremental(self, product_key: str, device_key: str) -> None:
        """A device that newly matches an incremental job's scope joins it (last wave)."""
        jobs = await self.incremental_jobs(product_key)
        device = await self.store.get_device(product_key, device_key) if jobs else None
        if device is None:
            return
        for job in jobs:
            if rollout.in_scope(device, job.get("scope") or {}, job["toVersion"]):
                wave = len(job.get("waves") or ())
                if await self.store.add_job_task(job["id"], product_key, device_key, device["version"], wave):
                    log.info("device %s/%s joined incremental job %s", product_key, device_key, job["id"])
                    self.kick()
                return
