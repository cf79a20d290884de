"""A server at its open-files limit: more devices knock than it has descriptors for. It logs that
it is out of open files a few times, not a traceback per refused accept (asyncio's own handler
logged up to 4,096 per wake-up), and serves again once the connections are gone."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
from pathlib import Path

import aiohttp

from tests.conftest import TOKEN, serve_command, wait_for

LIMIT = 96  # the server's whole budget of descriptors (it starts with about 30 open)
KNOCKS = 300


def _low_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


async def test_running_out_of_open_files_is_a_few_warnings_and_passes(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *serve_command(tmp_path / "data", "--connect-timeout", "2"),
            env={**os.environ, "OTABOX_ADMIN_TOKEN": TOKEN},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=out,
            preexec_fn=_low_limit,
        )
    socks: list[socket.socket] = []
    try:
        ports_file = tmp_path / "data" / "ports.json"

        async def ready() -> bool:
            assert proc.returncode is None, log.read_text()
            return ports_file.exists()

        await wait_for(ready, timeout=30)
        ports = json.loads(ports_file.read_text())
        # Raw TCP connections, no CONNECT: the kernel completes them from the listen queue
        # whether or not the server can accept them.
        for _ in range(KNOCKS):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", ports["mqtt"]))
            except BlockingIOError:
                pass
            socks.append(s)

        async def refused() -> bool:  # the server ran out of descriptors and said so
            return "open files exhausted" in log.read_text(errors="replace")

        await wait_for(refused, timeout=15)
        # A duration, not an event: three more of asyncio's one-second accept retries, all
        # within one 10 s report of the quieter handler (stock logs each retry's failures).
        await asyncio.sleep(3)
        for s in socks:
            s.close()
        socks.clear()

        async def healthy() -> bool:
            try:
                async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{ports['http']}/healthz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        assert await wait_for(healthy, timeout=20)  # serving again
        text = log.read_text(errors="replace")
        # Without the quieter handler: ~70,000 lines of "out of system resource" in those 4 s.
        assert 1 <= text.count("open files exhausted") <= 3, text[-3000:]
        assert text.count("Traceback") == 0 and "out of system resource" not in text.replace(
            "open files exhausted", ""
        ), text[-3000:]
    finally:
        for s in socks:
            s.close()
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
