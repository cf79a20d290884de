"""SQL of jobs and of the devices a job's scope selects."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from otabox import jobspec
from otabox.models import ACTIVE, LIVE_JOBS, Device, Job, JobEvent, JobStatus, PauseCause, Scope, TaskState, sql_list
from otabox.server.store import rows
from otabox.server.store.base import IntegrityError, Op, StoreBase, Tx
from otabox.server.store.tasks import bulk_op, insert_job_event, insert_tasks

_BUSY = (
    "EXISTS (SELECT 1 FROM tasks t WHERE t.product_key = d.product_key AND t.device_key = d.device_key"
    f" AND t.status IN {sql_list(ACTIVE)})"
)


def _job_op(job_id: str, fields: dict[str, Any], reopen: bool, event: JobLogEntry | None) -> Op[None]:
    changes = {k: v for k, v in fields.items() if v is not None}
    sets = [f"{k} = ?" for k in changes] + (["finished_at = NULL"] if reopen else [])
    update = f"UPDATE jobs SET {', '.join(sets)}, updated_at = ? WHERE id = ?"

    async def op(tx: Tx) -> None:
        await tx.execute(update, (*changes.values(), time.time(), job_id))
        if event is not None:
            await insert_job_event(tx, job_id, event.status, event.actor, event.desc, event.wave)

    return op


@dataclass(frozen=True, slots=True)
class JobLogEntry:
    """A job-level row of the upgrade log: what happened, who did it, why."""

    status: JobEvent
    actor: str
    desc: str = ""
    wave: int | None = None


class JobSQL(StoreBase):
    async def create_job(self, job: Job, tasks: Sequence[tuple[str, str | None, int]]) -> None:
        """Insert a job and its pending tasks (deviceKey, fromVersion, wave) with their events."""
        now = time.time()

        async def op(tx: Tx) -> None:
            await tx.execute(
                "INSERT INTO jobs (id, name, type, firmware_id, product_key, to_version, status, status_reason,"
                " pause_cause, spec, current_wave, skipped, created_at, started_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.id,
                    job.name,
                    job.type,
                    job.firmware_id,
                    job.product_key,
                    job.to_version,
                    job.status,
                    job.status_reason,
                    job.pause_cause,
                    json.dumps(jobspec.to_json(job.spec)),
                    job.current_wave,
                    job.skipped,
                    job.created_at,
                    job.started_at,
                    now,
                ),
            )
            await insert_tasks(tx, job.id, job.product_key, job.to_version, tasks)

        await self.batched(op)
        await self.grew(len(tasks), "tasks", "events")

    async def add_job_task(self, job: Job, dk: str, from_version: str | None, wave: int) -> bool:
        """Add one device to a running incremental job; False when it already has an active task."""
        try:
            await self.batched(
                lambda tx: insert_tasks(tx, job.id, job.product_key, job.to_version, [(dk, from_version, wave)])
            )
        except IntegrityError:
            return False
        return True

    async def get_job(self, job_id: str) -> Job | None:
        row = await self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return rows.job(row) if row else None

    async def list_jobs(self, statuses: Sequence[JobStatus], limit: int, offset: int) -> tuple[list[Job], int]:
        """Jobs in any of `statuses` (all when empty), newest first, with the total."""
        where = f"WHERE status IN ({','.join('?' * len(statuses))})" if statuses else ""
        found = await self._all(
            f"SELECT * FROM jobs {where} ORDER BY created_at DESC LIMIT ? OFFSET ?", (*statuses, limit, offset)
        )
        total = await self._one(f"SELECT COUNT(*) AS n FROM jobs {where}", tuple(statuses))
        return [rows.job(r) for r in found], total["n"] if total else 0

    async def live_jobs(self) -> list[Job]:
        """Jobs the job engine drives (few: indexed by status)."""
        found = await self._all(f"SELECT * FROM jobs WHERE status IN {sql_list(LIVE_JOBS)} ORDER BY created_at")
        return [rows.job(r) for r in found]

    async def set_job(
        self,
        job_id: str,
        *,
        status: JobStatus | None = None,
        reason: str | None = None,
        pause_cause: PauseCause | None = None,
        current_wave: int | None = None,
        started_at: float | None = None,
        finished_at: float | None = None,
        reopen: bool = False,
        event: JobLogEntry | None = None,
    ) -> None:
        """Change a job's row; `reopen` clears finished_at (an operator retry of a completed job).

        `event` is written to the upgrade log in the same transaction.
        """
        fields: dict[str, Any] = {
            "status": status,
            "status_reason": reason,
            "pause_cause": pause_cause,
            "current_wave": current_wave,
            "started_at": started_at,
            "finished_at": finished_at,
        }
        await self.batched(_job_op(job_id, fields, reopen, event))

    async def end_job(
        self, job_id: str, status: JobStatus, event: JobLogEntry, cancel: Sequence[TaskState], now: float
    ) -> int:
        """End a job early (canceled, aborted) in one transaction: its row and log row, its tasks
        in `cancel` canceled, retries of failed ones dropped. No reader ever sees an aborted job
        with pending tasks. Returns how many tasks were canceled."""
        job = _job_op(job_id, {"status": status, "status_reason": event.desc, "finished_at": now}, False, event)
        desc = "job aborted" if status == JobStatus.ABORTED else "job canceled"
        changes = {"status": TaskState.CANCELED, "desc": desc, "finished_at": now, "due_at": None, "retry_at": None}
        canceled = bulk_op(job_id, cancel, None, changes)
        no_retry = bulk_op(job_id, (TaskState.FAILED,), None, {"retry_at": None})

        async def op(tx: Tx) -> int:
            await job(tx)
            n = await canceled(tx)
            await no_retry(tx)
            return n

        return await self.batched(op)

    async def job_status_counts(self) -> dict[JobStatus, int]:
        """Jobs per status, over all jobs."""
        found = await self._all("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
        return {JobStatus(r["status"]): r["n"] for r in found}

    async def task_state_counts(self) -> dict[TaskState, int]:
        """Tasks per state, over all jobs."""
        found = await self._all("SELECT status, COUNT(*) AS n FROM tasks GROUP BY status")
        return {TaskState(r["status"]): r["n"] for r in found}

    async def job_counts(self, job_id: str, wave: int | None = None) -> dict[TaskState, int]:
        if wave is None:
            found = await self._all(
                "SELECT status, COUNT(*) AS n FROM tasks WHERE job_id = ? GROUP BY status", (job_id,)
            )
        else:
            found = await self._all(
                "SELECT status, COUNT(*) AS n FROM tasks WHERE job_id = ? AND wave = ? GROUP BY status",
                (job_id, wave),
            )
        return {TaskState(r["status"]): r["n"] for r in found}

    async def wave_counts(self, job_id: str) -> dict[int, dict[TaskState, int]]:
        """Task counts per wave and state: {wave: {status: n}}."""
        found = await self._all(
            "SELECT wave, status, COUNT(*) AS n FROM tasks WHERE job_id = ? GROUP BY wave, status", (job_id,)
        )
        out: dict[int, dict[TaskState, int]] = {}
        for r in found:
            out.setdefault(r["wave"], {})[TaskState(r["status"])] = r["n"]
        return out

    async def retries_pending(self, job_id: str) -> int:
        row = await self._one(
            "SELECT COUNT(*) AS n FROM tasks WHERE job_id = ? AND status = ? AND retry_at IS NOT NULL",
            (job_id, TaskState.FAILED),
        )
        return row["n"] if row else 0

    async def jobs_using_firmware(self, firmware_id: str) -> list[str]:
        found = await self._all(
            f"SELECT id FROM jobs WHERE firmware_id = ? AND status IN {sql_list(LIVE_JOBS)}", (firmware_id,)
        )
        return [r["id"] for r in found]

    async def succeeded_count(self, job_id: str) -> int:
        row = await self._one(
            "SELECT COUNT(*) AS n FROM tasks WHERE job_id = ? AND status = ?", (job_id, TaskState.SUCCEEDED)
        )
        return row["n"] if row else 0

    async def rollback_watch_until(self, now: float) -> float:
        """Until when a device's report may still be a rollback of one of the jobs (0 when never).

        An upper bound from the jobs alone: a live job's successes may come at any moment
        (now + its watch), a finished one's came before it finished. Followers ask on every tick,
        and the exact answer (the last success of every job) scanned all succeeded tasks: in a
        10,000-device rollout on three nodes, 10 ms a call, 33 s of PostgreSQL's time.
        """
        default = jobspec.DEFAULT_ROLLBACK_WATCH
        watch = f"COALESCE(CAST(json_extract(spec, '$.\"rollbackWatchSeconds\"') AS REAL), {default})"
        row = await self._one(f"SELECT MAX(COALESCE(finished_at, ?) + {watch}) AS until FROM jobs", (now,))
        return float(row["until"]) if row and row["until"] is not None else 0.0

    # ------------------------------------------------------------ scope

    async def scope_devices(self, pk: str, scope: Scope, to_version: str) -> tuple[list[Device], int]:
        """Devices matching a job scope that have no active task anywhere, and how many are busy."""
        where = ["d.product_key = ?", "(d.version IS NULL OR d.version != ?)"]
        params: list[Any] = [pk, to_version]
        if scope.version_numbers:
            where.append(f"d.version IN ({','.join('?' * len(scope.version_numbers))})")
            params.extend(scope.version_numbers)
        if scope.device_keys:
            where.append(f"d.device_key IN ({','.join('?' * len(scope.device_keys))})")
            params.extend(scope.device_keys)
        for k, values in scope.tags.items():
            where.append(f"json_extract(d.tags, ?) IN ({','.join('?' * len(values))})")
            params.extend([f'$."{k}"', *values])
        clause = " AND ".join(where)
        found = await self._all(
            f"SELECT d.* FROM devices d WHERE {clause} AND NOT {_BUSY} ORDER BY d.device_key", params
        )
        n_busy = await self._one(f"SELECT COUNT(*) AS n FROM devices d WHERE {clause} AND {_BUSY}", params)
        return [rows.device(r) for r in found], n_busy["n"] if n_busy else 0
