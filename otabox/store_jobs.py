"""SQL for jobs, tasks and the upgrade log (split from store.py by noun; mixed into Store).

Every task state change and progress report writes its event row in the same
transaction, so the upgrade log never disagrees with the task table.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import aiosqlite

Row = dict[str, Any]
T = TypeVar("T")

MIGRATION_JOBS = (
    "0002_jobs",
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        type TEXT NOT NULL,
        firmware_id TEXT NOT NULL,
        product_key TEXT NOT NULL,
        to_version TEXT NOT NULL,
        status TEXT NOT NULL,
        status_reason TEXT NOT NULL DEFAULT '',
        spec TEXT NOT NULL,
        current_wave INTEGER NOT NULL DEFAULT 0,
        skipped INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX jobs_status ON jobs(status);
    CREATE TABLE tasks (
        job_id TEXT NOT NULL REFERENCES jobs(id),
        product_key TEXT NOT NULL,
        device_key TEXT NOT NULL,
        status TEXT NOT NULL,
        wave INTEGER NOT NULL DEFAULT 0,
        progress INTEGER,
        step INTEGER,
        desc TEXT,
        from_version TEXT,
        to_version TEXT NOT NULL,
        attempt INTEGER NOT NULL DEFAULT 1,
        due_at REAL,
        retry_at REAL,
        published_at REAL,
        upgrading_at REAL,
        finished_at REAL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (job_id, product_key, device_key)
    );
    CREATE UNIQUE INDEX tasks_one_active ON tasks(product_key, device_key)
        WHERE status IN ('pending', 'published', 'upgrading');
    CREATE INDEX tasks_job_status ON tasks(job_id, status, wave, device_key);
    CREATE INDEX tasks_due ON tasks(due_at) WHERE due_at IS NOT NULL;
    CREATE INDEX tasks_retry ON tasks(retry_at) WHERE retry_at IS NOT NULL;
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        job_id TEXT NOT NULL,
        job_type TEXT NOT NULL,
        firmware_id TEXT NOT NULL,
        product_key TEXT NOT NULL,
        device_key TEXT NOT NULL,
        from_version TEXT,
        to_version TEXT,
        status TEXT NOT NULL,
        kind TEXT NOT NULL,
        step INTEGER,
        desc TEXT,
        attempt INTEGER NOT NULL,
        wave INTEGER,
        bytes_downloaded INTEGER
    );
    CREATE INDEX events_job ON events(job_id, seq);
    CREATE INDEX events_ts ON events(ts);
    """,
)

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


def job_row(row: sqlite3.Row) -> Row:
    spec = json.loads(row["spec"])
    return {
        "id": row["id"],
        "name": row["name"],
        "type": row["type"],
        "firmwareId": row["firmware_id"],
        "productKey": row["product_key"],
        "toVersion": row["to_version"],
        "status": row["status"],
        "statusReason": row["status_reason"],
        "currentWave": row["current_wave"],
        "skipped": row["skipped"],
        "createdAt": row["created_at"],
        "startedAt": row["started_at"],
        "finishedAt": row["finished_at"],
        **spec,
    }


def task_row(row: sqlite3.Row) -> Row:
    return {
        "jobId": row["job_id"],
        "productKey": row["product_key"],
        "deviceKey": row["device_key"],
        "status": row["status"],
        "wave": row["wave"],
        "progress": row["progress"],
        "step": row["step"],
        "desc": row["desc"],
        "fromVersion": row["from_version"],
        "toVersion": row["to_version"],
        "attempt": row["attempt"],
        "dueAt": row["due_at"],
        "retryAt": row["retry_at"],
        "publishedAt": row["published_at"],
        "upgradingAt": row["upgrading_at"],
        "finishedAt": row["finished_at"],
        "updatedAt": row["updated_at"],
    }


_EVENT_INSERT = (
    "INSERT INTO events (ts, job_id, job_type, firmware_id, product_key, device_key, from_version, to_version,"
    " status, kind, step, desc, attempt, wave, bytes_downloaded)"
    " SELECT ?, t.job_id, j.type, j.firmware_id, t.product_key, t.device_key, t.from_version, t.to_version,"
    " t.status, ?, t.step, t.desc, t.attempt, NULLIF(t.wave, 0),"
    " (SELECT bytes FROM downloads dl WHERE dl.product_key = t.product_key AND dl.device_key = t.device_key"
    "  AND dl.firmware_id = j.firmware_id)"
    " FROM tasks t JOIN jobs j ON j.id = t.job_id"
)


def _insert_tasks(
    db: sqlite3.Connection,
    job_id: str,
    pk: str,
    to_version: str,
    tasks: Sequence[tuple[str, str | None, int]],
    now: float,
) -> None:
    db.executemany(
        "INSERT INTO tasks (job_id, product_key, device_key, status, wave, from_version, to_version,"
        " attempt, updated_at) VALUES (?, ?, ?, 'pending', ?, ?, ?, 1, ?)",
        [(job_id, pk, dk, wave, fv, to_version, now) for dk, fv, wave in tasks],
    )
    db.execute(
        _EVENT_INSERT + " WHERE t.job_id = ? AND t.status = 'pending' AND t.updated_at = ?", (now, "state", job_id, now)
    )


class JobsMixin:
    """Job, task and event SQL. Mixed into `Store`, whose connection and lock it uses."""

    if TYPE_CHECKING:  # provided by Store

        def transaction(self) -> AbstractAsyncContextManager[aiosqlite.Connection]: ...

        async def _write(self, sql: str, params: Sequence[Any] = ()) -> int: ...

        async def _all(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]: ...

        async def _one(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None: ...

        async def batched(self, op: Callable[[sqlite3.Connection], T]) -> T: ...

    # ------------------------------------------------------------ jobs

    async def create_job(self, job: Row, tasks: Sequence[tuple[str, str | None, int]]) -> None:
        """Insert a job and its pending tasks (deviceKey, fromVersion, wave) with their events."""
        now = time.time()

        def op(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO jobs (id, name, type, firmware_id, product_key, to_version, status, status_reason,"
                " spec, current_wave, skipped, created_at, started_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job["id"],
                    job["name"],
                    job["type"],
                    job["firmwareId"],
                    job["productKey"],
                    job["toVersion"],
                    job["status"],
                    job.get("statusReason", ""),
                    json.dumps(job["spec"]),
                    job.get("currentWave", 0),
                    job.get("skipped", 0),
                    now,
                    job.get("startedAt"),
                    now,
                ),
            )
            _insert_tasks(db, job["id"], job["productKey"], job["toVersion"], tasks, now)

        await self.batched(op)

    async def add_job_task(self, job_id: str, pk: str, dk: str, from_version: str | None, wave: int) -> bool:
        """Add one device to a running incremental job; False when it already has an active task."""
        job = await self.get_job(job_id)
        if job is None:
            return False
        now = time.time()
        try:
            await self.batched(
                lambda db: _insert_tasks(db, job_id, pk, job["toVersion"], [(dk, from_version, wave)], now)
            )
        except sqlite3.IntegrityError:
            return False
        return True

    async def get_job(self, job_id: str) -> Row | None:
        row = await self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return job_row(row) if row else None

    async def list_jobs(self, status: str | None, limit: int, offset: int) -> tuple[list[Row], int]:
        where, params = ("WHERE status = ?", [status]) if status else ("", [])
        rows = await self._all(
            f"SELECT * FROM jobs {where} ORDER BY created_at DESC LIMIT ? OFFSET ?", (*params, limit, offset)
        )
        total = await self._one(f"SELECT COUNT(*) AS n FROM jobs {where}", params)
        return [job_row(r) for r in rows], total["n"] if total else 0

    async def live_jobs(self) -> list[Row]:
        """Jobs the scheduler drives (few: indexed by status)."""
        rows = await self._all(
            "SELECT * FROM jobs WHERE status IN ('scheduled', 'running', 'paused') ORDER BY created_at"
        )
        return [job_row(r) for r in rows]

    async def set_job(self, job_id: str, **fields: Any) -> None:
        allowed = {"status", "status_reason", "current_wave", "started_at", "finished_at"}
        assert set(fields) <= allowed, fields
        sets = ", ".join(f"{k} = ?" for k in fields)
        await self._write(
            f"UPDATE jobs SET {sets}, updated_at = ? WHERE id = ?", (*fields.values(), time.time(), job_id)
        )

    async def job_counts(self, job_id: str, wave: int | None = None) -> dict[str, int]:
        if wave is None:
            rows = await self._all(
                "SELECT status, COUNT(*) AS n FROM tasks WHERE job_id = ? GROUP BY status", (job_id,)
            )
        else:
            rows = await self._all(
                "SELECT status, COUNT(*) AS n FROM tasks WHERE job_id = ? AND wave = ? GROUP BY status",
                (job_id, wave),
            )
        return {r["status"]: r["n"] for r in rows}

    async def retries_pending(self, job_id: str) -> int:
        row = await self._one(
            "SELECT COUNT(*) AS n FROM tasks WHERE job_id = ? AND status = 'failed' AND retry_at IS NOT NULL",
            (job_id,),
        )
        return row["n"] if row else 0

    async def jobs_using_firmware(self, firmware_id: str) -> list[str]:
        rows = await self._all(
            "SELECT id FROM jobs WHERE firmware_id = ? AND status IN ('scheduled', 'running', 'paused')",
            (firmware_id,),
        )
        return [r["id"] for r in rows]

    async def succeeded_count(self, job_id: str) -> int:
        row = await self._one("SELECT COUNT(*) AS n FROM tasks WHERE job_id = ? AND status = 'succeeded'", (job_id,))
        return row["n"] if row else 0

    # ------------------------------------------------------------ scope

    async def scope_devices(self, pk: str, scope: Row, to_version: str) -> tuple[list[Row], int]:
        """Devices matching a job scope that have no active task anywhere, and how many are busy."""
        where = ["d.product_key = ?", "(d.version IS NULL OR d.version != ?)"]
        params: list[Any] = [pk, to_version]
        if scope.get("versionNumbers"):
            vs = scope["versionNumbers"]
            where.append(f"d.version IN ({','.join('?' * len(vs))})")
            params.extend(vs)
        if scope.get("deviceKeys"):
            ks = scope["deviceKeys"]
            where.append(f"d.device_key IN ({','.join('?' * len(ks))})")
            params.extend(ks)
        for k, values in (scope.get("tags") or {}).items():
            where.append(f"json_extract(d.tags, ?) IN ({','.join('?' * len(values))})")
            params.extend([f'$."{k}"', *values])
        busy = (
            "EXISTS (SELECT 1 FROM tasks t WHERE t.product_key = d.product_key AND t.device_key = d.device_key"
            " AND t.status IN ('pending', 'published', 'upgrading'))"
        )
        clause = " AND ".join(where)
        rows = await self._all(
            f"SELECT d.device_key, d.version, d.tags FROM devices d WHERE {clause} AND NOT {busy}"
            " ORDER BY d.device_key",
            params,
        )
        n_busy = await self._one(f"SELECT COUNT(*) AS n FROM devices d WHERE {clause} AND {busy}", params)
        free = [{"deviceKey": r["device_key"], "version": r["version"], "tags": json.loads(r["tags"])} for r in rows]
        return free, n_busy["n"] if n_busy else 0

    # ------------------------------------------------------------ tasks

    async def active_task(self, pk: str, dk: str) -> Row | None:
        row = await self._one(
            "SELECT * FROM tasks WHERE product_key = ? AND device_key = ?"
            " AND status IN ('pending', 'published', 'upgrading')",
            (pk, dk),
        )
        return task_row(row) if row else None

    async def device_tasks(self, pk: str, dk: str, limit: int = 50) -> list[Row]:
        rows = await self._all(
            "SELECT * FROM tasks WHERE product_key = ? AND device_key = ? ORDER BY updated_at DESC LIMIT ?",
            (pk, dk, limit),
        )
        return [task_row(r) for r in rows]

    async def list_tasks(self, job_id: str, status: str | None, limit: int, offset: int) -> tuple[list[Row], int]:
        where, params = ("job_id = ? AND status = ?", [job_id, status]) if status else ("job_id = ?", [job_id])
        rows = await self._all(
            f"SELECT * FROM tasks WHERE {where} ORDER BY device_key LIMIT ? OFFSET ?", (*params, limit, offset)
        )
        total = await self._one(f"SELECT COUNT(*) AS n FROM tasks WHERE {where}", params)
        return [task_row(r) for r in rows], total["n"] if total else 0

    async def transition(
        self, job_id: str, pk: str, dk: str, kind: str = "state", expect: Sequence[str] | None = None, **changes: Any
    ) -> bool:
        """Update one task and append its event atomically.

        `expect`: the statuses the task must be in (guards against races); returns False
        when the task is not in one of them (nothing is written then).
        """
        assert set(changes) <= TASK_COLUMNS, changes
        now = time.time()
        bump = "attempt" in changes and changes["attempt"] is None
        if bump:
            del changes["attempt"]
        sets = ", ".join([f"{k} = ?" for k in changes] + (["attempt = attempt + 1"] if bump else []))
        where = "job_id = ? AND product_key = ? AND device_key = ?"
        params: list[Any] = [*changes.values(), now, job_id, pk, dk]
        if expect:
            where += f" AND status IN ({','.join('?' * len(expect))})"
            params.extend(expect)
        update = f"UPDATE tasks SET {sets}, updated_at = ? WHERE {where}"

        def op(conn: sqlite3.Connection) -> bool:
            if conn.execute(update, params).rowcount == 0:
                return False
            conn.execute(
                _EVENT_INSERT + " WHERE t.job_id = ? AND t.product_key = ? AND t.device_key = ?",
                (now, kind, job_id, pk, dk),
            )
            return True

        return await self.batched(op)

    async def publish_tasks(self, job_id: str, pk: str, device_keys: list[str], now: float, due: float) -> list[str]:
        """Move pending tasks to published in one transaction (with their events); the keys moved."""
        update = (
            "UPDATE tasks SET status = 'published', published_at = ?, due_at = ?, progress = NULL, step = NULL,"
            " desc = NULL, updated_at = ?"
            " WHERE job_id = ? AND product_key = ? AND device_key = ? AND status = 'pending'"
        )
        event = _EVENT_INSERT + " WHERE t.job_id = ? AND t.product_key = ? AND t.device_key = ?"

        def op(conn: sqlite3.Connection) -> list[str]:
            moved = []
            for dk in device_keys:
                if conn.execute(update, (now, due, now, job_id, pk, dk)).rowcount:
                    conn.execute(event, (now, "state", job_id, pk, dk))
                    moved.append(dk)
            return moved

        return await self.batched(op)

    async def bulk_transition(
        self, job_id: str, from_statuses: Sequence[str], device_keys: Sequence[str] | None, **changes: Any
    ) -> int:
        """Move many tasks of a job at once (cancel, retry), with one event each."""
        assert set(changes) <= TASK_COLUMNS, changes
        now = time.time()
        where = f"job_id = ? AND status IN ({','.join('?' * len(from_statuses))})"
        params: list[Any] = [job_id, *from_statuses]
        if device_keys is not None:
            where += f" AND device_key IN ({','.join('?' * len(device_keys))})"
            params.extend(device_keys)
        sets = ", ".join(f"{k} = ?" for k in changes)
        update = f"UPDATE tasks SET {sets}, updated_at = ? WHERE {where}"

        def op(db: sqlite3.Connection) -> int:
            n: int = db.execute(update, (*changes.values(), now, *params)).rowcount
            if n:
                db.execute(_EVENT_INSERT + " WHERE t.job_id = ? AND t.updated_at = ?", (now, "state", job_id, now))
            return n

        return await self.batched(op)

    async def retry_task(self, job_id: str, pk: str, dk: str) -> int:
        """Operator retry of a finished, unsuccessful task: a new attempt (1), or 0 when not possible."""
        try:
            ok = await self.transition(
                job_id,
                pk,
                dk,
                expect=("failed", "timeout", "canceled"),
                status="pending",
                attempt=None,
                retry_at=None,
                due_at=None,
                progress=None,
                step=None,
                desc="retry requested",
                finished_at=None,
            )
        except sqlite3.IntegrityError:
            return 0  # the device has an active task in another job meanwhile
        return 1 if ok else 0

    async def due_tasks(self, now: float, limit: int = 500) -> list[Row]:
        """In-flight tasks whose timeout has passed (index on due_at)."""
        rows = await self._all(
            "SELECT * FROM tasks WHERE due_at IS NOT NULL AND due_at <= ? AND status IN ('published', 'upgrading')"
            " LIMIT ?",
            (now, limit),
        )
        return [task_row(r) for r in rows]

    async def due_retries(self, now: float, limit: int = 500) -> list[Row]:
        rows = await self._all(
            "SELECT * FROM tasks WHERE retry_at IS NOT NULL AND retry_at <= ? AND status = 'failed' LIMIT ?",
            (now, limit),
        )
        return [task_row(r) for r in rows]

    async def pushable_tasks(self, job_id: str, max_wave: int, limit: int) -> list[Row]:
        """Pending tasks of online devices in open waves, oldest attempt first."""
        rows = await self._all(
            "SELECT t.* FROM tasks t JOIN devices d ON d.product_key = t.product_key AND d.device_key = t.device_key"
            " WHERE t.job_id = ? AND t.status = 'pending' AND t.wave <= ? AND d.online = 1"
            " ORDER BY t.wave, t.device_key LIMIT ?",
            (job_id, max_wave, limit),
        )
        return [task_row(r) for r in rows]

    async def jobs_with_status(self, statuses: Sequence[str], limit: int, offset: int) -> tuple[list[Row], int]:
        """Jobs in any of `statuses`, newest first, with the total."""
        marks = ",".join("?" * len(statuses))
        rows = await self._all(
            f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY created_at DESC LIMIT ? OFFSET ?",
            (*statuses, limit, offset),
        )
        total = await self._one(f"SELECT COUNT(*) AS n FROM jobs WHERE status IN ({marks})", statuses)
        return [job_row(r) for r in rows], total["n"] if total else 0

    async def wave_counts(self, job_id: str) -> dict[int, dict[str, int]]:
        """Task counts per wave and state: {wave: {status: n}}."""
        rows = await self._all(
            "SELECT wave, status, COUNT(*) AS n FROM tasks WHERE job_id = ? GROUP BY wave, status", (job_id,)
        )
        out: dict[int, dict[str, int]] = {}
        for r in rows:
            out.setdefault(r["wave"], {})[r["status"]] = r["n"]
        return out

    async def find_tasks(
        self, job_id: str, status: str | None, text: str, limit: int, offset: int
    ) -> tuple[list[Row], int]:
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
        rows = await self._all(
            f"SELECT * FROM tasks WHERE {clause} ORDER BY device_key LIMIT ? OFFSET ?", (*params, limit, offset)
        )
        total = await self._one(f"SELECT COUNT(*) AS n FROM tasks WHERE {clause}", params)
        return [task_row(r) for r in rows], total["n"] if total else 0

    async def finish_histogram(self, job_id: str, start: float, bucket: float) -> list[tuple[int, str, int]]:
        """(bucket index, status, count) of succeeded/failed/timeout events of a job, buckets of `bucket` s."""
        rows = await self._all(
            "SELECT CAST((ts - ?) / ? AS INTEGER) AS b, status, COUNT(*) AS n FROM events"
            " WHERE job_id = ? AND kind = 'state' AND status IN ('succeeded', 'failed', 'timeout')"
            " GROUP BY b, status ORDER BY b",
            (start, bucket, job_id),
        )
        return [(max(0, int(r["b"])), r["status"], r["n"]) for r in rows]
