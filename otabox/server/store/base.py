"""Store plumbing: one aiosqlite connection in WAL mode, group commit, migrations, kv.

Times are stored as REAL epoch seconds (UTC); enum values as TEXT, never ordinals.
Writes are serialised: group-committed ops run in one transaction on the database thread, each
in its own savepoint, and `transaction()` holds the same lock.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Self, TypeVar

import aiosqlite

from otabox.server.store.migrations import MIGRATIONS

log = logging.getLogger(__name__)

T = TypeVar("T")


def _run_batch(conn: sqlite3.Connection, ops: list[Callable[[sqlite3.Connection], Any]]) -> list[tuple[bool, Any]]:
    """On the database thread: all ops in one transaction, each in its own savepoint."""
    out: list[tuple[bool, Any]] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for op in ops:
            conn.execute("SAVEPOINT op")
            try:
                out.append((True, op(conn)))
            except Exception as exc:
                conn.execute("ROLLBACK TO op")
                out.append((False, exc))
            conn.execute("RELEASE op")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return out


class DuplicateError(Exception):
    """A unique constraint refused the write."""


class StoreBase:
    """The connection, group commit and migrations; the per-noun SQL classes build on it."""

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self.db = db
        self.path = path
        self._write_lock = asyncio.Lock()
        self._pending: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None
        # Group commits so far and their time (read by /metrics).
        self.commits = 0
        self.commit_seconds = 0.0

    @classmethod
    async def open(cls, path: Path, *, read_only: bool = False) -> Self:
        """Open (and migrate, unless read-only) the database at `path`."""
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
        store = cls(db, path)
        if not read_only:
            await store.migrate()
        return store

    async def close(self) -> None:
        if self._flusher is not None and not self._flusher.done():
            await self._flusher  # commit what callers are waiting for
        if self.db is not None:
            db, self.db = self.db, None  # type: ignore[assignment]
            await db.close()

    # ------------------------------------------------------------ plumbing

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction; serialised with every other write."""
        async with self._write_lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
            else:
                await self.db.execute("COMMIT")

    async def batched(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run `op(conn)` in the next group commit; returns its result or raises its exception.

        Group commit: writes that arrive while a batch is being committed wait for the next
        batch, which runs all of them in one transaction on the database thread (one thread
        hop and one commit for the lot instead of three hops and a commit each). Each op
        runs in its own SAVEPOINT, so a failing op changes nothing and fails only its caller.
        The caller's await returns only after the commit: nothing is acknowledged early.
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
                    # aiosqlite's own hop to its thread: the whole batch is one call there.
                    run: Callable[..., Awaitable[list[tuple[bool, Any]]]] = self.db._execute
                    started = time.perf_counter()
                    outcomes = await run(_run_batch, self.db._conn, [op for op, _ in batch])
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
        def op(conn: sqlite3.Connection) -> int:
            try:
                return conn.execute(sql, params).rowcount
            except sqlite3.IntegrityError as exc:
                raise DuplicateError(str(exc)) from exc

        return await self.batched(op)

    async def _all(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        # execute_fetchall: one hop to the database thread instead of three.
        return list(await self.db.execute_fetchall(sql, params))

    async def _one(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        rows = await self.db.execute_fetchall(sql, params)
        return next(iter(rows), None)

    async def migrate(self) -> list[str]:
        """Apply pending migrations in order; returns the names applied."""
        await self.db.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
        done = {r["name"] for r in await self._all("SELECT name FROM migrations")}
        applied = []
        for name, sql in MIGRATIONS:
            if name in done:
                continue
            async with self.transaction() as db:
                for statement in sql.split(";"):
                    if statement.strip():
                        await db.execute(statement)
                await db.execute("INSERT INTO migrations (name, applied_at) VALUES (?, ?)", (name, time.time()))
            log.info("applied migration %s", name)
            applied.append(name)
        return applied

    # ------------------------------------------------------------ kv

    async def get_kv(self, key: str) -> str | None:
        row = await self._one("SELECT value FROM kv WHERE key = ?", (key,))
        return row["value"] if row else None

    async def set_kv(self, key: str, value: str) -> None:
        await self._write(
            "INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )
