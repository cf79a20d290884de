"""Crash safety: SIGKILL a real server process mid-job, restart it, and the job completes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from otabox import protocol
from tests.conftest import TOKEN, Device, Server, serve_command, wait_for

# The store behind these tests runs on SQLite and on PostgreSQL (tests/postgres.py).
pytestmark = pytest.mark.both_backends


async def spawn(
    data_dir: Path,
    database: dict[str, str] | None = None,
    *extra: str,
    log: Path | None = None,
    env: dict[str, str] | None = None,
) -> tuple[asyncio.subprocess.Process, Server, aiohttp.ClientSession]:
    """`otabox serve` in another process on `data_dir` (and the `server_database` settings); its
    log appended to `log` if given, `env` added to its environment."""
    ports = data_dir / "ports.json"
    ports.unlink(missing_ok=True)
    url = (database or {}).get("database_url")
    # One name across restarts (the default, with a free MQTT port, names the process): the node
    # started again marks its own devices of the last run offline. `extra` may give another.
    node = ("--node-id", data_dir.name)
    proc = await asyncio.create_subprocess_exec(
        *serve_command(
            data_dir, "--scheduler-interval", "0.1", *(["--database-url", url] if url else []), *node, *extra
        ),
        env={**os.environ, "OTABOX_ADMIN_TOKEN": TOKEN, **(env or {})},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL if log is None else log.open("ab"),
    )

    async def ready() -> Any:
        if proc.returncode is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        return ports.exists() and json.loads(ports.read_text())

    bound = await wait_for(ready, timeout=30)
    http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"})
    server = Server(
        local_app=None,
        http=http,
        url=f"http://127.0.0.1:{bound['http']}",
        data_dir=data_dir,
        mqtt=bound["mqtt"],
    )
    return proc, server, http


@pytest.fixture
async def procs() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    started: list[asyncio.subprocess.Process] = []
    yield started
    for p in started:
        if p.returncode is None:
            p.kill()
            await p.wait()


async def test_kill_9_mid_job_then_restart_completes(
    tmp_path: Path, procs: list[Any], server_database: dict[str, str]
) -> None:
    data = tmp_path / "data"
    proc, server, http = await spawn(data, server_database)
    procs.append(proc)
    port = server.mqtt_port
    await server.product("pk1")
    fw = await server.firmware("pk1", "2.0", b"z" * 2048)
    devs = {}
    for dk in ("a", "b", "c"):
        secret = (await server.device(dk))["deviceSecret"]
        devs[dk] = Device(server, "pk1", dk, secret)
    for d in devs.values():
        await d.connect("1.0", port=port)
    job = await server.call(
        "POST", "/jobs", 201, json={"firmwareId": fw["id"], "maxConcurrency": 2, "timeoutSeconds": 300}
    )
    jid = job["id"]
    tasks = (await server.call("GET", f"/jobs/{jid}/tasks", 200))["items"]
    await wait_for(lambda: _count(server, jid, ("published",), 2))
    busy = [t["deviceKey"] for t in (await server.call("GET", f"/jobs/{jid}/tasks?status=published", 200))["items"]]
    first, second = devs[busy[0]], devs[busy[1]]
    await first.upgrade()
    await second.push()
    await second.call(protocol.PROGRESS, {"step": 40, "desc": "half way"})
    await wait_for(lambda: _count(server, jid, ("succeeded",), 1))
    before = (await server.call("GET", f"/events?jobId={jid}")).decode().splitlines()

    proc.kill()  # SIGKILL: no shutdown code runs
    assert await proc.wait() == -signal.SIGKILL
    for d in devs.values():
        await d.close()
    await http.close()

    proc, server, http = await spawn(data, server_database)
    procs.append(proc)
    port = server.mqtt_port
    after = (await server.call("GET", f"/events?jobId={jid}")).decode().splitlines()
    assert after[: len(before)] == before  # no committed event lost
    state = await server.call("GET", f"/jobs/{jid}", 200)
    assert state["status"] == "running" and state["counts"]["succeeded"] == 1
    assert state["counts"]["upgrading"] == 1
    shown = await server.call("GET", f"/products/pk1/devices/{second.dk}", 200)
    assert shown["online"] is False and shown["currentTask"]["status"] == "upgrading"

    for d in devs.values():
        d.server = server
        await d.connect(port=port)
    await second.call(protocol.INFORM, {"version": "2.0"})
    third = next(devs[dk] for dk in devs if dk not in busy)
    await third.upgrade()
    done = await wait_for(lambda: _job_done(server, jid))
    assert done["counts"]["succeeded"] == 3
    assert len(tasks) == 3
    for d in devs.values():
        await d.close()
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    await http.close()


async def _count(server: Server, jid: str, states: tuple[str, ...], n: int) -> bool:
    c: dict[str, int] = (await server.call("GET", f"/jobs/{jid}", 200))["counts"]
    return sum(c[s] for s in states) >= n


async def _job_done(server: Server, jid: str) -> Any:
    j = await server.call("GET", f"/jobs/{jid}", 200)
    return j if j["status"] == "completed" else None
