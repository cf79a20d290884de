"""`otabox db copy`: an all-in-one install's SQLite database into PostgreSQL, row for row, checked.

The source is read in one read transaction (one snapshot, even if something wrote meanwhile);
the target must be empty (its schema is made by the usual migrations, so both are at the same
version); every table is sent with PostgreSQL's COPY inside one transaction (a failed copy
leaves nothing behind); the identity columns' sequences continue after the copied rows. Then
each table is read back from both sides in primary-key order and compared: row counts and a
SHA-256 over every value. Firmware files are not in the database: they stay in the data dir.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from otabox.server.store import Store
from otabox.server.store.base import SQLiteBackend
from otabox.server.store.migrations import MIGRATIONS
from otabox.server.store.postgres import PostgresBackend

# Rows per read from SQLite and per COPY: memory stays flat whatever the table's size.
CHUNK = 5000


class CopyError(Exception):
    """The copy was refused or did not check out; nothing usable was written."""


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    columns: tuple[str, ...]
    types: tuple[str, ...]  # declared SQLite types: INTEGER, REAL, TEXT
    key: tuple[str, ...]  # primary key columns: the order both sides are read in for the check


@dataclass(frozen=True, slots=True)
class TableCopy:
    name: str
    rows: int
    sha256: str


async def _tables(src: Store) -> list[Table]:
    names = await src._all(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite%' ORDER BY name"
    )
    # Parents before children: the target checks each foreign key as the rows arrive.
    parents = {
        r["name"]: {f["table"] for f in await src._all(f'PRAGMA foreign_key_list("{r["name"]}")')} - {r["name"]}
        for r in names
    }
    order: list[str] = []
    while len(order) < len(parents):
        order += sorted(t for t, ps in parents.items() if t not in order and ps <= set(order))
    out = []
    for r in sorted(names, key=lambda r: order.index(r["name"])):
        info = await src._all(f'PRAGMA table_info("{r["name"]}")')
        key = tuple(c["name"] for c in sorted((c for c in info if c["pk"]), key=lambda c: c["pk"]))
        out.append(
            Table(
                r["name"],
                tuple(c["name"] for c in info),
                tuple(c["type"].upper() for c in info),
                key or tuple(c["name"] for c in info),
            )
        )
    return out


def _quoted(names: Sequence[str]) -> str:
    return ", ".join(f'"{n}"' for n in names)


def _normal(types: Sequence[str]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """A row as PostgreSQL's COPY wants it: REAL columns as floats (SQLite may hand back an int)."""
    real = [i for i, t in enumerate(types) if t == "REAL"]

    def convert(row: Sequence[Any]) -> tuple[Any, ...]:
        values = list(row)
        for i in real:
            if values[i] is not None:
                values[i] = float(values[i])
        return tuple(values)

    return convert


async def _chunks(store: Store, table: Table) -> AsyncIterator[list[tuple[Any, ...]]]:
    """A table's rows in primary-key order, CHUNK at a time (the same order on both backends)."""
    convert = _normal(table.types)
    select = f'SELECT {_quoted(table.columns)} FROM "{table.name}"'
    order = _quoted(table.key)
    single = len(table.key) == 1
    at = table.columns.index(table.key[0])
    offset, last = 0, None
    while True:
        if single and last is not None:  # keyset paging: each chunk costs the same
            found = await store._all(f"{select} WHERE {order} > ? ORDER BY {order} LIMIT ?", (last, CHUNK))
        else:
            found = await store._all(f"{select} ORDER BY {order} LIMIT ? OFFSET ?", (CHUNK, offset))
        if not found:
            return
        chunk = [convert(tuple(r[c] for c in table.columns)) for r in found]
        yield chunk
        offset += len(found)
        last = chunk[-1][at]


async def _digest(store: Store, table: Table) -> TableCopy:
    h = hashlib.sha256()
    rows = 0
    async for chunk in _chunks(store, table):
        for row in chunk:
            h.update(repr(row).encode())
        rows += len(chunk)
    return TableCopy(table.name, rows, h.hexdigest())


async def copy_database(
    source: Path, target_url: str, progress: Callable[[str, int], None] | None = None
) -> list[TableCopy]:
    """Copy the SQLite database at `source` into the empty PostgreSQL database at `target_url`.

    Returns each table's rows and digest, the same on both sides. Raises CopyError when the
    source is not at this version's schema, the target is not empty, or the check fails.
    """
    src = await Store.open(source, read_only=True)
    try:
        assert isinstance(src.backend, SQLiteBackend)
        applied = {r["name"] for r in await src._all("SELECT name FROM migrations")}
        missing = [name for name, _ in MIGRATIONS if name not in applied]
        if missing:
            raise CopyError(
                f"{source} is at an older schema (missing {missing[0]}): start this otabox on it once first"
            )
        dst = await Store.open(target_url)
        try:
            assert isinstance(dst.backend, PostgresBackend)
            await src.backend.db.execute("BEGIN")  # one snapshot of the source for the copy and its check
            try:
                tables = [t for t in await _tables(src) if t.name != "migrations"]
                try:
                    await _copy(src, dst.backend, tables, progress)
                except asyncpg.PostgresError as exc:
                    raise CopyError(f"PostgreSQL refused the copy (nothing was written): {exc}") from exc
                copied = [await _digest(src, t) for t in tables]
            finally:
                await src.backend.db.execute("COMMIT")
            for expected in copied:
                got = await _digest(dst, next(t for t in tables if t.name == expected.name))
                if got != expected:
                    raise CopyError(f"table {expected.name}: {got.rows} rows in PostgreSQL, {expected.rows} in SQLite")
            # The nodes' first statements are planned with these statistics (see `StoreBase.grew`).
            await dst.backend.analyze([t.name for t in tables])
            return copied
        finally:
            await dst.close()
    finally:
        await src.close()


async def _copy(
    src: Store, dst: PostgresBackend, tables: list[Table], progress: Callable[[str, int], None] | None
) -> None:
    conn = dst.write
    async with conn.transaction():
        for table in tables:
            if await conn.fetchval(f'SELECT EXISTS (SELECT 1 FROM "{table.name}")'):
                raise CopyError(f"the target database is not empty (table {table.name} has rows)")
        for table in tables:
            n = 0
            async for chunk in _chunks(src, table):
                await conn.copy_records_to_table(table.name, records=chunk, columns=list(table.columns))
                n += len(chunk)
                if progress is not None:
                    progress(table.name, n)
            # Identity columns go on after the copied rows, not from 1 (INTEGER PRIMARY KEY AUTOINCREMENT).
            for column in table.columns:
                sequence = await conn.fetchval("SELECT pg_get_serial_sequence($1, $2)", table.name, column)
                if sequence:
                    await conn.execute(
                        f'SELECT setval($1, COALESCE((SELECT MAX("{column}") FROM "{table.name}"), 0) + 1, false)',
                        sequence,
                    )
