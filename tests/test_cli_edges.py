"""Command-line edges a user hits: OTABOX_DATA_DIR for export, a closed stdout pipe, and the
simulator in request mode following a job that grants retries."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from otabox.cli import main
from tests.conftest import TOKEN, Server, wait_for
from tests.test_simulate import FIRMWARE, _all_on, fleet_for


@pytest.fixture
def server_settings() -> dict[str, Any]:
    return {"scheduler_interval": 0.1}


async def test_export_reads_the_data_dir_named_by_otabox_data_dir(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await server.device("d1")
    monkeypatch.setenv("OTABOX_DATA_DIR", str(server.data_dir))
    monkeypatch.chdir(tmp_path)  # no ./otabox-data here: only the variable can name the data dir
    out = tmp_path / "x.csv"
    assert await asyncio.to_thread(main, ["export", "-o", str(out)]) == 0
    assert "d1" in (tmp_path / "x.devices.csv").read_text()


async def test_a_closed_stdout_pipe_is_not_an_error(server: Server) -> None:
    for i in range(300):
        await server.call("POST", "/products", 201, json={"productKey": f"p{i:03d}", "name": "x" * 100})
    read, write = os.pipe()
    os.close(read)  # like `| head` that has already exited
    env = {**os.environ, "OTABOX_TOKEN": TOKEN}
    cmd = [sys.executable, "-m", "otabox", "product", "list", "--url", server.url, "--limit", "300"]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=write, stderr=subprocess.PIPE, env=env)
    os.close(write)
    _, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert b"Traceback" not in err and b"cannot reach" not in err


async def test_request_mode_fleet_following_a_job_asks_again_for_granted_retries(server: Server) -> None:
    fleet = await fleet_for(server, {"download-fail": 2}, 2, request_mode=True, poll=0.2, until_stopped=True)
    fw = await server.firmware("pk1", "2.0.0", FIRMWARE)
    keys = [d.key for d in fleet.devices]
    run = asyncio.create_task(fleet.run())
    await wait_for(lambda: _all_on(server, keys, "1.0.0"))
    body = {"firmwareId": fw["id"], "mode": "request", "retry": {"count": 1, "intervalSeconds": 0.2}}
    job = await server.call("POST", "/jobs", 201, json=body)

    async def done() -> Any:
        j = await server.call("GET", f"/jobs/{job['id']}", 200)
        return j if j["status"] == "completed" else None

    finished = await wait_for(done, timeout=30)
    fleet.stop("job completed")
    await run
    assert finished["counts"]["failed"] == 2
    tasks = (await server.call("GET", f"/jobs/{job['id']}/tasks", 200))["items"]
    assert [t["attempt"] for t in tasks] == [2, 2]  # each device asked for, and got, its retry
