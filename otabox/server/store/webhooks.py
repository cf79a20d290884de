"""SQL of webhooks and their deliveries (sent by otabox.server.webhooks). A webhook's secret is
stored as the service gives it: encrypted with the server key."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from otabox.models import Delivery, DeliveryStatus, Event, Webhook
from otabox.server.store import rows
from otabox.server.store.base import StoreBase, Tx

CURSOR_KEY = "webhooks.cursor"  # kv: the last upgrade-log seq turned into deliveries


class WebhookSQL(StoreBase):
    async def create_webhook(self, hook: Webhook) -> None:
        await self._write(
            "INSERT INTO webhooks (id, url, events, secret, created_at, created_seq) VALUES (?, ?, ?, ?, ?, ?)",
            (hook.id, hook.url, json.dumps(list(hook.events)), hook.secret, hook.created_at, hook.created_seq),
        )

    async def list_webhooks(self) -> list[Webhook]:
        found = await self._all("SELECT * FROM webhooks ORDER BY created_at")
        return [rows.webhook(r) for r in found]

    async def get_webhook(self, webhook_id: str) -> Webhook | None:
        r = await self._one("SELECT * FROM webhooks WHERE id = ?", (webhook_id,))
        return None if r is None else rows.webhook(r)

    async def delete_webhook(self, webhook_id: str) -> bool:
        """The webhook and its delivery history; False when there was none."""

        async def op(tx: Tx) -> bool:
            await tx.execute("DELETE FROM webhook_deliveries WHERE webhook_id = ?", (webhook_id,))
            return bool(await tx.execute("DELETE FROM webhooks WHERE id = ?", (webhook_id,)))

        return await self.batched(op)

    async def last_event_seq(self) -> int:
        row = await self._one("SELECT COALESCE(MAX(seq), 0) AS n FROM events")
        return int(row["n"]) if row else 0

    async def events_after(self, seq: int, limit: int) -> list[Event]:
        found = await self._all("SELECT * FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit))
        return [rows.event(r) for r in found]

    async def enqueue_deliveries(self, items: Sequence[tuple[str, str, str]], cursor: int) -> None:
        """New deliveries (webhook id, type, body) and the log position they come from, in one
        transaction: a crash neither loses nor repeats one."""
        now = time.time()

        async def op(tx: Tx) -> None:
            await tx.executemany(
                "INSERT INTO webhook_deliveries (webhook_id, type, body, status, next_at, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(hook_id, kind, body, DeliveryStatus.PENDING, now, now) for hook_id, kind, body in items],
            )
            await tx.execute(
                "INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (CURSOR_KEY, str(cursor)),
            )

        await self.batched(op)

    async def due_deliveries(self, now: float, limit: int) -> list[Delivery]:
        found = await self._all(
            "SELECT * FROM webhook_deliveries WHERE status = ? AND next_at <= ? ORDER BY next_at LIMIT ?",
            (DeliveryStatus.PENDING, now, limit),
        )
        return [rows.delivery(r) for r in found]

    async def record_attempt(
        self, delivery_id: int, status: DeliveryStatus, http_status: int | None, error: str, next_at: float | None
    ) -> None:
        await self._write(
            "UPDATE webhook_deliveries SET status = ?, attempts = attempts + 1, last_status = ?, last_error = ?,"
            " next_at = ?, delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END WHERE id = ?",
            (status, http_status, error[:500], next_at, status, time.time(), delivery_id),
        )

    async def list_deliveries(self, webhook_id: str, limit: int, offset: int) -> tuple[list[Delivery], int]:
        found = await self._all(
            "SELECT * FROM webhook_deliveries WHERE webhook_id = ? ORDER BY id DESC LIMIT ? OFFSET ?",
            (webhook_id, limit, offset),
        )
        total = await self._one("SELECT COUNT(*) AS n FROM webhook_deliveries WHERE webhook_id = ?", (webhook_id,))
        return [rows.delivery(r) for r in found], total["n"] if total else 0
