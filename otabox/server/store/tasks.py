"""SQL of tasks: one device in one job. Every state change writes its event in the same transaction,
so the upgrade log never disagrees with the task table.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from otabox.jobspec import DEFAULT_TIMEOUT
from otabox.models import ACTIVE, IN_FLIGHT, RETRYABLE, EventKind, JobEvent, Task, TaskState, sql_list
from otabox.server.store import rows
from otabox.server.store.base import IntegrityError, Op, StoreBase, Tx

TASK_COLUMNS = frozenset(
    {
        "status",
        "progress",
        "step",
        "desc",
        "from_version",
        "attempt",
        "due_at",
        "retry_at",
        "published_at",
        "upgrading_at",
        "finished_at",
    }
)


TASK_EVENT = (
    "INSERT INTO events (ts, job_id, job_type, firmware_id, product_key, device_key, from_version, to_version,"
    " status, kind, step, desc, attempt, wave, bytes_downloaded)"
    " SELECT ?, t.job_id, j.type, j.firmware_id, t.product_key, t.device_key, t.from_version, t.to_version,"
    " t.status, ?, t.step, t.desc, t.attempt, NULLIF(t.wave, 0),"
    " (SELECT bytes FROM downloads dl WHERE dl.product_key = t.product_key AND dl.device_key = t.device_key"
    "  AND dl.firmware_id = j.firmware_id)"
    " FROM tasks t JOIN jobs j ON j.id = t.job_id"
)


def bulk_op(
    job_id: str, from_statuses: Sequence[TaskState], device_keys: Sequence[str] | None, changes: dict[str, Any]
) -> Op[int]:
    """The write that moves many tasks of a job at once; returns how many it moved.

    A task's event is written only when its state changes: clearing `retry_at` of failed
    tasks writes none (the failure was logged when it happened).
    """
    assert set(changes) <= TASK_COLUMNS, changes
    where = f"job_id = ? AND status IN ({','.join('?' * len(from_statuses))})"
    params: list[Any] = [job_id, *from_statuses]
    if device_keys is not None:
        where += f" AND device_key IN ({','.join('?' * len(device_keys))})"
        params.extend(device_keys)
    sets = ", ".join(f"{k} = ?" for k in changes)
    update = f"UPDATE tasks SET {sets}, updated_at = ? WHERE {where}"
    logged = "status" in changes and changes["status"] not in from_statuses

    async def op(tx: Tx) -> int:
        now = log_time()
        n = await tx.execute(update, (*changes.values(), now, *params))
        if n and logged:
            await tx.execute(
                TASK_EVENT + " WHERE t.job_id = ? AND t.updated_at = ?", (now, EventKind.STATE, job_id, now)
            )
        return n

    return op


# A task's bytesDownloaded: what the device fetched of its job's firmware (full image or delta).
_BYTES = (
    "(SELECT dl.bytes FROM downloads dl WHERE dl.product_key = t.product_key AND dl.device_key = t.device_key"
    " AND dl.firmware_id = (SELECT firmware_id FROM jobs WHERE id = t.job_id)) AS bytes_downloaded"
)

_clock_lock = threading.Lock()
_last_ts = 0.0


def log_time() -> float:
    """The time of an event, taken on the database thread as its transaction runs.

    Events get their `ts` in commit order, never earlier than the one before (even if the wall
    clock steps back), so the log's order is the order things happened and a task's events
    never go backwards in time.
    """
    global _last_ts
    with _clock_lock:
        # Strictly increasing: rows of one transaction are told apart by their time (`updated_at = ?`).
        _last_ts = max(time.time(), _last_ts + 1e-6)
        return _last_ts


async def insert_tasks(
    tx: Tx,
    job_id: str,
    pk: str,
    to_version: str,
    tasks: Sequence[tuple[str, str | None, int]],
) -> None:
    """In a write op: new pending tasks with their events."""
    now = log_time()
    await tx.executemany(
        "INSERT INTO tasks (job_id, product_key, device_key, status, wave, from_version, to_version,"
        " attempt, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?)",
        [(job_id, pk, dk, TaskState.PENDING, wave, fv, to_version, now) for dk, fv, wave in tasks],
    )
    await tx.execute(
        TASK_EVENT + " WHERE t.job_id = ? AND t.status = ? AND t.updated_at = ?",
        (now, EventKind.STATE, job_id, TaskState.PENDING, now),
    )


async def insert_job_event(
    tx: Tx, job_id: str, status: JobEvent, actor: str, desc: str, wave: int | None = None
) -> None:
    """In a write op: a job-level row of the upgrade log (device key empty)."""
    await tx.execute(
        "INSERT INTO events (ts, job_id, job_type, firmware_id, product_key, device_key, to_version, status, kind,"
        " desc, attempt, wave, actor)"
        " SELECT ?, j.id, j.type, j.firmware_id, j.product_key, '', j.to_version, ?, ?, ?, 0, ?, ? FROM jobs j"
        " WHERE j.id = ?",
        (log_time(), status, EventKind.JOB, desc, wave, actor, job_id),
    )


# A device's progress report (see `TaskSQL.report_progress`): an upgrading task keeps the
# highest step reported; a published one is confirmed, upgrading from now with its job's
# timeout (a job's spec never changes) restarted. Two UPDATEs rather than one with CASEs: one
# that sets status and due_at rewrites their index entries on every report. The `status IN
# (active)` term lets both backends use the partial unique index tasks_one_active.
def _device_active(table: str = "") -> str:
    """The device's active task (`table`: the alias to qualify the columns with)."""
    t = f"{table}." if table else ""
    return f"{t}product_key = ? AND {t}device_key = ? AND {t}status IN {sql_list(ACTIVE)}"


_DEVICE_ACTIVE = _device_active()
_BEST = "CASE WHEN progress > ? THEN progress ELSE ? END"  # max(step, progress or 0) for step >= 0
_PROGRESS_UPGRADING = (
    f"UPDATE tasks SET progress = {_BEST}, step = {_BEST}, desc = ?, updated_at = ?"
    f" WHERE {_DEVICE_ACTIVE} AND status = '{TaskState.UPGRADING}'"
)
_TIMEOUT = (
    "COALESCE((SELECT CAST(json_extract(j.spec, '$.\"timeoutSeconds\"') AS REAL) FROM jobs j"
    f" WHERE j.id = tasks.job_id), {DEFAULT_TIMEOUT})"
)
_PROGRESS_CONFIRM = (
    f"UPDATE tasks SET status = '{TaskState.UPGRADING}', upgrading_at = ?, due_at = ? + {_TIMEOUT},"
    " progress = ?, step = ?, desc = ?, updated_at = ?"
    f" WHERE {_DEVICE_ACTIVE} AND status = '{TaskState.PUBLISHED}'"
)
_PROGRESS_EVENT = TASK_EVENT + f" WHERE {_device_active('t')} AND t.updated_at = ?"


class TaskSQL(StoreBase):
    async def report_progress(self, pk: str, dk: str, step: int, desc: str | None) -> bool:
        """A device's progress report (`step` >= 0) on its in-flight task, stored with its event;
        False (nothing written) when the device has no task in flight.

        The rules of `DeviceReports.on_progress`, decided by the writes themselves on the task
        row as it is then (no read before them, nothing cached): an upgrading task keeps the
        highest step reported (a PROGRESS event); a published one is confirmed, upgrading from
        now with its job's timeout restarted (a STATE event).
        """
        assert step >= 0, step

        async def op(tx: Tx) -> bool:
            ts = log_time()
            kind = EventKind.PROGRESS
            if not await tx.execute(_PROGRESS_UPGRADING, (step, step, step, step, desc, ts, pk, dk)):
                kind = EventKind.STATE
                if not await tx.execute(_PROGRESS_CONFIRM, (ts, ts, step, step, desc, ts, pk, dk)):
                    return False  # no task, or pending: not in flight
            await tx.execute(_PROGRESS_EVENT, (ts, kind, pk, dk, ts))
            return True

        return await self.batched(op)

    async def active_task(self, pk: str, dk: str) -> Task | None:
        row = await self._one(
            f"SELECT * FROM tasks WHERE product_key = ? AND device_key = ? AND status IN {sql_list(ACTIVE)}", (pk, dk)
        )
        return rows.task(row) if row else None

    async def learn_source_version(self, pk: str, dk: str, version: str) -> None:
        """The device's active task takes `version` as its source version if it had none
        (see `rollout.inform_outcome`). Not an event of its own: the task's next event carries it."""
        await self._write(
            f"UPDATE tasks SET from_version = ? WHERE {_DEVICE_ACTIVE} AND from_version IS NULL", (version, pk, dk)
        )

    async def pending_in_waves(self, job_id: str, max_wave: int) -> int:
        """Pending tasks in waves up to `max_wave` (the index alone: no device is read)."""
        row = await self._one(
            "SELECT COUNT(*) AS n FROM tasks WHERE job_id = ? AND status = ? AND wave <= ?",
            (job_id, TaskState.PENDING, max_wave),
        )
        return int(row["n"]) if row else 0

    async def pending_online(self, job_id: str, max_wave: int) -> bool:
        """Whether a pending task in waves up to `max_wave` has its device online. It stops at the
        first (counting them joined every pending task with its device: ~100 ms at 50,000)."""
        row = await self._one(
            "SELECT 1 AS hit FROM tasks t"
            " JOIN devices d ON d.product_key = t.product_key AND d.device_key = t.device_key"
            " WHERE t.job_id = ? AND t.status = ? AND t.wave <= ? AND d.online = 1 LIMIT 1",
            (job_id, TaskState.PENDING, max_wave),
        )
        return row is not None

    async def last_succeeded(self, pk: str, dk: str) -> Task | None:
        """The device's most recently succeeded task (index tasks_device_succeeded)."""
        row = await self._one(
            "SELECT * FROM tasks WHERE product_key = ? AND device_key = ? AND status = ?"
            " ORDER BY finished_at DESC LIMIT 1",
            (pk, dk, TaskState.SUCCEEDED),
        )
        return rows.task(row) if row else None

    async def device_tasks(self, pk: str, dk: str, limit: int = 50) -> list[Task]:
        found = await self._all(
            "SELECT * FROM tasks WHERE product_key = ? AND device_key = ? ORDER BY updated_at DESC LIMIT ?",
            (pk, dk, limit),
        )
        return [rows.task(r) for r in found]

    async def list_tasks(
        self, job_id: str, status: TaskState | None, limit: int, offset: int
    ) -> tuple[list[Task], int]:
        where, params = ("job_id = ? AND status = ?", [job_id, status]) if status else ("job_id = ?", [job_id])
        found = await self._all(
            f"SELECT *, {_BYTES} FROM tasks t WHERE {where} ORDER BY device_key LIMIT ? OFFSET ?",
            (*params, limit, offset),
        )
        total = await self._one(f"SELECT COUNT(*) AS n FROM tasks WHERE {where}", params)
        return [rows.task(r) for r in found], total["n"] if total else 0

    async def transition(
        self,
        job_id: str,
        pk: str,
        dk: str,
        kind: EventKind = EventKind.STATE,
        expect: Sequence[TaskState] | None = None,
        **changes: Any,
    ) -> bool:
        """Update one task and append its event atomically.

        `expect`: the statuses the task must be in (guards against races); returns False
        when the task is not in one of them (nothing is written then).
        """
        assert set(changes) <= TASK_COLUMNS, changes
        bump = "attempt" in changes and changes["attempt"] is None
        if bump:
            del changes["attempt"]
        sets = ", ".join([f"{k} = ?" for k in changes] + (["attempt = attempt + 1"] if bump else []))
        where = "job_id = ? AND product_key = ? AND device_key = ?"
        if expect:
            where += f" AND status IN ({','.join('?' * len(expect))})"
        update = f"UPDATE tasks SET {sets}, updated_at = ? WHERE {where}"

        async def op(tx: Tx) -> bool:
            now = log_time()
            if await tx.execute(update, (*changes.values(), now, job_id, pk, dk, *(expect or ()))) == 0:
                return False
            await tx.execute(
                TASK_EVENT + " WHERE t.job_id = ? AND t.product_key = ? AND t.device_key = ?",
                (now, kind, job_id, pk, dk),
            )
            return True

        return await self.batched(op)

    async def publish_tasks(self, job_id: str, pk: str, device_keys: list[str], now: float, due: float) -> list[str]:
        """Move pending tasks to published in one transaction (with their events); the keys moved.

        Three statements for the whole batch, not two per device: on PostgreSQL each statement
        is a round trip and an executor start, and a 50,000-device fan-out is the leader's
        group commit running these (~370 µs of PostgreSQL per device, one statement each).
        The rows moved are told apart by the op's own `updated_at`."""
        keys = list(dict.fromkeys(device_keys))
        if not keys:
            return []
        # The list padded (with its last key) to a power of two: a few statement texts for
        # PostgreSQL's prepared-statement cache, not one per batch size.
        size = 1 << (len(keys) - 1).bit_length()
        padded = keys + keys[-1:] * (size - len(keys))
        marks = ",".join("?" * size)

        def these(t: str = "") -> str:  # the batch's tasks (`t`: the alias, with its dot)
            return f"{t}job_id = ? AND {t}product_key = ? AND {t}device_key IN ({marks})"

        update = (
            f"UPDATE tasks SET status = '{TaskState.PUBLISHED}', published_at = ?, due_at = ?, progress = NULL,"
            f" step = NULL, desc = NULL, updated_at = ? WHERE {these()} AND status = '{TaskState.PENDING}'"
        )
        event = TASK_EVENT + f" WHERE {these('t.')} AND t.updated_at = ?"

        async def op(tx: Tx) -> list[str]:
            ts = log_time()
            moved = await tx.execute(update, (now, due, ts, job_id, pk, *padded))
            if not moved:
                return []
            await tx.execute(event, (ts, EventKind.STATE, job_id, pk, *padded, ts))
            if moved == len(keys):
                return keys
            mine = f"SELECT device_key FROM tasks WHERE {these()} AND updated_at = ?"
            found = await tx.fetch(mine, (job_id, pk, *padded, ts))
            published = {r["device_key"] for r in found}
            return [k for k in keys if k in published]

        return await self.batched(op)

    async def bulk_transition(
        self, job_id: str, from_statuses: Sequence[TaskState], device_keys: Sequence[str] | None, **changes: Any
    ) -> int:
        """Move many tasks of a job at once (cancel, clear retries); how many moved."""
        return await self.batched(bulk_op(job_id, from_statuses, device_keys, changes))

    async def retry_task(self, job_id: str, pk: str, dk: str) -> int:
        """Operator retry of a finished, unsuccessful task: a new attempt (1), or 0 when not possible."""
        try:
            ok = await self.transition(
                job_id,
                pk,
                dk,
                expect=RETRYABLE,
                status=TaskState.PENDING,
                attempt=None,
                retry_at=None,
                due_at=None,
                progress=None,
                step=None,
                desc="retry requested",
                finished_at=None,
            )
        except IntegrityError:
            return 0  # the device has an active task in another job meanwhile
        return 1 if ok else 0

    async def due_tasks(self, now: float, limit: int = 500) -> list[Task]:
        """In-flight tasks whose timeout has passed (index on due_at)."""
        found = await self._all(
            f"SELECT * FROM tasks WHERE due_at IS NOT NULL AND due_at <= ? AND status IN {sql_list(IN_FLIGHT)} LIMIT ?",
            (now, limit),
        )
        return [rows.task(r) for r in found]

    async def due_retries(self, now: float, limit: int = 500) -> list[Task]:
        found = await self._all(
            "SELECT * FROM tasks WHERE retry_at IS NOT NULL AND retry_at <= ? AND status = ? LIMIT ?",
            (now, TaskState.FAILED, limit),
        )
        return [rows.task(r) for r in found]

    async def pushable_tasks(self, job_id: str, max_wave: int, limit: int) -> list[Task]:
        """Pending tasks of online devices in open waves, oldest attempt first."""
        found = await self._all(
            "SELECT t.* FROM tasks t JOIN devices d ON d.product_key = t.product_key AND d.device_key = t.device_key"
            " WHERE t.job_id = ? AND t.status = ? AND t.wave <= ? AND d.online = 1"
            " ORDER BY t.wave, t.device_key LIMIT ?",
            (job_id, TaskState.PENDING, max_wave, limit),
        )
        return [rows.task(r) for r in found]

    async def find_tasks(
        self, job_id: str, status: TaskState | None, text: str, limit: int, offset: int
    ) -> tuple[list[Task], int]:
        """Tasks of a job whose device key contains `text` (case-insensitive), optionally in one state."""
        where, params = ["job_id = ?"], [job_id]
        if status:
            where.append("status = ?")
            params.append(status)
        if text:
            escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            where.append("device_key LIKE ? ESCAPE '\\'")
            params.append(f"%{escaped}%")
        clause = " AND ".join(where)
        found = await self._all(
            f"SELECT * FROM tasks WHERE {clause} ORDER BY device_key LIMIT ? OFFSET ?", (*params, limit, offset)
        )
        total = await self._one(f"SELECT COUNT(*) AS n FROM tasks WHERE {clause}", params)
        return [rows.task(r) for r in found], total["n"] if total else 0
