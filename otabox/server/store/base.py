"""Store plumbing: one backend (SQLite or PostgreSQL), group commit, migrations, kv.

Times are stored as REAL epoch seconds (UTC); enum values as TEXT, never ordinals. The SQL is
written once, in SQLite's dialect (`dialect.py` says it in PostgreSQL's).

Writes are serialised: group-committed ops run in one transaction, each failing alone.
An op is `async def op(tx: Tx)`: it only awaits `tx`, does database work only (PostgreSQL may
run it a second time, see `postgres.py`) and never swallows a database error to go on (in
PostgreSQL the transaction is lost after one). On SQLite the whole batch then runs on the
database thread in one hop (the op's coroutine is driven there to its end without an event
loop: SQLite's `tx` never suspends); on PostgreSQL it runs on the one write connection.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiosqlite

from otabox.server.store.migrations import MIGRATIONS

log = logging.getLogger(__name__)

T = TypeVar("T")
# Rows inserted at once from which the planner's statistics are refreshed (`StoreBase.grew`);
# below it autovacuum's own analyze comes soon enough and the scans are short.
BULK_ROWS = 1000


class Row(Protocol):
    """A result row of either backend (sqlite3.Row, asyncpg.Record): by column name."""

    def __getitem__(self, key: str, /) -> Any: ...

    def keys(self) -> Any: ...


class IntegrityError(Exception):
    """A constraint refused the write (either backend)."""


class DuplicateError(IntegrityError):
    """A unique constraint refused the write."""


class Tx(Protocol):
    """The transaction a group-committed op runs in."""

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; the number of rows it changed. Raises IntegrityError."""
        ...

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    async def lock_schema(self) -> None:
        """Until the end of the transaction, be the only one migrating (other nodes wait)."""
        ...


Op = Callable[[Tx], Coroutine[Any, Any, T]]


class Backend(ABC):
    """One database: reads, batches of ops in one transaction, closing."""

    name: str

    @abstractmethod
    async def fetch(self, sql: str, params: Sequence[Any]) -> list[Row]: ...

    @abstractmethod
    async def run_batch(self, ops: list[Op[Any]]) -> list[tuple[bool, Any]]:
        """All ops in one transaction, each in its own savepoint: (True, result) or (False, exc)."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def analyze(self, tables: Sequence[str]) -> None:
        """`tables` just grew by many rows: bring the planner's statistics up to date (`StoreBase.grew`)."""


# ------------------------------------------------------------ SQLite


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (an op over SQLite's tx) to its end, here and now."""
    try:
        coro.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coro.close()
    raise RuntimeError("a store op awaited something other than its transaction")


class SQLiteTx:
    """Tx over the sqlite3 connection, on the database thread: nothing here ever suspends."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        try:
            return self.conn.execute(sql, params).rowcount
        except sqlite3.IntegrityError as exc:
            raise IntegrityError(str(exc)) from exc

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            self.conn.executemany(sql, rows)
        except sqlite3.IntegrityError as exc:
            raise IntegrityError(str(exc)) from exc

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return list(self.conn.execute(sql, params).fetchall())

    async def lock_schema(self) -> None:
        pass  # BEGIN IMMEDIATE already made this the only writer


def _run_batch(conn: sqlite3.Connection, ops: list[Op[Any]]) -> list[tuple[bool, Any]]:
    """On the database thread: all ops in one transaction, each in its own savepoint."""
    out: list[tuple[bool, Any]] = []
    tx = SQLiteTx(conn)
    conn.execute("BEGIN IMMEDIATE")
    try:
        for op in ops:
            conn.execute("SAVEPOINT op")
            try:
                out.append((True, drive(op(tx))))
            except Exception as exc:
                conn.execute("ROLLBACK TO op")
                out.append((False, exc))
            conn.execute("RELEASE op")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return out


class SQLiteBackend(Backend):
    """One aiosqlite connection in WAL mode: reads and writes share its thread."""

    name = "sqlite"

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self.db = db
        self.path = path

    @classmethod
    async def open(cls, path: Path, *, read_only: bool = False) -> SQLiteBackend:
        if read_only:
            db = await aiosqlite.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        else:
            db = await aiosqlite.connect(path, isolation_level=None)
        db.row_factory = sqlite3.Row
        await db.execute("PRAGMA busy_timeout=5000")
        if not read_only:
            await db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a committed transaction survives a process crash (the
            # guarantee we need); only a power loss may drop the last few commits.
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute("PRAGMA foreign_keys=ON")
        return cls(db, path)

    async def fetch(self, sql: str, params: Sequence[Any]) -> list[Row]:
        # execute_fetchall: one hop to the database thread instead of three.
        return list(await self.db.execute_fetchall(sql, params))

    async def run_batch(self, ops: list[Op[Any]]) -> list[tuple[bool, Any]]:
        # aiosqlite's own hop to its thread: the whole batch is one call there.
        run: Callable[..., Coroutine[Any, Any, list[tuple[bool, Any]]]] = self.db._execute
        return await run(_run_batch, self.db._conn, ops)

    async def analyze(self, tables: Sequence[str]) -> None:
        """Nothing: no statistics are gathered on SQLite, so its plans are the same at every size;
        without them its planner takes the index matching the most equality terms."""

    async def close(self) -> None:
        await self.db.close()


# ------------------------------------------------------------ the store's base


def is_database_url(target: str | Path) -> bool:
    """True for a PostgreSQL URL (postgresql://user:pass@host/db), False for a SQLite file."""
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


class StoreBase:
    """The backend, group commit and migrations; the per-noun SQL classes build on it."""

    def __init__(self, backend: Backend, node_id: str = "") -> None:
        self.backend = backend
        # The node this process is (`--node-id`): device presence rows name it.
        self.node_id = node_id
        self._write_lock = asyncio.Lock()
        self._pending: list[tuple[Op[Any], asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        # Group commits so far and their time (read by /metrics).
        self.commits = 0
        self.commit_seconds = 0.0

    @property
    def dialect(self) -> str:
        """ "sqlite" or "postgresql"."""
        return self.backend.name

    async def close(self) -> None:
        if self._flusher is not None and not self._flusher.done():
            await self._flusher  # commit what callers are waiting for
        if not self._closed:
            self._closed = True
            await self.backend.close()

    # ------------------------------------------------------------ plumbing

    async def grew(self, rows: int, *tables: str) -> None:
        """After a bulk insert of `rows` into `tables` (an import, a job's tasks), committed.

        PostgreSQL keeps a prepared statement's generic plan after five runs, planned with the
        statistics of the time: made while a table was small, it scans an index that does not
        narrow to one row (a job's pending tasks, one by one: a 50,000-device push became
        quadratic) until autovacuum's next analyze, a minute or more later. ANALYZE now
        invalidates those plans; it samples at most 30,000 rows, so it costs tens of ms.
        """
        if rows < BULK_ROWS:
            return
        try:
            await self.backend.analyze(tables)
        except Exception as exc:  # the rows are committed: the caller's answer must say so
            log.warning(
                "could not analyze %s after a bulk insert (plans may be slow until autovacuum's): %r",
                ", ".join(tables),
                exc,
            )

    async def batched(self, op: Op[T]) -> T:
        """Run `await op(tx)` in the next group commit; returns its result or raises its exception.

        Group commit: writes that arrive while a batch is being committed wait for the next
        batch, which runs all of them in one transaction (on SQLite: one thread hop and one
        commit for the lot instead of three hops and a commit each). Each op runs in its own
        SAVEPOINT, so a failing op changes nothing and fails only its caller. The caller's
        await returns only after the commit: nothing is acknowledged early.
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        result: T = await future
        return result

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                async with self._write_lock:
                    started = time.perf_counter()
                    outcomes = await self.backend.run_batch([op for op, _ in batch])
                    self.commits += 1
                    self.commit_seconds += time.perf_counter() - started
            except BaseException as exc:  # the whole batch failed (e.g. disk full): tell everyone
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
                if not isinstance(exc, Exception):
                    raise
                continue
            for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

    async def _write(self, sql: str, params: Sequence[Any] = ()) -> int:
        async def op(tx: Tx) -> int:
            try:
                return await tx.execute(sql, params)
            except IntegrityError as exc:
                raise DuplicateError(str(exc)) from exc

        return await self.batched(op)

    async def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return await self.backend.fetch(sql, params)

    async def _one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        return next(iter(await self.backend.fetch(sql, params)), None)

    async def migrate(self) -> list[str]:
        """Apply pending migrations in order, each in its own transaction; returns the names applied.

        Safe with several nodes starting at once on one PostgreSQL: each migration's transaction
        first takes the schema lock, then looks again at what is applied.
        """

        async def apply(tx: Tx, name: str, sql: str) -> bool:
            await tx.lock_schema()
            await tx.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
            if await tx.fetch("SELECT 1 FROM migrations WHERE name = ?", (name,)):
                return False
            for statement in sql.split(";"):
                if statement.strip():
                    await tx.execute(statement)
            await tx.execute("INSERT INTO migrations (name, applied_at) VALUES (?, ?)", (name, time.time()))
            return True

        done: set[str] = set()
        if await self._all(_MIGRATIONS_TABLE[self.dialect]):
            done = {r["name"] for r in await self._all("SELECT name FROM migrations")}

        def step(name: str, sql: str) -> Op[bool]:
            return lambda tx: apply(tx, name, sql)

        applied = []
        for name, sql in MIGRATIONS:
            if name in done:
                continue
            if await self.batched(step(name, sql)):
                log.info("applied migration %s", name)
                applied.append(name)
        return applied

    # ------------------------------------------------------------ kv

    async def get_kv(self, key: str) -> str | None:
        row = await self._one("SELECT value FROM kv WHERE key = ?", (key,))
        return row["value"] if row else None

    async def add_kv(self, key: str, value: str) -> bool:
        """Set `key` only if it has no value yet; False when it had one (another node was first)."""
        return (
            await self._write("INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT(key) DO NOTHING", (key, value))
            == 1
        )

    async def set_kv(self, key: str, value: str) -> None:
        await self._write(
            "INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )


# Whether the migrations table exists yet, without creating it (a read, outside any write).
_MIGRATIONS_TABLE = {
    "sqlite": "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'migrations'",
    "postgresql": "SELECT 1 FROM pg_tables WHERE schemaname = current_schema() AND tablename = 'migrations'",
}
