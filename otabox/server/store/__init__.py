"""The store: all SQL of the server, one module per noun over one connection (`base.py`).

`Store` is the union of the per-noun SQL classes; records come back as `otabox.models`
dataclasses built in `rows.py`; the schema is `migrations.py`. May import `otabox.models`,
`otabox.jobspec` and aiosqlite — nothing of the MQTT, jobs or HTTP layers.
"""

from __future__ import annotations

from otabox.server.store.accounts import AccountSQL
from otabox.server.store.base import DuplicateError
from otabox.server.store.deltas import DeltaSQL
from otabox.server.store.events import EventSQL
from otabox.server.store.firmware import FirmwareSQL
from otabox.server.store.identity import IdentitySQL
from otabox.server.store.jobs import JobLogEntry, JobSQL
from otabox.server.store.registry import RegistrySQL
from otabox.server.store.tasks import TaskSQL
from otabox.server.store.webhooks import WebhookSQL

__all__ = ["DuplicateError", "JobLogEntry", "Store"]


class Store(RegistrySQL, IdentitySQL, FirmwareSQL, DeltaSQL, JobSQL, TaskSQL, EventSQL, WebhookSQL, AccountSQL):
    """The SQLite store. Open with `await Store.open(path)`; `close()` is idempotent."""
