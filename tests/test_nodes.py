"""Nodes sharing one database: heartbeats, GET /api/v1/nodes, presence per node.

On SQLite (and on PostgreSQL, in process) one node lists itself with its connected devices. On a
real PostgreSQL, two real `otabox serve` processes on one database both list each other up; after
`kill -9` of one, the other shows it down and its devices offline within seconds, and the killed
node started again marks offline only its own devices, never those of the live one.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from otabox.server.nodes import FULL_CHECK_EVERY
from tests.conftest import Device, Server, wait_for
from tests.test_restart import procs, spawn  # noqa: F401  (procs: the fixture that kills what is left)

pytestmark = pytest.mark.both_backends

# Short enough for a test of seconds; the heartbeat stays well under the timeout.
HEARTBEAT, TIMEOUT = 0.3, 2.0
FAST = ("--node-heartbeat", str(HEARTBEAT), "--node-timeout", str(TIMEOUT))


@pytest.fixture
def server_settings() -> dict[str, Any]:
    return {"node_heartbeat": HEARTBEAT, "node_timeout": TIMEOUT, "node_id": "solo"}


async def test_one_node_lists_itself_with_its_devices(server: Server) -> None:
    secret = (await server.device("d1"))["deviceSecret"]
    d1 = await Device(server, "pk1", "d1", secret).connect("1.0")

    async def one_device() -> Any:
        items = (await server.call("GET", "/nodes", 200))["items"]
        return items if items[0]["devicesConnected"] == 1 else None

    items = await wait_for(one_device)
    assert [(n["nodeId"], n["status"]) for n in items] == [("solo", "up")]
    assert items[0]["lastHeartbeat"].endswith("Z")
    await d1.close()


async def test_a_slow_node_shows_its_devices_online_again(server: Server) -> None:
    """Another node found this one's heartbeat late and showed its devices offline (the UPDATE
    below is that node's); the next heartbeat shows them as they are, online, and shows offline
    a device the database wrongly has here."""
    secret = (await server.device("d1"))["deviceSecret"]
    await server.device("ghost")
    d1 = await Device(server, "pk1", "d1", secret).connect("1.0")

    async def shown(dk: str, online: bool) -> bool:
        return bool((await server.call("GET", f"/products/pk1/devices/{dk}", 200))["online"] is online)

    assert await wait_for(lambda: shown("d1", True))
    await server.store._write("UPDATE devices SET online = 0, node_id = NULL WHERE device_key = 'd1'")
    await server.store._write("UPDATE devices SET online = 1, node_id = 'solo' WHERE device_key = 'ghost'")
    assert await shown("d1", False) and await shown("ghost", True)
    # Equal counts (one wrongly offline, one wrongly online): found by the full comparison.
    every = HEARTBEAT * FULL_CHECK_EVERY
    assert await wait_for(lambda: shown("d1", True), timeout=every + 3)
    assert await shown("ghost", False)
    await server.store._write("UPDATE devices SET online = 0, node_id = NULL WHERE device_key = 'd1'")
    assert await wait_for(lambda: shown("d1", True), timeout=HEARTBEAT + 3)  # the counts differ: at once
    # A push reaches it again: it is pending for an online device.
    fw = await server.firmware("pk1", "2.0", b"x" * 1000)
    await server.call("POST", "/jobs", 201, json={"firmwareId": fw["id"], "scope": {"deviceKeys": ["d1"]}})
    assert (await d1.push())["version"] == "2.0"
    await d1.close()


async def test_a_dead_nodes_devices_go_offline_on_the_live_one(
    tmp_path: Path,
    postgres_url: str,
    procs: list[Any],  # noqa: F811
) -> None:
    database = {"database_url": postgres_url}
    proc_a, a, http_a = await spawn(tmp_path / "a", database, "--node-id", "a", *FAST)
    procs.append(proc_a)
    # The key that protects device secrets is in the data dir (not yet in the database): share it.
    (tmp_path / "b").mkdir(mode=0o700)
    shutil.copy2(tmp_path / "a" / "server.key", tmp_path / "b" / "server.key")
    proc_b, b, http_b = await spawn(tmp_path / "b", database, "--node-id", "b", *FAST)
    procs.append(proc_b)
    try:
        secrets = {dk: (await a.device(dk))["deviceSecret"] for dk in ("on-a", "on-b")}
        on_a = await Device(a, "pk1", "on-a", secrets["on-a"]).connect("1.0")
        await Device(b, "pk1", "on-b", secrets["on-b"]).connect("1.0")

        async def nodes(server: Server, want: dict[str, tuple[str, int]]) -> bool:
            items = (await server.call("GET", "/nodes", 200))["items"]
            return {n["nodeId"]: (n["status"], n["devicesConnected"]) for n in items} == want

        async def online(server: Server, dk: str, want: bool) -> bool:
            return bool((await server.call("GET", f"/products/pk1/devices/{dk}", 200))["online"] is want)

        both_up = {"a": ("up", 1), "b": ("up", 1)}
        assert await wait_for(lambda: nodes(a, both_up)) and await wait_for(lambda: nodes(b, both_up))
        assert await online(a, "on-b", True)

        proc_b.kill()  # SIGKILL: b writes nothing more, its device's row still says online
        assert await proc_b.wait() == -signal.SIGKILL
        loop = asyncio.get_running_loop()
        killed = loop.time()
        assert await wait_for(lambda: online(a, "on-b", False), timeout=TIMEOUT + 5)
        assert loop.time() - killed < TIMEOUT + 2 * HEARTBEAT + 1  # within the timeout and a heartbeat
        assert await wait_for(lambda: nodes(a, {"a": ("up", 1), "b": ("down", 1)}))
        assert await online(a, "on-a", True)

        # b again, under its name: it marks offline only its own devices, on-a stays online.
        await http_b.close()
        proc_b, b, http_b = await spawn(tmp_path / "b", database, "--node-id", "b", *FAST)
        procs.append(proc_b)
        assert await wait_for(lambda: nodes(a, {"a": ("up", 1), "b": ("up", 0)}))
        assert await online(b, "on-a", True)
        await on_a.close()
        assert await wait_for(lambda: online(b, "on-a", False))
    finally:
        await http_a.close()
        await http_b.close()
