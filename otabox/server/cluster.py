"""Several nodes on one PostgreSQL database: which one makes the job decisions, and what they tell each other.

One node at a time is the **leader**: it holds a session-level advisory lock on a connection of
its own. Only the leader ticks the job engine (timeouts, retries, waves, abort, completion,
pushes, the rate limit and the concurrency cap) and sends webhooks, so those decisions are made
in one place, exactly as on one node. The others try the lock every `LEADER_POLL` seconds: when
the leader dies its connection closes (a killed process at once; a dead host when PostgreSQL's
TCP keepalives give up, `KEEPALIVES` below), PostgreSQL drops the lock, and the first to try
again takes over. A leader that cannot reach the database steps down before it decides again.

Everything else goes over `LISTEN/NOTIFY` on one channel, batched into payloads below
PostgreSQL's 8000-byte limit. Messages are JSON lists `[op, ...]`:

- `d` deliver a message to a device: sent by whichever node wants it delivered and does not
  hold the device's connection; the node that holds it sends it.
- `s` a device's credentials changed (registry.DeviceSessions): every node drops its cache and
  ends the device's connection if it holds one.
- `k` something changed that the leader should look at soon (a task ended on another node).
- `j` jobs changed (created, paused, ...): every node reads its list of live jobs again.
- `c` / `r` a request-mode claim: the node holding the device asks the leader to move its task
  to published (the budget lives there), and the leader answers.

On SQLite there is one node (the data dir is locked), `Solo`: always the leader, and delivery is
the outbox's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from otabox import protocol
from otabox.server import pki
from otabox.server.keys import KEY_FILE, Keys, write_private
from otabox.server.mqtt.outbox import Outbox
from otabox.server.nodes import LEADER_KEY
from otabox.server.registry import DeviceSessions
from otabox.server.store import Store

if TYPE_CHECKING:
    from otabox.server.jobs.engine import JobEngine

log = logging.getLogger(__name__)

T = TypeVar("T")

CHANNEL = "otabox_cluster"
# Key of the advisory lock the leader holds (the schema lock is 0x07AB0C5).
LEADER_LOCK = 0x07AB0C6
LEADER_POLL = 1.0  # seconds between a follower's tries of the lock, and the leader's health checks
# How long the leader waits for the database to answer its health check before it steps down. Not
# a safety bound (a session that was ended fails at once): a node whose event loop lags for seconds
# under load (a connect storm) must not give up the leadership for a slow answer.
ANSWER_TIMEOUT = 5.0
# PostgreSQL's limit for a NOTIFY payload is 8000 bytes; room for the envelope.
PAYLOAD_MAX = 7800
# Messages kept while the database connection is down, at most (then the oldest are dropped).
QUEUE_MAX = 100_000
CLAIM_TIMEOUT = 3.0  # a device asking for an offer waits this long for the leader's answer
CONNECT_TIMEOUT = 10.0
# So that PostgreSQL notices a leader whose host died (no FIN ever comes) within ~11 s and drops
# its lock: 5 s idle, then 3 probes 2 s apart.
KEEPALIVES = {"tcp_keepalives_idle": "5", "tcp_keepalives_interval": "2", "tcp_keepalives_count": "3"}

# kv key of the files every node needs alike: the key that encrypts device secrets and signs
# download tokens, and the CA that signs device certificates.
SHARED_KEYS = "shared_keys"
SHARED_FILES = (KEY_FILE, f"{pki.CA_DIR}/{pki.CA_KEY}", f"{pki.CA_DIR}/{pki.CA_CERT}")
PUBLIC_FILES = (f"{pki.CA_DIR}/{pki.CA_CERT}",)


async def share_keys(store: Store, data_dir: Path) -> None:
    """Make this data dir's keys and CA the cluster's: the database's copy, or this one if it is the first.

    Before the keys are loaded. The first node to start puts its files (made now if missing) into
    the database; every other node writes the database's copy into its data dir, replacing files
    of its own that differ (a device registered through one node logs in on any, a download token
    made by one is good on all).
    """
    stored = await store.get_kv(SHARED_KEYS)
    if stored is None:
        Keys.load_or_create(data_dir)
        pki.CertificateAuthority.load_or_create(data_dir)
        mine = {name: base64.b64encode((data_dir / name).read_bytes()).decode() for name in SHARED_FILES}
        if await store.add_kv(SHARED_KEYS, json.dumps(mine)):
            log.info("this node's server key and CA are now the cluster's")
            return
        stored = await store.get_kv(SHARED_KEYS)
        assert stored is not None
    for name, text in json.loads(stored).items():
        if name not in SHARED_FILES:
            continue
        path, content = data_dir / name, base64.b64decode(text)
        if path.exists() and path.read_bytes() == content:
            continue
        if path.exists():
            log.warning("%s differs from the cluster's: replaced by the database's copy", path)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private(path, content)
        if name in PUBLIC_FILES:
            os.chmod(path, 0o644)


def _session_name(node_id: str) -> str:
    """The application_name of a node's cluster session (PostgreSQL keeps 63 bytes of it)."""
    return f"otabox {node_id}".encode()[:63].decode(errors="ignore")


class Solo:
    """The only node: always the leader; messages go straight to this node's outbox."""

    leader = True

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    def sessions_for(self, gateway: DeviceSessions) -> DeviceSessions:
        return gateway

    async def start(self, engine: JobEngine) -> None:
        pass

    async def stop(self) -> None:
        pass

    def deliver(self, product_key: str, device_key: str, suffix: str, payload: bytes, qos: int = 1) -> bool:
        return self.outbox.deliver(product_key, device_key, suffix, payload, qos)

    def kick_leader(self) -> None:
        pass  # the engine that kicked is the leader's

    def jobs_changed(self) -> None:
        pass

    async def confirm(self) -> bool:
        return True

    async def claim(self, job_id: str, device_key: str) -> bool:
        raise AssertionError("the only node is the leader: it claims itself")


# The registry.DeviceSessions methods another node may ask this one to run.
SESSION_CHANGES = frozenset({"forget", "require_certificate", "certificate_revoked", "product_changed"})


class Broadcast(DeviceSessions):
    """registry.DeviceSessions for the whole cluster: this node's gateway now, every other node by message."""

    def __init__(self, local: DeviceSessions, send: Callable[[list[Any]], None]) -> None:
        self.local = local
        self.send = send

    async def forget(self, product_key: str, device_key: str) -> None:
        self.send(["s", "forget", product_key, device_key])
        await self.local.forget(product_key, device_key)

    async def require_certificate(self, product_key: str, device_key: str, required: bool) -> None:
        self.send(["s", "require_certificate", product_key, device_key, required])
        await self.local.require_certificate(product_key, device_key, required)

    async def certificate_revoked(self, product_key: str, device_key: str, serial: str) -> None:
        self.send(["s", "certificate_revoked", product_key, device_key, serial])
        await self.local.certificate_revoked(product_key, device_key, serial)

    async def product_changed(self, product_key: str) -> None:
        self.send(["s", "product_changed", product_key])
        await self.local.product_changed(product_key)


class PostgresCluster:
    """This node among those sharing one PostgreSQL database."""

    def __init__(self, store: Store, url: str, node_id: str, outbox: Outbox, node_timeout: float) -> None:
        self.store = store
        self.node_timeout = node_timeout
        self.url = url
        self.node_id = node_id
        self.outbox = outbox
        self._gateway: DeviceSessions | None = None
        self.leader = False
        self.messages_in = 0
        self.messages_out = 0
        self._engine: JobEngine | None = None
        self._conn: asyncpg.Connection | None = None
        # asyncpg runs one operation at a time on a connection: the lock, the health check and
        # the NOTIFYs take turns.
        self._using = asyncio.Lock()
        self._queue: list[tuple[str | None, list[Any]]] = []
        self._flushing: asyncio.Task[None] | None = None
        self._kick_queued = False
        self._calls: dict[int, asyncio.Future[bool]] = {}
        self._ids = itertools.count(1)
        self._loop_task: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    def sessions_for(self, gateway: DeviceSessions) -> DeviceSessions:
        """What the registry tells of credential changes: this node's gateway, and every other node's."""
        self._gateway = gateway
        return Broadcast(gateway, self._send)

    # ------------------------------------------------------------ lifecycle

    async def start(self, engine: JobEngine) -> None:
        self._engine = engine
        await self._connect()
        await self._try_lead()
        self._loop_task = asyncio.create_task(self._leadership(), name="otabox-cluster-leadership")

    async def stop(self) -> None:
        tasks = [t for t in (self._loop_task, self._flushing) if t is not None]
        for task in [*tasks, *self._handlers]:
            task.cancel()
        await asyncio.gather(*tasks, *self._handlers, return_exceptions=True)
        self._loop_task = self._flushing = None
        if self._conn is not None:
            # Closing the connection releases the lock: a follower takes over within LEADER_POLL.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.close(), 5)
            self._conn = None
        self.leader = False

    async def _connect(self) -> None:
        # The session names its node (pg_stat_activity.application_name): `_unseat_silent_leader`
        # ends a session only if it is the silent node's.
        settings = {**KEEPALIVES, "application_name": _session_name(self.node_id)}
        conn = await asyncpg.connect(self.url, timeout=CONNECT_TIMEOUT, server_settings=settings)
        await conn.add_listener(CHANNEL, self._heard)
        self._conn = conn

    # ------------------------------------------------------------ leadership

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        async with self._using:
            if self._conn is None:
                raise ConnectionError("no database connection")
            return await self._guarded(self._conn.fetchval(sql, *args))

    async def _guarded(self, call: Awaitable[T]) -> T:
        """`call` on the connection; interrupted (a timeout, a stop), the connection is closed.

        asyncpg leaves a connection whose operation was cancelled busy until the server has
        answered the cancel; the next user would fail with "another operation is in progress"
        and drop the leadership. A new connection is made by the leadership loop.
        """
        try:
            return await call
        except asyncpg.PostgresError:
            raise  # the server answered: the connection is fine
        except BaseException:
            if self._conn is not None:
                self._conn.terminate()
                self._conn = None
            raise

    async def _try_lead(self) -> None:
        if await self._fetchval("SELECT pg_try_advisory_lock($1)", LEADER_LOCK):
            self.leader = True
            log.info("node %s is the leader: it makes the job decisions", self.node_id)
            await self.store.set_kv(LEADER_KEY, self.node_id)  # for GET /nodes
            if self._engine is not None:
                self._engine.jobs_changed()
                sent = await self._engine.resend_published()
                if sent:
                    log.info("%d push(es) of published tasks sent again by the new leader", sent)

    async def _leadership(self) -> None:
        while True:
            await asyncio.sleep(LEADER_POLL)
            try:
                if self._conn is None or self._conn.is_closed():
                    self._step_down("its database connection closed")
                    await self._connect()
                if self.leader:
                    # Proof the lock is still ours: the connection that holds it answers.
                    async with asyncio.timeout(ANSWER_TIMEOUT):
                        await self._fetchval("SELECT 1")
                else:
                    await self._try_lead()
                    if not self.leader:
                        await self._unseat_silent_leader()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._step_down(f"the database did not answer ({exc!r})")
                if self._conn is not None:
                    self._conn.terminate()
                    self._conn = None

    async def _unseat_silent_leader(self) -> None:
        """End the database session of a leader whose node stopped its heartbeats, so the lock is free.

        A leader that froze (a stopped process, a suspended VM) keeps its connection: the kernel
        still answers TCP keepalives, so PostgreSQL would keep its lock for ever.
        """
        holder = await self.store.get_kv(LEADER_KEY)
        if holder is None or holder == self.node_id:
            return
        node = next((n for n in await self.store.list_nodes() if n.node_id == holder), None)
        silent = time.time() - node.heartbeat_at if node is not None else 0.0
        if silent < self.node_timeout:
            return
        # A bigint advisory key shows in pg_locks as classid (high half), objid (low half), objsubid 1.
        # Only the silent node's session: the lock may have passed to another node whose note in
        # the kv (written through the group commit) has not landed yet; ending that one would
        # unseat a live leader.
        pid = await self._fetchval(
            "SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.classid = 0 AND l.objid = $1 AND l.objsubid = 1"
            " AND l.granted AND a.application_name = $2",
            LEADER_LOCK,
            _session_name(holder),
        )
        if pid is not None and await self._fetchval("SELECT pg_terminate_backend($1)", pid):
            log.warning("leader %s silent for %.0f s: its database session was ended to take over", holder, silent)

    async def confirm(self) -> bool:
        """Whether this node still leads, asked of the database: the engine asks before each tick, so
        a leader that froze and was unseated (`_unseat_silent_leader`) decides nothing on waking."""
        if not self.leader:
            return False
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT):
                await self._fetchval("SELECT 1")
            return True
        except Exception as exc:
            self._step_down(f"the database did not answer ({exc!r})")
            return False

    def _step_down(self, why: str) -> None:
        if self.leader:
            log.warning("node %s is no longer the leader: %s", self.node_id, why)
        self.leader = False

    # ------------------------------------------------------------ what the engine and the gateway call

    def deliver(self, product_key: str, device_key: str, suffix: str, payload: bytes, qos: int = 1) -> bool:
        """Send to the device here if this node holds its connection, else through the node that does."""
        if self.outbox.deliver(product_key, device_key, suffix, payload, qos):
            return True
        topic = protocol.topic_for(product_key, device_key, suffix)
        self._send(["d", product_key, device_key, topic, payload.decode(), qos])
        return True

    def kick_leader(self) -> None:
        if not self._kick_queued:
            self._kick_queued = True
            self._send(["k"])

    def jobs_changed(self) -> None:
        self._send(["j"])

    async def claim(self, job_id: str, device_key: str) -> bool:
        """Ask the leader to claim a pending task for an offer; False when it says no or does not answer."""
        call = next(self._ids)
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._calls[call] = answer
        self._send(["c", call, job_id, device_key])
        try:
            async with asyncio.timeout(CLAIM_TIMEOUT):
                return await answer
        except TimeoutError:
            log.warning("no answer from a leader to a claim for %s in job %s", device_key, job_id)
            return False
        finally:
            self._calls.pop(call, None)

    # ------------------------------------------------------------ sending

    def _send(self, message: list[Any], to: str | None = None) -> None:
        self._queue.append((to, message))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush(), name="otabox-cluster-send")

    async def _flush(self) -> None:
        # Let the callers of this loop iteration add theirs: a push batch goes out in few payloads.
        await asyncio.sleep(0)
        while self._queue:
            queue, self._queue = self._queue, []
            self._kick_queued = False
            payloads = _pack(self.node_id, queue)
            try:
                async with self._using:
                    if self._conn is None:
                        raise ConnectionError("no database connection")
                    notify = self._conn.executemany("SELECT pg_notify($1, $2)", [(CHANNEL, p) for p in payloads])
                    await self._guarded(notify)
                self.messages_out += len(queue)
            except Exception as exc:
                # Kept, in order, until the connection is back (the leadership loop reconnects):
                # a push lost here would leave its task published until it times out.
                self._queue = queue + self._queue
                if len(self._queue) > QUEUE_MAX:
                    log.warning("%d message(s) to other nodes dropped", len(self._queue) - QUEUE_MAX)
                    del self._queue[: len(self._queue) - QUEUE_MAX]
                log.warning("%d message(s) to other nodes waiting: %r", len(self._queue), exc)
                await asyncio.sleep(LEADER_POLL / 2)

    # ------------------------------------------------------------ receiving

    def _heard(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            envelope = json.loads(payload)
            sender, to, messages = envelope["from"], envelope.get("to"), envelope["m"]
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable cluster message ignored: %.200r", payload)
            return
        if sender == self.node_id or (to is not None and to != self.node_id):
            return
        for message in messages:
            self.messages_in += 1
            try:
                self._handle(sender, message)
            except Exception:
                log.exception("cluster message %.200r failed", message)

    def _handle(self, sender: str, message: list[Any]) -> None:
        op = message[0]
        engine = self._engine
        if op == "d":
            _, pk, dk, topic, payload, qos = message
            self.outbox.deliver_to(pk, dk, topic, payload.encode(), qos)
        elif op == "s":
            if self._gateway is not None and message[1] in SESSION_CHANGES:
                method: Callable[..., Awaitable[None]] = getattr(self._gateway, message[1])
                self._spawn(method(*message[2:]))
        elif op == "k":
            if self.leader and engine is not None:
                engine.kick()
        elif op == "j":
            if engine is not None:
                engine.jobs_changed_here()
        elif op == "c":
            if self.leader and engine is not None:
                self._spawn(self._answer_claim(sender, message[1], message[2], message[3]))
        elif op == "r":
            answer = self._calls.get(message[1])
            if answer is not None and not answer.done():
                answer.set_result(bool(message[2]))

    async def _answer_claim(self, sender: str, call: int, job_id: str, device_key: str) -> None:
        assert self._engine is not None
        job = await self.store.get_job(job_id)
        ok = job is not None and await self._engine.claim_offer(job, device_key, time.time())
        self._send(["r", call, ok], to=sender)

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)


def _pack(node_id: str, queue: list[tuple[str | None, list[Any]]]) -> list[str]:
    """Messages as NOTIFY payloads of at most PAYLOAD_MAX bytes, each to one node or to all (in order)."""
    out: list[str] = []
    batch: list[str] = []
    size = 0
    to: str | None = None

    def close() -> None:
        if batch:
            head = json.dumps({"from": node_id, "to": to})[:-1]
            out.append(f'{head}, "m": [{", ".join(batch)}]}}')

    for target, message in queue:
        text = json.dumps(message, separators=(",", ":"))
        if len(text.encode()) > PAYLOAD_MAX:
            log.warning("cluster message of %d bytes dropped (over %d): %.100s", len(text), PAYLOAD_MAX, text)
            continue
        if batch and (target != to or size + len(text.encode()) + 2 > PAYLOAD_MAX):
            close()
            batch, size = [], 0
        to = target
        batch.append(text)
        size += len(text.encode()) + 2
    close()
    return out
