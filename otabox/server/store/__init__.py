"""The store: all SQL of the server, one module per noun over one backend (`base.py`).

`Store` is the union of the per-noun SQL classes; records come back as `otabox.models`
dataclasses built in `rows.py`; the schema is `migrations.py`. The backend is SQLite (a file,
the default) or PostgreSQL (`postgres.py`, a `postgresql://` URL); the SQL is written once, in
SQLite's dialect, and `dialect.py` says it in PostgreSQL's. May import `otabox.models`,
`otabox.jobspec`, aiosqlite and asyncpg — nothing of the MQTT, jobs or HTTP layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Self

from otabox.server.store.accounts import AccountSQL
from otabox.server.store.base import Backend, DuplicateError, IntegrityError, SQLiteBackend, is_database_url
from otabox.server.store.deltas import DeltaSQL
from otabox.server.store.events import EventSQL
from otabox.server.store.files import FileSQL
from otabox.server.store.firmware import FirmwareSQL
from otabox.server.store.identity import IdentitySQL
from otabox.server.store.jobs import JobLogEntry, JobSQL
from otabox.server.store.nodes import NodeRow, NodeSQL
from otabox.server.store.registry import RegistrySQL
from otabox.server.store.tasks import TaskSQL
from otabox.server.store.webhooks import WebhookSQL

__all__ = ["DuplicateError", "IntegrityError", "JobLogEntry", "NodeRow", "Store", "is_database_url"]


class Store(
    RegistrySQL,
    IdentitySQL,
    FirmwareSQL,
    FileSQL,
    DeltaSQL,
    JobSQL,
    TaskSQL,
    EventSQL,
    WebhookSQL,
    AccountSQL,
    NodeSQL,
):
    """The store. Open with `await Store.open(path or postgresql:// URL)`; `close()` is idempotent."""

    @classmethod
    async def open(cls, target: Path | str, *, read_only: bool = False, node_id: str = "") -> Self:
        """Open (and migrate, unless read-only) a SQLite file at `target`, or the PostgreSQL
        database a `postgresql://` URL names; `node_id` names this node in presence rows.
        Raises OSError/ConnectionError when unreachable."""
        backend: Backend
        if is_database_url(target):
            # Imported here: asyncpg is loaded only by a server that uses PostgreSQL.
            from otabox.server.store.postgres import PostgresBackend

            backend = await PostgresBackend.open(str(target))
        else:
            backend = await SQLiteBackend.open(Path(target), read_only=read_only)
        store = cls(backend, node_id)
        if not read_only:
            try:
                await store.migrate()
            except BaseException:
                await backend.close()
                raise
        return store
