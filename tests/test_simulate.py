"""`otabox simulate`: mix parsing and assignment, and small fleets against a real server."""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from otabox import cli
from otabox.cli.client import Client
from otabox.cli.simulate import (
    BEHAVIOURS,
    assign,
    create_devices,
    format_summary,
    parse_mix,
    parse_range,
    read_devices_csv,
)
from otabox.sim import fleet as fleet_mod
from otabox.sim.fleet import Fleet, FleetConfig
from tests.conftest import TOKEN, Server, wait_for
from tests.jobhooks import Recorder, offer_params, push

FIRMWARE = os.urandom(200_000)
ALL_MIX = {b: 1.0 for b in BEHAVIOURS}
EXPECTED = {  # the outcome each behaviour ends in, as the simulator sees it
    "success": "succeeded",
    "offline-mid-download": "succeeded",
    "churn": "succeeded",
    "delta": "succeeded",  # no delta offered here: like success
    "delta-broken": "succeeded",
    "download-fail": "failed",
    "verify-fail": "failed",
    "flash-fail": "failed",
    "decline": "failed",
    "wrong-version": "failed",
    "silent": "silent",
}
FAILURE_STEP = {"download-fail": -2, "verify-fail": -3, "flash-fail": -4, "decline": -5}


@pytest.fixture
def server_settings() -> dict[str, Any]:
    return {"scheduler_interval": 0.1}


# ---------------------------------------------------------------- pure parts


def test_parse_mix() -> None:
    assert parse_mix("success=90, download-fail=5,silent=5") == {"success": 90, "download-fail": 5, "silent": 5}
    assert parse_mix("churn") == {"churn": 1.0}
    for bad, words in [
        ("success=90,explode=10", "unknown behaviour"),
        ("success=1,success=2", "twice"),
        ("success=-1", "negative"),
        ("success=lots", "number"),
        ("silent=0", "positive"),
        ("", "positive"),
    ]:
        with pytest.raises(ValueError, match=words):
            parse_mix(bad)


def test_assign_gives_exact_shares_deterministically() -> None:
    mix = parse_mix("success=90,download-fail=5,silent=5")
    a = assign(1000, mix, seed=7)
    assert Counter(a) == {"success": 900, "download-fail": 50, "silent": 50}
    assert a == assign(1000, mix, seed=7)
    assert a != assign(1000, mix, seed=8)
    # Remainders go to the largest fractional parts; the total is always n.
    assert Counter(assign(10, {"success": 1, "silent": 1, "decline": 1}, seed=1)) == {
        "success": 4,
        "silent": 3,
        "decline": 3,
    }
    assert Counter(assign(len(BEHAVIOURS) * 2, ALL_MIX)) == {b: 2 for b in BEHAVIOURS}
    assert assign(0, mix) == []


def test_parse_range_and_csv(tmp_path: Path) -> None:
    assert parse_range("0.5-2") == (0.5, 2.0)
    assert parse_range("3") == (3.0, 3.0)
    assert parse_range("100k-1M") == (102400.0, 1048576.0)
    for bad in ("2-1", "a-b", "-1"):
        with pytest.raises(ValueError):
            parse_range(bad)
    path = tmp_path / "d.csv"
    path.write_text("deviceKey,deviceSecret,version\nd1,s1,2.0\nd2,s2\n\n")
    assert read_devices_csv(str(path), "1.0") == [("d1", "s1", "2.0"), ("d2", "s2", "1.0")]
    path.write_text("d1\n")
    with pytest.raises(ValueError, match=r"d\.csv:1"):
        read_devices_csv(str(path), "1.0")


# ---------------------------------------------------------------- fleets against a real server


def config(server: Server, **kw: Any) -> FleetConfig:
    kw.setdefault("flash_time", (0.01, 0.05))
    kw.setdefault("reboot_time", (0.05, 0.1))
    kw.setdefault("churn_interval", (0.05, 0.2))
    kw.setdefault("seed", 1)
    kw.setdefault("duration", 40)
    return FleetConfig(host="127.0.0.1", port=server.mqtt_port, product_key="pk1", **kw)


async def fleet_for(server: Server, mix: dict[str, float], n: int, prefix: str = "sim-", **kw: Any) -> Fleet:
    await server.product("pk1")
    api = Client(server.url, TOKEN)
    # The sync API client would block the loop that serves it: run it in a thread.
    devices = await asyncio.to_thread(create_devices, api, "pk1", n, prefix, "1.0.0")
    behaviours = assign(n, mix, seed=3)
    return Fleet(config(server, **kw), [(dk, s, v, b) for (dk, s, v), b in zip(devices, behaviours, strict=True)])


def outcomes_by_behaviour(summary: dict[str, Any]) -> dict[str, dict[str, int]]:
    return {b: e["outcomes"] for b, e in summary["behaviours"].items()}


async def test_push_fleet_every_behaviour(server: Server) -> None:
    rec = Recorder()
    server.gateway.jobs = rec  # stands in for the job engine: records what the server heard
    fleet = await fleet_for(server, ALL_MIX, 2 * len(BEHAVIOURS))
    fw = await server.firmware("pk1", "2.0.0", FIRMWARE)
    run = asyncio.create_task(fleet.run())
    await wait_for(lambda: _true(fleet.connected == len(fleet.devices)))
    await wait_for(lambda: _true(fleet.churns >= 2))  # idle churners drop and come back
    # Push like a job would; churning devices may be offline or drop a push, so push until taken.
    async with asyncio.timeout(20):
        while waiting := [d for d in fleet.devices if d.outcome == fleet_mod.WAITING]:
            for dev in waiting:
                push(server, dev.key, await offer_params(server, fw, dev.key))
            await asyncio.sleep(0.2)
    summary = await run

    assert summary["stoppedBy"] == "done"
    assert outcomes_by_behaviour(summary) == {b: {EXPECTED[b]: 2} for b in BEHAVIOURS}
    assert summary["outcomes"] == {"succeeded": 10, "failed": 10, "silent": 2}
    assert summary["resumedDownloads"] == 2 and summary["churnDisconnects"] >= 1
    assert summary["downloadedBytes"] >= 12 * len(FIRMWARE)
    assert "success" in format_summary(summary)

    # What the server was told, device by device.
    devices = {d["deviceKey"]: d for d in (await server.call("GET", "/products/pk1/devices?limit=100", 200))["items"]}
    for dev in fleet.devices:
        steps = rec.steps(dev.key)
        b = dev.behaviour
        if EXPECTED[b] == "succeeded":
            assert devices[dev.key]["version"] == "2.0.0", dev.key
            assert steps[0] == 0 and steps[-1] == 100 and all(s >= 0 for s in steps)
        elif b in FAILURE_STEP:
            assert steps[-1] == FAILURE_STEP[b] and devices[dev.key]["version"] == "1.0.0"
        elif b == "wrong-version":
            assert devices[dev.key]["version"] == "2.0.0-unexpected" and steps[-1] == 100
        else:
            assert b == "silent" and steps == []
        if b == "offline-mid-download":
            assert rec.versions(dev.key)[:2] == ["1.0.0", "1.0.0"]  # reconnected mid-download on the old version
    bytes_served = [await server.store.downloaded_bytes("pk1", d.key, fw["id"]) for d in fleet.devices]
    fetched = [n for n, d in zip(bytes_served, fleet.devices, strict=True) if d.behaviour not in ("silent", "decline")]
    assert len(fetched) == 18 and all(fetched)


async def _true(value: bool) -> bool:
    return value


async def test_request_mode_polls_for_offers(server: Server) -> None:
    rec = Recorder()
    server.gateway.jobs = rec
    fleet = await fleet_for(server, {"success": 3, "decline": 1}, 4, poll=0.2, request_mode=True)
    fw = await server.firmware("pk1", "2.0.0", FIRMWARE)
    for dev in fleet.devices:
        rec.offers_for[dev.key] = [await offer_params(server, fw, dev.key)]
    summary = await fleet.run()
    assert summary["mode"] == "request" and summary["stoppedBy"] == "done"
    assert outcomes_by_behaviour(summary) == {"success": {"succeeded": 3}, "decline": {"failed": 1}}


async def test_duration_stops_a_fleet_that_gets_no_offers(server: Server) -> None:
    fleet = await fleet_for(server, {"success": 1, "churn": 1}, 4, duration=0.5)
    summary = await fleet.run()
    assert summary["stoppedBy"] == "duration"
    assert summary["outcomes"] == {"waiting": 4}


async def test_push_job_end_to_end_counts_match_the_simulator(server: Server) -> None:
    mix: dict[str, float] = {"success": 4, "download-fail": 1, "verify-fail": 1, "flash-fail": 1, "decline": 1}
    mix |= {"wrong-version": 1, "offline-mid-download": 2, "churn": 2, "silent": 2}
    fleet = await fleet_for(server, mix, 15)
    fw = await server.firmware("pk1", "2.0.0", FIRMWARE)
    run = asyncio.create_task(fleet.run())
    keys = [d.key for d in fleet.devices]
    # Every device has said which version it runs before the job takes its snapshot.
    await wait_for(lambda: _all_on(server, keys, "1.0.0"))
    job = await server.call(
        "POST",
        "/jobs",
        201,
        json={
            "firmwareId": fw["id"],
            "type": "upgrade",
            "name": "rehearsal",
            "scope": {"deviceKeys": keys},
            "mode": "push",
            "timeoutSeconds": 4,
        },
    )
    summary = await run
    assert summary["stoppedBy"] == "done"
    assert outcomes_by_behaviour(summary) == {b: {EXPECTED[b]: n} for b, n in mix.items()}

    expected = {"succeeded": 8, "failed": 5, "timeout": 2}  # silent devices time out on the server
    assert summary["outcomes"] == {"succeeded": 8, "failed": 5, "silent": 2}
    shown = await wait_for(lambda: _counts_reached(server, job["id"], expected), timeout=15)
    assert {k: v for k, v in shown["counts"].items() if v} == expected
    assert shown["status"] == "completed"


async def _all_on(server: Server, keys: list[str], version: str) -> bool:
    listed = await server.call("GET", f"/products/pk1/devices?version={version}&limit=100", 200)
    return {d["deviceKey"] for d in listed["items"]} >= set(keys)


async def _counts_reached(server: Server, job_id: str, expected: dict[str, int]) -> Any:
    job = await server.call("GET", f"/jobs/{job_id}", 200)
    counts = {k: v for k, v in job["counts"].items() if v}
    return job if counts == expected and job["status"] == "completed" else None


async def test_cli_creates_devices_saves_them_and_reruns_from_csv(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await server.product("pk1")
    saved = tmp_path / "fleet.csv"
    base = ["simulate", "pk1", "--url", server.url, "--token", TOKEN, "--json", "--duration", "0.5"]
    # main() runs its own event loop: give it a thread so this loop keeps serving it.
    rc = await asyncio.to_thread(cli.main, [*base, "--devices", "3", "--prefix", "cli-", "--save-csv", str(saved)])
    first = json.loads(capsys.readouterr().out)
    assert rc == 0 and first["devices"] == 3 and first["stoppedBy"] == "duration"
    assert first["behaviours"] == {"success": {"assigned": 3, "outcomes": {"waiting": 3}}}
    assert saved.stat().st_mode & 0o777 == 0o600
    assert [row[0] for row in read_devices_csv(str(saved), "x")] == ["cli-0001", "cli-0002", "cli-0003"]

    rc = await asyncio.to_thread(cli.main, [*base, "--csv", str(saved), "--mix", "silent=1,churn=2"])
    again = json.loads(capsys.readouterr().out)
    assert rc == 0 and {b: e["assigned"] for b, e in again["behaviours"].items()} == {"silent": 1, "churn": 2}
    assert again["connectFailures"] == 0

    # Creating the same keys again is refused with a hint, before any device runs.
    rc = await asyncio.to_thread(cli.main, [*base, "--devices", "3", "--prefix", "cli-"])
    assert rc == 2 and "another --prefix" in capsys.readouterr().err


async def test_request_job_end_to_end(server: Server) -> None:
    fleet = await fleet_for(server, {"success": 3, "decline": 1}, 4, request_mode=True, poll=0.2)
    fw = await server.firmware("pk1", "2.0.0", FIRMWARE)
    keys = [d.key for d in fleet.devices]
    run = asyncio.create_task(fleet.run())
    await wait_for(lambda: _all_on(server, keys, "1.0.0"))
    body = {"firmwareId": fw["id"], "type": "upgrade", "name": "ask", "scope": {"deviceKeys": keys}, "mode": "request"}
    job = await server.call("POST", "/jobs", 201, json=body)
    summary = await run
    assert outcomes_by_behaviour(summary) == {"success": {"succeeded": 3}, "decline": {"failed": 1}}
    shown = await wait_for(lambda: _counts_reached(server, job["id"], {"succeeded": 3, "failed": 1}))
    assert shown["status"] == "completed"
