"""The upgrade log tells the truth, and mistakes get a clear refusal: real server, real MQTT devices."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from otabox import protocol, rollout
from otabox.models import Wave
from tests.conftest import Device, Server, serve_command, wait_for
from tests.test_jobs import counts, fleet, fw, job, status_is, task, task_is  # noqa: F401  (fw: fixture)

# The store behind these tests runs on SQLite and on PostgreSQL (tests/postgres.py).
pytestmark = pytest.mark.both_backends


@pytest.fixture
def server_settings() -> dict[str, Any]:
    return {"scheduler_interval": 0.1, "last_seen_interval": 0.2}


async def events(server: Server, job_id: str) -> list[dict[str, Any]]:
    raw = await server.call("GET", f"/events?jobId={job_id}", 200)
    return [json.loads(line) for line in raw.decode().splitlines()]


def task_rows(rows: list[dict[str, Any]], dk: str) -> list[tuple[str, str]]:
    return [(r["status"], r["kind"]) for r in rows if r["deviceKey"] == dk]


# ---------------------------------------------------------------- the log does not lie


async def test_cancel_writes_no_second_failure_and_job_rows_name_the_operator(
    server: Server,
    fw: dict[str, Any],  # noqa: F811
) -> None:
    devs = await fleet(server, {"bad": "1.0", "slow": "1.0"})
    bad, slow = await devs["bad"].connect("1.0"), await devs["slow"].connect("1.0")
    j = await job(server, fw, retry={"count": 3, "intervalSeconds": 3600})
    await bad.push()
    await bad.call(protocol.PROGRESS, {"step": -2, "desc": "download failed"})
    await task_is(server, j["id"], "bad", "failed")
    await slow.push()
    await server.call("POST", f"/jobs/{j['id']}/pause", 200)
    await server.call("POST", f"/jobs/{j['id']}/resume", 200)
    await server.call("POST", f"/jobs/{j['id']}/cancel", 200)
    rows = await events(server, j["id"])
    # The failure is logged once, when it happened; the cancel touches only the unfinished task.
    assert task_rows(rows, "bad") == [("pending", "state"), ("published", "state"), ("failed", "state")]
    assert task_rows(rows, "slow") == [("pending", "state"), ("published", "state"), ("canceled", "state")]
    job_rows = [(r["status"], r["actor"]) for r in rows if r["kind"] == "job"]
    assert job_rows == [("paused", "admin"), ("resumed", "admin"), ("canceled", "admin")]
    assert all(r["deviceKey"] == "" for r in rows if r["kind"] == "job")
    assert (await task(server, j["id"], "bad"))["retryAt"] is None  # no retry is due after a cancel
    for d in devs.values():
        await d.close()


async def test_abort_is_a_job_row_of_the_system_and_logs_no_second_failure(
    server: Server,
    fw: dict[str, Any],  # noqa: F811
) -> None:
    devs = await fleet(server, {f"d{i}": "1.0" for i in range(4)})
    conn = {dk: await d.connect("1.0") for dk, d in devs.items()}
    j = await job(server, fw, maxConcurrency=2, abort={"failureRatio": 0.5, "minFinished": 2})

    async def published() -> list[str]:
        pushed = [dk for dk in conn if (await task(server, j["id"], dk))["status"] == "published"]
        return pushed if len(pushed) == 2 else []

    first = await wait_for(published)
    for dk in first:
        await conn[dk].push()
        await conn[dk].call(protocol.PROGRESS, {"step": -3})
    await status_is(server, j["id"], "aborted")
    rows = await events(server, j["id"])
    for dk in first:
        assert [s for s, k in task_rows(rows, dk)].count("failed") == 1
    aborted = [r for r in rows if r["kind"] == "job"]
    assert [(r["status"], r["actor"]) for r in aborted] == [("aborted", "system")]
    assert "2 of 2" in aborted[0]["desc"]
    for d in conn.values():
        await d.close()


async def test_event_times_follow_the_log_order(server: Server, fw: dict[str, Any]) -> None:  # noqa: F811
    devs = await fleet(server, {f"d{i}": "1.0" for i in range(6)})
    conn = [await d.connect("1.0") for d in devs.values()]
    j = await job(server, fw)
    await asyncio.gather(*(d.upgrade() for d in conn))
    await status_is(server, j["id"], "completed")
    rows = await events(server, j["id"])
    stamps = [datetime.fromisoformat(r["ts"].replace("Z", "+00:00")) for r in rows]
    assert stamps == sorted(stamps)  # rows of one transaction share its time
    assert [r["seq"] for r in rows] == sorted(r["seq"] for r in rows)
    for dk in devs:
        mine = [s for r, s in zip(rows, stamps, strict=True) if r["deviceKey"] == dk]
        assert len(mine) == 4 and all(a < b for a, b in itertools.pairwise(mine)), dk
    assert rows[-1]["kind"] == "job" and rows[-1]["status"] == "completed" and rows[-1]["actor"] == "system"
    for d in conn:
        await d.close()


async def test_wave_gate_and_resume_are_job_rows(server: Server, fw: dict[str, Any]) -> None:  # noqa: F811
    devs = await fleet(server, {"a": "1.0", "b": "1.0"})
    a, b = await devs["a"].connect("1.0"), await devs["b"].connect("1.0")
    j = await job(server, fw, waves=[{"percent": 50, "successRatio": 1.0}, {"percent": 100}])
    await a.push()
    await a.call(protocol.PROGRESS, {"step": -1})
    paused = await status_is(server, j["id"], "paused")
    assert paused["waiting"] == {"reason": "waveGate"}
    await server.call("POST", f"/jobs/{j['id']}/resume", 200)
    await b.upgrade()
    await status_is(server, j["id"], "completed")
    rows = [(r["status"], r["actor"], r["wave"]) for r in await events(server, j["id"]) if r["kind"] == "job"]
    assert rows == [("paused", "system", 1), ("resumed", "admin", 2), ("completed", "system", None)]
    await a.close()
    await b.close()


# ---------------------------------------------------------------- rollback detection


async def test_a_device_back_on_its_old_version_is_rolled_back(server: Server, fw: dict[str, Any]) -> None:  # noqa: F811
    devs = await fleet(server, {"d1": "1.0", "d2": "1.0"})
    d1, d2 = await devs["d1"].connect("1.0"), await devs["d2"].connect("1.0")
    j = await job(server, fw, rollbackWatchSeconds=60)
    await d1.upgrade()
    await d2.upgrade()
    await status_is(server, j["id"], "completed")
    await d1.call(protocol.INFORM, {"version": "1.0"})  # the old image came back after "success"
    rolled = await task_is(server, j["id"], "d1", "rolledBack")
    assert rolled["desc"] == "rolled back to 1.0"
    assert (await counts(server, j["id"]))["rolledBack"] == 1
    await d2.call(protocol.INFORM, {"version": "2.0"})  # still on the new version: still a success
    assert (await task(server, j["id"], "d2"))["status"] == "succeeded"
    states = [s for s, _k in task_rows(await events(server, j["id"]), "d1")]
    assert states[-2:] == ["succeeded", "rolledBack"]
    # An operator may retry a rolled-back device.
    assert (await server.call("POST", f"/jobs/{j['id']}/tasks:retry", 200, json={"deviceKeys": ["d1"]}))["updated"] == 1
    await d1.close()
    await d2.close()


async def test_no_rollback_after_the_watch_period(server: Server, fw: dict[str, Any]) -> None:  # noqa: F811
    devs = await fleet(server, {"d1": "1.0"})
    d1 = await devs["d1"].connect("1.0")
    j = await job(server, fw, rollbackWatchSeconds=0.3)
    await d1.upgrade()
    await status_is(server, j["id"], "completed")
    await asyncio.sleep(0.5)
    await d1.call(protocol.INFORM, {"version": "1.0"})
    assert (await task(server, j["id"], "d1"))["status"] == "succeeded"
    await d1.close()


def test_rollbacks_count_as_failures_for_abort_and_waves() -> None:
    from otabox.models import TaskState

    assert rollout.should_abort({TaskState.SUCCEEDED: 1, TaskState.ROLLED_BACK: 1}, 0.5, 2)
    decision = rollout.wave_decision({TaskState.SUCCEEDED: 1, TaskState.ROLLED_BACK: 1}, Wave(50, 0.9), 1)
    assert decision.action == "pause"


# ---------------------------------------------------------------- clear refusals


async def test_downgrades_are_refused_unless_allowed(server: Server, fw: dict[str, Any]) -> None:  # noqa: F811
    devs = await fleet(server, {"new": "2.1", "old": "1.0"})
    for dk, v in (("new", "2.1"), ("old", "1.0")):
        await (await devs[dk].connect(v)).close()
    err = await job(server, fw, expect=400)
    assert err["error"]["code"] == "downgrade" and "new on 2.1" in err["error"]["message"]
    assert (await server.call("GET", "/jobs", 200))["total"] == 0
    ok = await job(server, fw, allowDowngrade=True)
    assert ok["total"] == 2 and ok["allowDowngrade"] is True


async def test_a_job_that_matches_nothing_is_refused_naming_why(server: Server, fw: dict[str, Any]) -> None:  # noqa: F811
    await fleet(server, {"d1": ""})
    await server.product("other")
    await server.device("elsewhere", "other")
    err = await job(server, fw, expect=400, scope={"versionNumbers": ["9.9"]})
    assert err["error"]["code"] == "empty" and "no device matches" in err["error"]["message"]
    err = await job(server, fw, expect=400, scope={"deviceKeys": ["d1", "ghost", "elsewhere"]})
    assert err["error"]["code"] == "unknown-devices"
    assert "ghost" in err["error"]["message"] and "elsewhere" in err["error"]["message"]
    assert "d1," not in err["error"]["message"]
    err = await job(server, fw, expect=400, bogus=1)
    assert "bogus" in err["error"]["message"]
    started = await job(server, fw, policy="incremental", scope={"versionNumbers": ["9.9"]})
    assert started["total"] == 0 and "starts empty" in started["warnings"][0]
    assert (await server.call("GET", "/jobs", 200))["total"] == 1


# ---------------------------------------------------------------- incremental waves


def test_joiners_fill_the_waves_in_order() -> None:
    waves = (Wave(10), Wave(50), Wave(100))
    per_wave = [0, 0, 0]
    for _ in range(20):
        per_wave[rollout.joiner_wave(per_wave, waves) - 1] += 1
    assert per_wave == [2, 8, 10]
    assert rollout.joiner_wave([0, 0], (Wave(50), Wave(100))) == 1  # the first joiner is the canary


async def test_devices_joining_an_incremental_job_start_in_its_first_wave(
    server: Server,
    fw: dict[str, Any],  # noqa: F811
) -> None:
    await server.product("pk1")
    j = await job(server, fw, policy="incremental", waves=[{"percent": 50}, {"percent": 100}])
    for dk in ("j1", "j2", "j3", "j4"):
        await server.device(dk, "pk1")
    tasks = (await server.call("GET", f"/jobs/{j['id']}/tasks", 200))["items"]
    assert sorted((t["deviceKey"], t["wave"]) for t in tasks) == [("j1", 1), ("j2", 2), ("j3", 1), ("j4", 2)]


# ---------------------------------------------------------------- why nothing happens


async def test_a_job_says_why_it_waits(server: Server, fw: dict[str, Any]) -> None:  # noqa: F811
    devs = await fleet(server, {"d1": "1.0", "d2": "1.0"})
    for d in devs.values():
        await (await d.connect("1.0")).close()
    offline = await job(server, fw, scope={"deviceKeys": ["d1"]})
    assert offline["waiting"] == {"reason": "devicesOffline"}
    assert offline["timeoutSeconds"] == 7200 and offline["rollbackWatchSeconds"] == 600  # its settings
    await server.call("POST", f"/jobs/{offline['id']}/pause", 200)
    assert (await server.call("GET", f"/jobs/{offline['id']}", 200))["waiting"] == {"reason": "paused"}
    await server.call("POST", f"/jobs/{offline['id']}/cancel", 200)
    now = datetime.now(UTC)
    closed = f"{(now + timedelta(hours=2)).hour:02d}:00", f"{(now + timedelta(hours=3)).hour:02d}:00"
    window = await job(server, fw, scope={"deviceKeys": ["d1"]}, schedule={"dailyWindow": list(closed)})
    assert window["waiting"]["reason"] == "outsideWindow"
    opens = datetime.fromisoformat(window["waiting"]["until"].replace("Z", "+00:00"))
    assert timedelta(hours=1) < opens - now <= timedelta(hours=2)
    await server.call("POST", f"/jobs/{window['id']}/cancel", 200)
    asking = await job(server, fw, mode="request", scope={"deviceKeys": ["d2"]})
    assert asking["waiting"] == {"reason": "awaitingRequests"}
    await server.call("POST", f"/jobs/{asking['id']}/cancel", 200)
    later = await job(
        server, fw, scope={"deviceKeys": ["d2"]}, schedule={"start": (now + timedelta(hours=1)).isoformat()}
    )
    assert later["status"] == "scheduled" and later["waiting"]["reason"] == "beforeStart"


async def test_concurrency_full_is_a_reason(server: Server, fw: dict[str, Any]) -> None:  # noqa: F811
    devs = await fleet(server, {"d1": "1.0", "d2": "1.0"})
    conn = [await d.connect("1.0") for d in devs.values()]
    j = await job(server, fw, maxConcurrency=1)

    async def reason() -> Any:
        return (await server.call("GET", f"/jobs/{j['id']}", 200))["waiting"]

    assert await wait_for(reason) == {"reason": "concurrencyFull"}
    for d in conn:
        await d.close()


# ---------------------------------------------------------------- lastSeen


async def test_last_seen_follows_an_active_device(server: Server) -> None:
    d = await server.device("d1")
    dev = await Device(server, "pk1", "d1", d["deviceSecret"]).connect("1.0")
    first = (await server.call("GET", "/products/pk1/devices/d1", 200))["lastSeen"]
    await asyncio.sleep(0.3)
    await dev.call(protocol.PROGRESS, {"step": 5})  # no task: a 404 reply, but the device was heard

    async def moved() -> Any:
        return (await server.call("GET", "/products/pk1/devices/d1", 200))["lastSeen"] > first

    assert await wait_for(moved)
    await dev.close()


# ---------------------------------------------------------------- one server per data dir


def test_a_second_server_on_the_same_data_dir_exits_with_a_clear_message(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {**os.environ, "OTABOX_ADMIN_TOKEN": "t"}
    first = subprocess.Popen(serve_command(data), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert first.stdout is not None
        for line in first.stdout:
            if "MQTT port" in line and "otabox" in line:
                break
        ports = json.loads((data / "ports.json").read_text())
        second = subprocess.run(serve_command(data), env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        assert "in use by another otabox server" in second.stderr and f"pid {first.pid}" in second.stderr
        assert json.loads((data / "ports.json").read_text()) == ports  # the first one's file is untouched
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0
    assert not (data / "ports.json").exists()  # removed on the clean stop


# ---------------------------------------------------------------- non-standard JSON


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
async def test_non_standard_json_numbers_are_refused_and_nothing_is_stored(
    server: Server,
    fw: dict[str, Any],  # noqa: F811
    number: str,
) -> None:
    await fleet(server, {"d1": "1.0"})
    body = f'{{"firmwareId": "{fw["id"]}", "timeoutSeconds": {number}}}'
    async with server.http.post(
        server.url + "/api/v1/jobs", data=body, headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid"
    assert (await server.call("GET", "/jobs", 200))["total"] == 0


async def test_deeply_nested_json_is_a_400(server: Server) -> None:
    body = "[" * 100_000 + "]" * 100_000
    async with server.http.post(
        server.url + "/api/v1/products", data=body, headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 400
