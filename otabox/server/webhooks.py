"""Webhooks: the upgrade log, told to the operator's systems as signed JSON POSTs.

Two background loops, apart from everything else: `_collect` reads the upgrade log after its
cursor and turns each row a webhook subscribed to into a delivery row (with the cursor, in one
transaction, so a crash neither loses nor repeats a delivery); `_send` posts due deliveries,
a few at a time, each with its own timeout, and records the outcome, retrying with backoff.
The job engine and the broker never wait for either: a slow or dead receiver costs only its
own deliveries' time. Each POST carries `X-Otabox-Signature: sha256=<hex HMAC-SHA256 of the
body with the webhook's secret>`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from otabox import __version__
from otabox.errors import BadRequest, NotFound
from otabox.models import WEBHOOK_EVENTS, Delivery, DeliveryStatus, Webhook, iso, webhook_event
from otabox.server import present
from otabox.server.keys import Keys
from otabox.server.store import Store
from otabox.server.store.webhooks import CURSOR_KEY

log = logging.getLogger(__name__)

BATCH = 500  # log rows read per collect
MAX_ATTEMPTS = 10
BACKOFF_MAX = 3600.0  # seconds between attempts, at most (1, 2, 4, ... s before)
SIGNATURE_HEADER = "X-Otabox-Signature"


def signature(secret: str, body: bytes) -> str:
    """The value of the signature header of `body` (receivers compute the same and compare)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def backoff(attempts: int) -> float:
    """Seconds before attempt `attempts + 1`."""
    return float(min(BACKOFF_MAX, 2 ** max(0, attempts - 1)))


class WebhookService:
    def __init__(
        self,
        store: Store,
        keys: Keys,
        *,
        timeout: float,
        interval: float = 1.0,
        concurrency: int = 4,
        leading: Callable[[], bool] = lambda: True,
    ) -> None:
        self.store = store
        # With several nodes only the leader collects and sends (otabox.server.cluster): two
        # collectors would read the same cursor and queue every delivery twice.
        self.leading = leading
        self.keys = keys
        self.timeout = timeout
        self.interval = interval
        self._slots = asyncio.Semaphore(concurrency)
        self._sending: set[int] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._http: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------ subscriptions (the API)

    async def create(self, body: Mapping[str, Any]) -> Webhook:
        """Validate a POST /webhooks body and store the webhook. Raises BadRequest."""
        url, events, secret = body.get("url"), body.get("events"), body.get("secret")
        unknown = set(body) - {"url", "events", "secret"}
        if unknown:
            raise BadRequest(f"unknown field(s) {sorted(unknown)}")
        if not isinstance(url, str) or urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise BadRequest("url must be an http(s) URL")
        if not urllib.parse.urlsplit(url).hostname or len(url) > 2000:
            raise BadRequest("url must name a host (and be at most 2000 characters)")
        if not isinstance(events, list) or not events or not all(isinstance(e, str) for e in events):
            raise BadRequest(f"events must be a non-empty list of: {', '.join(WEBHOOK_EVENTS)}")
        bad = [e for e in events if e not in WEBHOOK_EVENTS]
        if bad:
            raise BadRequest(f"unknown event type(s) {bad}; known: {', '.join(WEBHOOK_EVENTS)}")
        if not isinstance(secret, str) or not 16 <= len(secret) <= 256:
            raise BadRequest("secret must be a string of 16 to 256 characters (the key of the HMAC)")
        hook = Webhook(
            id="wh-" + secrets.token_hex(6),
            url=url,
            events=tuple(dict.fromkeys(events)),
            secret=self.keys.encrypt(secret),
            created_at=time.time(),
            created_seq=await self.store.last_event_seq(),
        )
        await self.store.create_webhook(hook)
        return hook

    async def get(self, webhook_id: str) -> Webhook:
        hook = await self.store.get_webhook(webhook_id)
        if hook is None:
            raise NotFound(f"webhook {webhook_id!r} not found")
        return hook

    async def delete(self, webhook_id: str) -> None:
        if not await self.store.delete_webhook(webhook_id):
            raise NotFound(f"webhook {webhook_id!r} not found")

    # ------------------------------------------------------------ the loops

    async def start(self) -> None:
        if await self.store.get_kv(CURSOR_KEY) is None:
            # From now on: a first webhook is not sent the history of the log.
            await self.store.enqueue_deliveries([], await self.store.last_event_seq())
        self._http = aiohttp.ClientSession(headers={"User-Agent": f"otabox/{__version__}"})
        self._loops = [
            asyncio.create_task(self._forever(self.collect), name="otabox-webhooks-collect"),
            asyncio.create_task(self._forever(self.send_due), name="otabox-webhooks-send"),
        ]

    async def stop(self) -> None:
        for task in [*self._loops, *self._tasks]:
            task.cancel()
        await asyncio.gather(*self._loops, *self._tasks, return_exceptions=True)
        self._loops = []
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _forever(self, step: Any) -> None:
        while True:
            try:
                if self.leading():
                    await step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook loop step failed")
            try:
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

    async def collect(self) -> int:
        """Turn new upgrade-log rows into deliveries; how many were queued."""
        cursor = int(await self.store.get_kv(CURSOR_KEY) or 0)
        events = await self.store.events_after(cursor, BATCH)
        if not events:
            return 0
        hooks = await self.store.list_webhooks()
        items: list[tuple[str, str, str]] = []
        for ev in events:
            kind = webhook_event(ev.kind, ev.status)
            if kind is None:
                continue
            extra: dict[str, Any] = {}
            if kind == "firmware.verified" and any(kind in hook.events for hook in hooks):
                # The firmware as it is now (its name is not on the log row); null once deleted.
                fw = await self.store.get_firmware(ev.firmware_id)
                extra["firmware"] = present.firmware(fw) if fw else None
            for hook in hooks:
                if kind in hook.events and ev.seq > hook.created_seq:
                    body = {"type": kind, "ts": iso(time.time()), "webhookId": hook.id, "event": present.event(ev)}
                    items.append((hook.id, kind, json.dumps(body | extra, ensure_ascii=False)))
        await self.store.enqueue_deliveries(items, events[-1].seq)
        if items:
            self._wake.set()
        return len(items)

    async def send_due(self) -> None:
        """Start sending the deliveries that are due (at most one attempt in flight per delivery)."""
        due = await self.store.due_deliveries(time.time(), BATCH)
        for d in due:
            if d.id in self._sending:
                continue
            self._sending.add(d.id)
            task = asyncio.create_task(self._send(d))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, d: Delivery) -> None:
        try:
            async with self._slots:
                hook = await self.store.get_webhook(d.webhook_id)
                if hook is None:
                    return  # deleted meanwhile, with its deliveries
                status, error = await self._post(hook, d.body.encode())
            attempts = d.attempts + 1
            if status is not None and 200 <= status < 300:
                await self.store.record_attempt(d.id, DeliveryStatus.DELIVERED, status, "", None)
                return
            if attempts >= MAX_ATTEMPTS:
                log.warning("webhook %s: delivery %d failed %d times, giving up: %s", hook.id, d.id, attempts, error)
                await self.store.record_attempt(d.id, DeliveryStatus.FAILED, status, error, None)
            else:
                await self.store.record_attempt(
                    d.id, DeliveryStatus.PENDING, status, error, time.time() + backoff(attempts)
                )
        finally:
            self._sending.discard(d.id)

    async def _post(self, hook: Webhook, body: bytes) -> tuple[int | None, str]:
        """POST one delivery; (HTTP status or None, error text)."""
        assert self._http is not None
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature(self.keys.decrypt(hook.secret), body),
        }
        try:
            async with self._http.post(
                hook.url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=self.timeout)
            ) as resp:
                await resp.read()
                return resp.status, "" if resp.status < 300 else f"HTTP {resp.status}"
        except TimeoutError:
            return None, f"no answer within {self.timeout:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            return None, f"{type(exc).__name__}: {exc}"
