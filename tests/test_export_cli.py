"""`otabox job ...` and `otabox export` against a real server with real devices."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from otabox import analysis, cli, protocol
from tests.conftest import TOKEN, Device, Server, wait_for


@pytest.fixture
def server_settings() -> dict[str, Any]:
    return {"scheduler_interval": 0.1}


async def run(capsys: pytest.CaptureFixture[str], server: Server, *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(cli.main, [*argv, "--url", server.url, "--token", TOKEN])
    out, err = capsys.readouterr()
    return code, out, err


async def rollout(server: Server) -> tuple[str, dict[str, Device]]:
    """A small finished job: two successes and one download failure."""
    await server.product("pk1")
    fw = await server.firmware("pk1", "2.0", b"a" * 1000)
    devs = {}
    for dk in ("a", "b", "c"):
        devs[dk] = Device(server, "pk1", dk, (await server.device(dk))["deviceSecret"])
        await devs[dk].connect("1.0")
    job = await server.call(
        "POST", "/jobs", 201, json={"firmwareId": fw["id"], "waves": [{"percent": 50}, {"percent": 100}]}
    )
    for dk in ("a", "b"):
        await devs[dk].upgrade()
    await devs["c"].push()
    await devs["c"].call(protocol.PROGRESS, {"step": "-2", "desc": "download failed"})

    async def done() -> bool:
        status: str = (await server.call("GET", f"/jobs/{job['id']}", 200))["status"]
        return status == "completed"

    await wait_for(done)
    return job["id"], devs


async def test_job_cli_create_show_watch_tasks(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    await server.product("pk1")
    fw = await server.firmware("pk1", "2.0", b"a" * 10)
    d = Device(server, "pk1", "d1", (await server.device("d1"))["deviceSecret"])
    await d.connect("1.0")
    code, out, _ = await run(
        capsys,
        server,
        "job",
        "create",
        "--firmware",
        fw["id"],
        "--versions",
        "1.0",
        "--max-concurrency",
        "5",
        "--retry",
        "1",
        "--retry-interval",
        "1",
        "--waves",
        "50:0.9,100",
        "--json",
    )
    assert code == 0
    job = json.loads(out)
    assert job["scope"] == {"versionNumbers": ["1.0"]} and job["waves"][0] == {"percent": 50, "successRatio": 0.9}
    code, out, _ = await run(capsys, server, "job", "list")
    assert code == 0 and job["id"] in out and "0/1" in out
    await d.upgrade()
    code, out, _ = await run(capsys, server, "job", "watch", job["id"], "--interval", "0.1")
    assert code == 0 and "completed" in out and "succeeded 1" in out
    code, out, _ = await run(capsys, server, "job", "tasks", job["id"], "--json")
    assert json.loads(out)["items"][0]["status"] == "succeeded"
    code, out, err = await run(capsys, server, "job", "pause", job["id"])
    assert code == 1 and "409" in err
    await d.close()


async def test_export_from_data_dir_beside_running_server(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id, devs = await rollout(server)
    api_job = await server.call("GET", f"/jobs/{job_id}", 200)
    for ext in ("csv", "jsonl"):
        out_path = tmp_path / f"rollout.{ext}"
        code = await asyncio.to_thread(
            cli.main, ["export", "-o", str(out_path), "--data-dir", str(server.data_dir), "--json"]
        )
        out, _ = capsys.readouterr()
        assert code == 0, out
        summary = json.loads(out)
        assert summary["rows"]["jobs"] == 1 and summary["rows"]["devices"] == 3 and summary["rows"]["firmware"] == 1
        export = analysis.load(out_path)
        row = analysis.status_counts(export.events, job_id).iloc[0]
        assert {k: int(row[k]) for k in api_job["counts"]} == api_job["counts"]
        assert len(export.events) == summary["rows"]["events"] > 6
        assert set(export.events["wave"].dropna().astype(int)) == {1, 2}
        assert export.jobs.iloc[0]["succeeded"] == 2 and export.jobs.iloc[0]["failed"] == 1
        assert int(export.events["step"].min()) == -2
    # The same through the API.
    code, out, err = await run(capsys, server, "export", "-o", str(tmp_path / "api.csv"), "--job", job_id, "--json")
    assert code == 0, err
    assert json.loads(out)["rows"]["events"] == summary["rows"]["events"]
    assert (tmp_path / "api.csv").read_text().splitlines()[0].startswith("seq,ts,jobId")
    code = await asyncio.to_thread(
        cli.main, ["export", "-o", str(tmp_path / "x.txt"), "--data-dir", str(server.data_dir)]
    )
    assert code == 1 and "format" in capsys.readouterr().err
    for d in devs.values():
        await d.close()
