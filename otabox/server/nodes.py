"""This node among those sharing one database: its heartbeat, and the presence of a dead node's devices.

Every `node_heartbeat` seconds the node writes its row (time, connected devices) and marks
offline the devices held by any node silent for `node_timeout`: with several nodes alive, each
does it, which is harmless (the same UPDATE, finding nothing the second time). A node is `up`
while its heartbeat is younger than `node_timeout`. On SQLite there is one node by definition
(the data dir is locked): its row is the only one.

Times are each node's own clock (time.time()): nodes sharing a database keep their clocks in
step (NTP), well within the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import Protocol

from otabox.models import NodeState
from otabox.server.mqtt.outbox import Outbox
from otabox.server.store import Store

log = logging.getLogger(__name__)

# kv key naming the node that took the leadership last (otabox.server.cluster writes it).
LEADER_KEY = "leader_node"
# Heartbeats between two comparisons of this node's devices, one by one, with the database's.
FULL_CHECK_EVERY = 10


def default_node_id(mqtt_port: int) -> str:
    """Host name and MQTT port; with a free port (0) not known yet, host name and process id."""
    host = socket.gethostname()
    return f"{host}:{mqtt_port}" if mqtt_port > 0 else f"{host}:pid{os.getpid()}"


class Presence(Protocol):
    def online_here(self) -> set[tuple[str, str]]:
        """The devices connected to this node and online (not provisioning sessions)."""


class NodeService:
    """The heartbeat loop of this node and the list of nodes (`GET /api/v1/nodes`)."""

    def __init__(self, store: Store, outbox: Outbox, heartbeat: float, timeout: float) -> None:
        self.store = store
        self.outbox = outbox
        # The device gateway, once made (it comes after the first heartbeat): what `beat`
        # compares the database's presence with.
        self.presence: Presence | None = None
        self._beats = 0
        self.node_id = store.node_id
        self.heartbeat = heartbeat
        self.timeout = timeout
        self.started_at = time.time()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Mark this node's devices offline (it holds no connection yet), write its first heartbeat."""
        if self.store.dialect == "sqlite":
            await self.store.mark_all_offline()
            await self.store.forget_other_nodes(self.node_id)
        else:
            await self.store.mark_node_offline(self.node_id)
        await self.beat()
        self._task = asyncio.create_task(self._run(), name="otabox-heartbeat")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def beat(self) -> None:
        now = time.time()
        await self.store.heartbeat(self.node_id, self.started_at, now, self.outbox.connected_count())
        found = await self.store.mark_silent_nodes_offline(now - self.timeout)
        if found:
            log.warning("%d device(s) of a node silent for %.0f s shown offline", found, self.timeout)
        if self.presence is not None:
            await self._correct_presence(self.presence)

    async def _correct_presence(self, presence: Presence) -> None:
        """Show this node's devices as they are: a node only slow (its heartbeat late under load)
        had its devices shown offline by another, and nothing else would show them online again
        until they reconnect; a push only goes to devices shown online."""
        self._beats += 1
        here = presence.online_here()
        # Every heartbeat the counts; every FULL_CHECK_EVERY-th the sets (equal counts can hide a
        # device wrongly online and another wrongly offline).
        if self._beats % FULL_CHECK_EVERY and await self.store.count_online_on(self.node_id) == len(here):
            return
        shown = await self.store.online_on(self.node_id)
        here = presence.online_here()  # the same moment as `shown`, as near as it gets
        online, offline = sorted(here - shown), sorted(shown - here)
        if online or offline:
            await self.store.correct_presence(self.node_id, online, offline)
            log.warning(
                "presence corrected: %d connected device(s) shown online again, %d gone shown offline",
                len(online),
                len(offline),
            )

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            try:
                await self.beat()
            except Exception:
                log.exception("heartbeat failed")

    async def nodes(self) -> list[NodeState]:
        now = time.time()
        leader = self.node_id if self.store.dialect == "sqlite" else await self.store.get_kv(LEADER_KEY)
        out = []
        for n in await self.store.list_nodes():
            up = now - n.heartbeat_at < self.timeout
            out.append(NodeState(n.node_id, up, n.devices_connected, n.heartbeat_at, up and n.node_id == leader))
        return out
