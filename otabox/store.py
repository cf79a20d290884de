"""All SQL of otabox (with store_jobs.py and store_events.py, split by noun): one aiosqlite
connection in WAL mode, named ordered migrations.

Times are stored as REAL epoch seconds (UTC); enum values as TEXT, never ordinals.
Writes are serialised through one lock so a transaction never interleaves with another.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from otabox.store_events import EventsMixin
from otabox.store_jobs import MIGRATION_JOBS, JobsMixin

log = logging.getLogger(__name__)

Row = dict[str, Any]

MIGRATIONS: list[tuple[str, str]] = [
    (
        "0001_core",
        """
        CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE products (
            product_key TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE TABLE devices (
            product_key TEXT NOT NULL REFERENCES products(product_key),
            device_key TEXT NOT NULL,
            secret_enc TEXT NOT NULL,
            auth TEXT NOT NULL DEFAULT 'sign',
            version TEXT,
            online INTEGER NOT NULL DEFAULT 0,
            last_seen REAL,
            tags TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            PRIMARY KEY (product_key, device_key)
        );
        CREATE INDEX devices_version ON devices(product_key, version);
        CREATE TABLE firmware (
            id TEXT PRIMARY KEY,
            product_key TEXT NOT NULL REFERENCES products(product_key),
            name TEXT NOT NULL,
            version TEXT NOT NULL,
            desc TEXT NOT NULL DEFAULT '',
            size INTEGER NOT NULL,
            md5 TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            sign_method TEXT NOT NULL,
            file_name TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'unverified',
            enable_verification INTEGER NOT NULL DEFAULT 0,
            min_success_for_verified INTEGER NOT NULL DEFAULT 1,
            created_at REAL NOT NULL,
            UNIQUE (product_key, name),
            UNIQUE (product_key, version)
        );
        CREATE TABLE downloads (
            product_key TEXT NOT NULL,
            device_key TEXT NOT NULL,
            firmware_id TEXT NOT NULL,
            bytes INTEGER NOT NULL DEFAULT 0,
            requests INTEGER NOT NULL DEFAULT 0,
            updated_at REAL NOT NULL,
            PRIMARY KEY (product_key, device_key, firmware_id)
        );
        """,
    ),
    MIGRATION_JOBS,
    ("0003_firmware_signature", "ALTER TABLE firmware ADD COLUMN signature TEXT"),
]


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


def _tags(text: str | None) -> dict[str, str]:
    return json.loads(text) if text else {}


def _device_row(row: sqlite3.Row) -> Row:
    return {
        "productKey": row["product_key"],
        "deviceKey": row["device_key"],
        "version": row["version"],
        "online": bool(row["online"]),
        "lastSeen": row["last_seen"],
        "tags": _tags(row["tags"]),
        "auth": row["auth"],
        "createdAt": row["created_at"],
    }


def _firmware_row(row: sqlite3.Row) -> Row:
    return {
        "id": row["id"],
        "productKey": row["product_key"],
        "name": row["name"],
        "version": row["version"],
        "desc": row["desc"],
        "size": row["size"],
        "md5": row["md5"],
        "sha256": row["sha256"],
        "signMethod": row["sign_method"],
        "fileName": row["file_name"],
        "status": row["status"],
        "enableVerification": bool(row["enable_verification"]),
        "minSuccessForVerified": row["min_success_for_verified"],
        "signature": row["signature"],
        "createdAt": row["created_at"],
    }


class Store(JobsMixin, EventsMixin):
    """The SQLite store. Open with `await Store.open(path)`; `close()` is idempotent."""

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self.db = db
        self.path = path
        self._write_lock = asyncio.Lock()
        self._pending: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, path: Path, *, read_only: bool = False) -> Store:
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
                    outcomes = await self.db._execute(_run_batch, self.db._conn, [op for op, _ in batch])
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

    # ------------------------------------------------------------ products

    async def create_product(self, product_key: str, name: str) -> Row:
        now = time.time()
        await self._write(
            "INSERT INTO products (product_key, name, created_at) VALUES (?, ?, ?)", (product_key, name, now)
        )
        return {"productKey": product_key, "name": name, "createdAt": now}

    async def get_product(self, product_key: str) -> Row | None:
        row = await self._one(
            "SELECT p.*, (SELECT COUNT(*) FROM devices d WHERE d.product_key = p.product_key) AS devices"
            " FROM products p WHERE product_key = ?",
            (product_key,),
        )
        if row is None:
            return None
        return {
            "productKey": row["product_key"],
            "name": row["name"],
            "createdAt": row["created_at"],
            "devices": row["devices"],
        }

    async def list_products(self, limit: int, offset: int) -> tuple[list[Row], int]:
        rows = await self._all(
            "SELECT p.*, (SELECT COUNT(*) FROM devices d WHERE d.product_key = p.product_key) AS devices"
            " FROM products p ORDER BY product_key LIMIT ? OFFSET ?",
            (limit, offset),
        )
        total = await self._one("SELECT COUNT(*) AS n FROM products")
        items = [
            {
                "productKey": r["product_key"],
                "name": r["name"],
                "createdAt": r["created_at"],
                "devices": r["devices"],
            }
            for r in rows
        ]
        return items, total["n"] if total else 0

    # ------------------------------------------------------------ devices

    async def create_devices(self, product_key: str, devices: Iterable[tuple[str, str, str, dict[str, str]]]) -> None:
        """Insert (deviceKey, secret_enc, auth, tags) rows in one transaction. Raises DuplicateError."""
        now = time.time()
        rows = [(product_key, dk, enc, auth, json.dumps(tags, sort_keys=True), now) for dk, enc, auth, tags in devices]

        def op(db: sqlite3.Connection) -> None:
            try:
                db.executemany(
                    "INSERT INTO devices (product_key, device_key, secret_enc, auth, tags, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    rows,
                )
            except sqlite3.IntegrityError as exc:
                raise DuplicateError(str(exc)) from exc

        await self.batched(op)

    async def existing_device_keys(self, product_key: str, device_keys: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for i in range(0, len(device_keys), 500):
            chunk = list(device_keys[i : i + 500])
            marks = ",".join("?" * len(chunk))
            rows = await self._all(
                f"SELECT device_key FROM devices WHERE product_key = ? AND device_key IN ({marks})",
                (product_key, *chunk),
            )
            found.update(r["device_key"] for r in rows)
        return found

    async def get_device(self, product_key: str, device_key: str) -> Row | None:
        row = await self._one(
            "SELECT * FROM devices WHERE product_key = ? AND device_key = ?", (product_key, device_key)
        )
        return _device_row(row) if row else None

    async def device_credentials(self, product_key: str, device_key: str) -> tuple[str, str] | None:
        """(secret_enc, auth) of a device, or None when it does not exist."""
        row = await self._one(
            "SELECT secret_enc, auth FROM devices WHERE product_key = ? AND device_key = ?",
            (product_key, device_key),
        )
        return (row["secret_enc"], row["auth"]) if row else None

    async def list_devices(
        self,
        product_key: str,
        *,
        version: str | None = None,
        tags: dict[str, str] | None = None,
        online: bool | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[list[Row], int]:
        where = ["product_key = ?"]
        params: list[Any] = [product_key]
        if version is not None:
            where.append("version = ?")
            params.append(version)
        if online is not None:
            where.append("online = ?")
            params.append(1 if online else 0)
        for k, v in (tags or {}).items():
            where.append("json_extract(tags, ?) = ?")
            params.extend([f'$."{k}"', v])
        clause = " AND ".join(where)
        rows = await self._all(
            f"SELECT * FROM devices WHERE {clause} ORDER BY device_key LIMIT ? OFFSET ?",
            (*params, limit, offset),
        )
        total = await self._one(f"SELECT COUNT(*) AS n FROM devices WHERE {clause}", params)
        return [_device_row(r) for r in rows], total["n"] if total else 0

    async def set_device_online(self, product_key: str, device_key: str, online: bool) -> None:
        await self._write(
            "UPDATE devices SET online = ?, last_seen = ? WHERE product_key = ? AND device_key = ?",
            (1 if online else 0, time.time(), product_key, device_key),
        )

    async def set_device_version(self, product_key: str, device_key: str, version: str) -> None:
        await self._write(
            "UPDATE devices SET version = ?, last_seen = ? WHERE product_key = ? AND device_key = ?",
            (version, time.time(), product_key, device_key),
        )

    async def mark_all_offline(self) -> int:
        """At start-up nobody is connected yet, whatever the last run left behind."""
        return await self._write("UPDATE devices SET online = 0 WHERE online = 1")

    # ------------------------------------------------------------ firmware

    async def create_firmware(self, fw: Row) -> Row:
        """Insert a firmware row (keys as in the API). Raises DuplicateError on name/version clash."""
        now = time.time()
        await self._write(
            "INSERT INTO firmware (id, product_key, name, version, desc, size, md5, sha256, sign_method,"
            " file_name, enable_verification, min_success_for_verified, signature, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                fw["id"],
                fw["productKey"],
                fw["name"],
                fw["version"],
                fw.get("desc", ""),
                fw["size"],
                fw["md5"],
                fw["sha256"],
                fw["signMethod"],
                fw["fileName"],
                1 if fw.get("enableVerification") else 0,
                fw.get("minSuccessForVerified", 1),
                fw.get("signature"),
                now,
            ),
        )
        created = await self.get_firmware(fw["id"])
        assert created is not None
        return created

    async def firmware_conflict(self, product_key: str, name: str, version: str) -> str | None:
        row = await self._one(
            "SELECT name, version FROM firmware WHERE product_key = ? AND (name = ? OR version = ?)",
            (product_key, name, version),
        )
        if row is None:
            return None
        return "name" if row["name"] == name else "version"

    async def get_firmware(self, firmware_id: str) -> Row | None:
        row = await self._one("SELECT * FROM firmware WHERE id = ?", (firmware_id,))
        return _firmware_row(row) if row else None

    async def list_firmware(self, product_key: str | None, limit: int, offset: int) -> tuple[list[Row], int]:
        where, params = ("WHERE product_key = ?", [product_key]) if product_key else ("", [])
        rows = await self._all(
            f"SELECT * FROM firmware {where} ORDER BY created_at LIMIT ? OFFSET ?", (*params, limit, offset)
        )
        total = await self._one(f"SELECT COUNT(*) AS n FROM firmware {where}", params)
        return [_firmware_row(r) for r in rows], total["n"] if total else 0

    async def delete_firmware(self, firmware_id: str) -> bool:
        return await self._write("DELETE FROM firmware WHERE id = ?", (firmware_id,)) > 0

    async def sha256_in_use(self, sha256: str) -> bool:
        return await self._one("SELECT 1 FROM firmware WHERE sha256 = ? LIMIT 1", (sha256,)) is not None

    async def set_firmware_status(self, firmware_id: str, status: str) -> None:
        await self._write("UPDATE firmware SET status = ? WHERE id = ?", (status, firmware_id))

    # ------------------------------------------------------------ downloads

    async def add_download(self, product_key: str, device_key: str, firmware_id: str, nbytes: int) -> None:
        await self._write(
            "INSERT INTO downloads (product_key, device_key, firmware_id, bytes, requests, updated_at)"
            " VALUES (?, ?, ?, ?, 1, ?) ON CONFLICT(product_key, device_key, firmware_id)"
            " DO UPDATE SET bytes = bytes + excluded.bytes, requests = requests + 1, updated_at = excluded.updated_at",
            (product_key, device_key, firmware_id, nbytes, time.time()),
        )

    async def downloaded_bytes(self, product_key: str, device_key: str, firmware_id: str) -> int:
        row = await self._one(
            "SELECT bytes FROM downloads WHERE product_key = ? AND device_key = ? AND firmware_id = ?",
            (product_key, device_key, firmware_id),
        )
        return int(row["bytes"]) if row else 0

    # ------------------------------------------------------------ web console reads

    async def device_counts(self) -> dict[str, dict[str, int]]:
        """Devices online and offline per product: {productKey: {"online": n, "offline": m}}."""
        rows = await self._all("SELECT product_key, online, COUNT(*) AS n FROM devices GROUP BY product_key, online")
        out: dict[str, dict[str, int]] = {}
        for r in rows:
            out.setdefault(r["product_key"], {"online": 0, "offline": 0})["online" if r["online"] else "offline"] = r[
                "n"
            ]
        return out
