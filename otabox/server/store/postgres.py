"""The PostgreSQL backend (asyncpg): a pool for reads, one connection for the group commits.

Writes keep SQLite's shape: one batch at a time, in one transaction on the write connection,
each op failing alone. Savepoints cost two round trips per op, so a batch runs first without
them; only when an op fails is it rolled back and run again with one savepoint per op (so an
op may run twice: it does database work only, and sees the same rows the second time).
Reads run on the pool beside it and see what was committed. Every statement is said in
PostgreSQL's dialect by `dialect.postgres` (cached).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg

from otabox.server.store.base import Backend, IntegrityError, Op, Row
from otabox.server.store.dialect import postgres

log = logging.getLogger(__name__)

# Read connections: concurrent HTTP and console reads. Each costs the server a process
# (~10 MB); several nodes share the database's max_connections (100 by default).
READ_POOL_SIZE = 8
# A database that does not answer a connect within this is reported, not waited for.
CONNECT_TIMEOUT = 10.0
# Key of the advisory lock that lets one node at a time migrate the schema.
SCHEMA_LOCK = 0x07AB0C5


def _numeric(text: str) -> int | float:
    # SUM over BIGINT gives NUMERIC; SQLite gives an integer (a real for REAL columns).
    return float(text) if "." in text or "e" in text.lower() else int(text)


async def _init(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("numeric", encoder=str, decoder=_numeric, schema="pg_catalog", format="text")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """A read connection going back to the pool is left as it is. asyncpg's default reset (advisory
    locks, cursors, LISTEN, settings) is a round trip per read, and reads set none of those; an
    open transaction is still rolled back by the pool itself."""


def _rowcount(status: str) -> int:
    """Rows an INSERT/UPDATE/DELETE changed, from its command tag ("UPDATE 3", "INSERT 0 1")."""
    last = status.rpartition(" ")[2]
    return int(last) if last.isdigit() else -1


class PostgresTx:
    """Tx over the write connection, inside the batch's transaction."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        try:
            return _rowcount(await self.conn.execute(postgres(sql), *params))
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise IntegrityError(str(exc)) from exc

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            await self.conn.executemany(postgres(sql), rows)
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise IntegrityError(str(exc)) from exc

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        found: list[Row] = await self.conn.fetch(postgres(sql), *params)
        return found

    async def lock_schema(self) -> None:
        await self.conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)


class PostgresBackend(Backend):
    name = "postgresql"

    def __init__(self, url: str, pool: asyncpg.Pool, write: asyncpg.Connection) -> None:
        self.url = url
        self.pool = pool
        self.write = write

    @classmethod
    async def open(cls, url: str) -> PostgresBackend:
        pool = await asyncpg.create_pool(
            url,
            min_size=1,
            max_size=READ_POOL_SIZE,
            init=_init,
            timeout=CONNECT_TIMEOUT,
            reset=_keep_session,
        )
        try:
            write = await cls._connect(url)
        except BaseException:
            await pool.close()
            raise
        return cls(url, pool, write)

    @staticmethod
    async def _connect(url: str) -> asyncpg.Connection:
        conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)
        await _init(conn)
        return conn

    async def fetch(self, sql: str, params: Sequence[Any]) -> list[Row]:
        found: list[Row] = await self.pool.fetch(postgres(sql), *params)
        return found

    async def analyze(self, tables: Sequence[str]) -> None:
        await self.pool.execute("ANALYZE " + ", ".join(f'"{t}"' for t in tables))

    async def run_batch(self, ops: list[Op[Any]]) -> list[tuple[bool, Any]]:
        if self.write.is_closed():  # the server restarted or dropped us: a new connection for this batch
            log.warning("PostgreSQL write connection was closed; reconnecting")
            self.write = await self._connect(self.url)
        # Optimistic first: the batch without savepoints (each costs two round trips, and ops
        # almost never fail). When one does, the transaction is rolled back and the batch run
        # again, each op in its own savepoint, so only the failing ones fail.
        done = await self._attempt(ops, savepoints=False)
        if done is None:
            done = await self._attempt(ops, savepoints=True)
        assert done is not None
        return done

    async def _attempt(self, ops: list[Op[Any]], *, savepoints: bool) -> list[tuple[bool, Any]] | None:
        """The batch in one transaction; None (rolled back) when an op failed without savepoints."""
        conn = self.write
        tx = PostgresTx(conn)
        out: list[tuple[bool, Any]] = []
        transaction = conn.transaction()
        await transaction.start()
        try:
            for op in ops:
                if not savepoints:
                    try:
                        out.append((True, await op(tx)))
                    except Exception as exc:
                        await transaction.rollback()
                        return [(False, exc)] if len(ops) == 1 else None
                    continue
                try:
                    async with conn.transaction():  # nested: a savepoint
                        out.append((True, await op(tx)))
                except Exception as exc:
                    out.append((False, exc))
        except BaseException:
            with contextlib.suppress(Exception):
                await transaction.rollback()
            raise
        await transaction.commit()
        return out

    async def close(self) -> None:
        try:
            await self.write.close()
        finally:
            await self.pool.close()
