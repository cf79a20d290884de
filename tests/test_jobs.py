"""Batch upgrade jobs end to end: real server, real MQTT devices, real store."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from otabox import protocol
from otabox.server.jobs import engine
from tests.conftest import Device, Server, wait_for

# The store behind these tests runs on SQLite and on PostgreSQL (tests/postgres.py).
pytestmark = pytest.mark.both_backends


@pytest.fixture
def server_settings() -> dict[str, Any]:
    # Short scheduler ticks keep the tests quick; decisions are the same.
    return {"scheduler_interval": 0.1}


async def fleet(server: Server, spec: dict[str, str], pk: str = "pk1") -> dict[str, Device]:
    """Register devices {dk: version} (version "" = never informs) and return them unconnected."""
    out = {}
    for dk in spec:
        d = await server.device(dk, pk)
        out[dk] = Device(server, pk, dk, d["deviceSecret"])
    return out


async def job(server: Server, fw: dict[str, Any], expect: int = 201, **body: Any) -> dict[str, Any]:
    data: dict[str, Any] = await server.call("POST", "/jobs", expect, json={"firmwareId": fw["id"], **body})
    return data


async def counts(server: Server, job_id: str) -> dict[str, int]:
    c: dict[str, int] = (await server.call("GET", f"/jobs/{job_id}", 200))["counts"]
    return c


async def status_is(server: Server, job_id: str, status: str) -> dict[str, Any]:
    async def check() -> Any:
        j = await server.call("GET", f"/jobs/{job_id}", 200)
        return j if j["status"] == status else None

    j: dict[str, Any] = await wait_for(check)
    return j


async def task(server: Server, job_id: str, dk: str) -> dict[str, Any]:
    tasks = (await server.call("GET", f"/jobs/{job_id}/tasks?limit=1000", 200))["items"]
    return next(t for t in tasks if t["deviceKey"] == dk)


async def task_is(server: Server, job_id: str, dk: str, status: str) -> dict[str, Any]:
    async def check() -> Any:
        t = await task(server, job_id, dk)
        return t if t["status"] == status else None

    t: dict[str, Any] = await wait_for(check)
    return t


@pytest.fixture
async def fw(server: Server) -> dict[str, Any]:
    await server.product("pk1")
    return await server.firmware("pk1", "2.0", b"\x01" * 5000)


async def test_push_to_a_mixed_fleet(server: Server, fw: dict[str, Any]) -> None:
    devs = await fleet(server, {"in1": "1.0", "in2": "1.0", "old": "0.9", "late": "1.0", "done": "2.0"})
    for dk, v in [("in1", "1.0"), ("in2", "1.0"), ("old", "0.9"), ("done", "2.0")]:
        await devs[dk].connect(v)
    # "late" is in scope by version but offline; register its version through a short visit.
    await devs["late"].connect("1.0")
    await devs["late"].close()
    j = await job(server, fw, scope={"versionNumbers": ["1.0"]}, maxConcurrency=10)
    assert j["status"] == "running" and j["total"] == 3  # in1, in2, late; not old, not done
    for dk in ("in1", "in2"):
        params = await devs[dk].upgrade()
        assert params["version"] == "2.0" and params["fileSize"] == 5000 and params["jobId"] == j["id"]
        assert params["sign"] == fw["sha256"] and params["signMethod"] == "sha256"
        await task_is(server, j["id"], dk, "succeeded")
    assert devs["old"].queue(protocol.UPGRADE).empty()
    # The offline device is pushed when it connects (from the store, not a broker queue).
    assert (await task(server, j["id"], "late"))["status"] == "pending"
    await devs["late"].connect("1.0")
    await devs["late"].upgrade()
    done = await status_is(server, j["id"], "completed")
    assert done["counts"]["succeeded"] == 3
    shown = await server.call("GET", "/products/pk1/devices/in1", 200)
    assert shown["version"] == "2.0" and shown["currentTask"] is None
    for d in devs.values():
        await d.close()


async def test_offline_push_is_resent_on_reconnect(server: Server, fw: dict[str, Any]) -> None:
    devs = await fleet(server, {"d1": "1.0"})
    d = await devs["d1"].connect("1.0")
    j = await job(server, fw)
    await d.push()
    await d.close()  # went away before confirming
    await d.connect()
    params = await d.push()  # the store still says it is owed the push
    assert params["jobId"] == j["id"]
    await d.call(protocol.PROGRESS, {"step": 10})
    await d.call(protocol.INFORM, {"version": "2.0"})
    await status_is(server, j["id"], "completed")
    await d.close()


async def test_request_mode_offers_and_confirmation(server: Server, fw: dict[str, Any]) -> None:
    devs = await fleet(server, {"in": "1.0", "out": "0.5"})
    din, dout = await devs["in"].connect("1.0"), await devs["out"].connect("0.5")
    j = await job(server, fw, mode="request", scope={"versionNumbers": ["1.0"]})
    assert (await dout.call(protocol.GETVERSION, {}))["data"] == []
    reply = await din.call(protocol.GETVERSION, {})
    assert reply["code"] == 200 and len(reply["data"]) == 1
    offer = reply["data"][0]
    assert offer["version"] == "2.0" and offer["fileUrl"].startswith(server.url + "/firmware/")
    assert (await task(server, j["id"], "in"))["status"] == "published"
    # The alias topic works too and offers the same.
    assert (await din.call(protocol.REQUEST, {}))["data"][0]["version"] == "2.0"
    assert din.queue(protocol.UPGRADE).empty()  # nothing is pushed in request mode
    assert (await din.call(protocol.PROGRESS, {"step": "5", "desc": "confirmed"}))["code"] == 200
    t = await task(server, j["id"], "in")
    assert t["status"] == "upgrading" and t["progress"] == 5
    await din.call(protocol.INFORM, {"version": "2.0"})
    await status_is(server, j["id"], "completed")
    await din.close()
    await dout.close()


async def test_concurrency_cap_and_progress_never_backwards(server: Server, fw: dict[str, Any]) -> None:
    keys = [f"d{i}" for i in range(5)]
    devs = await fleet(server, dict.fromkeys(keys, "1.0"))
    for d in devs.values():
        await d.connect("1.0")
    j = await job(server, fw, maxConcurrency=2)
    seen_max = 0
    done = 0
    while done < 5:
        c = await counts(server, j["id"])
        seen_max = max(seen_max, c["published"] + c["upgrading"])
        assert c["published"] + c["upgrading"] <= 2
        for d in devs.values():
            if not d.queue(protocol.UPGRADE).empty():
                await d.push()
                await d.call(protocol.PROGRESS, {"step": "60"})
                await d.call(protocol.PROGRESS, {"step": "30"})  # out of order: recorded as 60
                t = await task(server, j["id"], d.dk)
                assert t["progress"] == 60
                c = await counts(server, j["id"])
                # Sampled while this device is in flight too, not only between pushes: a fast engine
                # can publish, and devices finish, between two samples at the loop's top.
                seen_max = max(seen_max, c["published"] + c["upgrading"])
                assert c["published"] + c["upgrading"] <= 2
                await d.call(protocol.INFORM, {"version": "2.0"})
                done += 1
        await asyncio.sleep(0.05)
    assert seen_max == 2
    await status_is(server, j["id"], "completed")
    for d in devs.values():
        await d.close()


@pytest.mark.parametrize("server_settings", [{"scheduler_interval": 60}])
async def test_a_fan_out_larger_than_a_batch_goes_on_without_waiting_for_ticks(
    server: Server, fw: dict[str, Any], monkeypatch: Any
) -> None:
    """A job without limits pushes batch after batch at once, not one batch per scheduler tick."""
    monkeypatch.setattr(engine, "PUSH_BATCH", 2)
    devs = await fleet(server, dict.fromkeys([f"d{i}" for i in range(7)], "1.0"))
    for d in devs.values():
        await d.connect("1.0")
    await job(server, fw)
    for d in devs.values():
        await d.push(timeout=10)  # four batches; the next tick is a minute away
    for d in devs.values():
        await d.close()


async def test_rate_limit(server: Server, fw: dict[str, Any]) -> None:
    devs = await fleet(server, {f"d{i}": "1.0" for i in range(4)})
    for d in devs.values():
        await d.connect("1.0")
    j = await job(server, fw, ratePerMinute=60)  # one push per second
    await wait_for(lambda: _published_at_least(server, j["id"], 4), timeout=15)
    tasks = (await server.call("GET", f"/jobs/{j['id']}/tasks", 200))["items"]
    times = sorted(datetime.fromisoformat(t["publishedAt"].replace("Z", "+00:00")) for t in tasks)
    # One push at once, then one per second: the i-th push is at least ~i seconds after the
    # first, however slow the machine (a slow machine only pushes later, never sooner).
    for i, t in enumerate(times):
        assert (t - times[0]).total_seconds() >= i * 0.9, times
    for d in devs.values():
        await d.close()


async def _published_at_least(server: Server, job_id: str, n: int) -> bool:
    c = await counts(server, job_id)
    return c["published"] + c["upgrading"] + c["succeeded"] >= n


async def test_schedule_window_pushes_nothing_outside(server: Server, fw: dict[str, Any]) -> None:
    devs = await fleet(server, {"d1": "1.0"})
    d = await devs["d1"].connect("1.0")
    now = datetime.now(UTC)
    later = (now + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    j1 = await job(server, fw, schedule={"start": later})
    assert j1["status"] == "scheduled"
    await server.call("POST", f"/jobs/{j1['id']}/cancel", 200)
    # A daily window that closed an hour ago: the job runs but pushes nothing.
    lo = (now - timedelta(hours=3)).strftime("%H:%M")
    hi = (now - timedelta(hours=1)).strftime("%H:%M")
    j2 = await job(server, fw, schedule={"dailyWindow": [lo, hi], "timezoneOffsetMinutes": 0})
    assert j2["status"] == "running"
    ticks = server.services.engine.ticks
    await wait_for(lambda: _ticked(server, ticks + 3))
    assert (await counts(server, j2["id"]))["pending"] == 1
    assert d.queue(protocol.UPGRADE).empty()
    await server.call("POST", f"/jobs/{j2['id']}/cancel", 200)
    # Open window (same local time expressed with an offset): pushed.
    lo = (now - timedelta(minutes=30) + timedelta(minutes=120)).strftime("%H:%M")
    hi = (now + timedelta(minutes=30) + timedelta(minutes=120)).strftime("%H:%M")
    j3 = await job(server, fw, schedule={"dailyWindow": [lo, hi], "timezoneOffsetMinutes": 120})
    assert (await d.push())["jobId"] == j3["id"]
    await d.close()


async def _ticked(server: Server, n: int) -> bool:
    return server.services.engine.ticks >= n


async def test_timeout_of_silent_device(server: Server, fw: dict[str, Any]) -> None:
    devs = await fleet(server, {"quiet": "1.0", "slow": "1.0"})
    quiet, slow = await devs["quiet"].connect("1.0"), await devs["slow"].connect("1.0")
    j = await job(server, fw, timeoutSeconds=1, retry={"count": 3, "intervalSeconds": 0})
    await quiet.push()  # and never reports
    await slow.push()
    await slow.call(protocol.PROGRESS, {"step": 1})
    t = await task_is(server, j["id"], "quiet", "timeout")
    assert t["attempt"] == 1  # timeouts are not retried
    t = await task_is(server, j["id"], "slow", "timeout")
    done = await status_is(server, j["id"], "completed")
    assert done["counts"]["timeout"] == 2
    await quiet.close()
    await slow.close()


async def test_progress_after_an_operator_cancel_or_retry(server: Server, fw: dict[str, Any]) -> None:
    """A report is decided on the task as stored when it is written: a task canceled through the
    API between two reports refuses the next one (nothing written), and once retried and pushed
    again it reports afresh in its new attempt."""
    devs = await fleet(server, {"d1": "1.0", "d2": "1.0"})
    d1, d2 = await devs["d1"].connect("1.0"), await devs["d2"].connect("1.0")
    j = await job(server, fw)
    await d1.push()
    await d2.push()
    for step in ("10", "40"):
        assert (await d1.call(protocol.PROGRESS, {"step": step}))["code"] == 200
    assert (await task(server, j["id"], "d1"))["status"] == "upgrading"
    canceled = await server.call("POST", f"/jobs/{j['id']}/tasks:cancel", 200, json={"deviceKeys": ["d1"]})
    assert canceled["updated"] == 1
    reply = await d1.call(protocol.PROGRESS, {"step": "50", "desc": "late"})
    assert (reply["code"], reply["message"]) == (404, "no active upgrade task")
    t = await task(server, j["id"], "d1")
    assert (t["status"], t["progress"]) == ("canceled", 40)
    raw = await server.call("GET", f"/events?jobId={j['id']}", 200)
    d1_log = [(e["status"], e["kind"], e["step"]) for e in map(json.loads, raw.decode().splitlines())
              if e["deviceKey"] == "d1"]  # fmt: skip
    assert d1_log[-3:] == [("upgrading", "state", 10), ("upgrading", "progress", 40), ("canceled", "state", 40)]
    assert (await d2.call(protocol.PROGRESS, {"step": "20"}))["code"] == 200  # the other task is untouched
    retried = await server.call("POST", f"/jobs/{j['id']}/tasks:retry", 200, json={"deviceKeys": ["d1"]})
    assert retried["updated"] == 1
    await d1.push()
    assert (await d1.call(protocol.PROGRESS, {"step": "5"}))["code"] == 200
    t = await task(server, j["id"], "d1")
    assert (t["status"], t["progress"], t["attempt"]) == ("upgrading", 5, 2)
    assert (await task(server, j["id"], "d2"))["progress"] == 20
    await d1.close()
    await d2.close()


async def test_retry_after_device_failure_counts_attempts(server: Server, fw: dict[str, Any]) -> None:
    devs = await fleet(server, {"d1": "1.0"})
    d = await devs["d1"].connect("1.0")
    j = await job(server, fw, retry={"count": 1, "intervalSeconds": 0.2})
    await d.push()
    assert (await d.call(protocol.PROGRESS, {"step": "-2", "desc": "download failed: reset"}))["code"] == 200
    t = await task(server, j["id"], "d1")
    assert t["status"] in ("failed", "pending", "published") and t["attempt"] in (1, 2)
    await d.push()  # second attempt
    t = await task(server, j["id"], "d1")
    assert t["attempt"] == 2
    await d.call(protocol.PROGRESS, {"step": "-4", "desc": "flash"})
    t = await task_is(server, j["id"], "d1", "failed")
    assert t["step"] == -4 and t["desc"] == "flash" and t["attempt"] == 2
    done = await status_is(server, j["id"], "completed")  # no third attempt
    assert done["counts"]["failed"] == 1
    # An operator retry gives it attempt 3 and reopens the job.
    assert (await server.call("POST", f"/jobs/{j['id']}/tasks:retry", 200, json={"deviceKeys": ["d1"]}))["updated"] == 1
    await d.upgrade()
    t = await task_is(server, j["id"], "d1", "succeeded")
    assert t["attempt"] == 3
    await d.close()


async def test_abort_on_failure_ratio_stops_pushes(server: Server, fw: dict[str, Any]) -> None:
    devs = await fleet(server, {f"d{i}": "1.0" for i in range(6)})
    for d in devs.values():
        await d.connect("1.0")
    j = await job(server, fw, maxConcurrency=2, abort={"failureRatio": 0.5, "minFinished": 2})
    await wait_for(lambda: _published_at_least(server, j["id"], 2))
    tasks = (await server.call("GET", f"/jobs/{j['id']}/tasks?status=published", 200))["items"]
    first = [devs[t["deviceKey"]] for t in tasks]
    assert len(first) == 2
    for d in first:
        await d.push()
        await d.call(protocol.PROGRESS, {"step": "-3", "desc": "bad signature"})
    aborted = await status_is(server, j["id"], "aborted")
    assert "2 of 2" in aborted["statusReason"]
    c = aborted["counts"]
    # A slot freed by the first failure may have been refilled before the second one.
    assert c["failed"] == 2 and c["pending"] == 0 and c["canceled"] + c["published"] == 4
    canceled = (await server.call("GET", f"/jobs/{j['id']}/tasks?status=canceled", 200))["items"]
    ticks = server.services.engine.ticks
    await wait_for(lambda: _ticked(server, ticks + 3))
    for t in canceled:
        assert devs[t["deviceKey"]].queue(protocol.UPGRADE).empty()
        assert t["desc"] == "job aborted"
    for d in devs.values():
        await d.close()


async def test_waves_pause_below_success_ratio_then_resume(server: Server, fw: dict[str, Any]) -> None:
    devs = await fleet(server, {f"d{i}": "1.0" for i in range(4)})
    for d in devs.values():
        await d.connect("1.0")
    j = await job(server, fw, waves=[{"percent": 50, "successRatio": 1.0}, {"percent": 100}])
    assert j["currentWave"] == 1
    wave1 = [
        t["deviceKey"] for t in (await server.call("GET", f"/jobs/{j['id']}/tasks", 200))["items"] if t["wave"] == 1
    ]
    assert len(wave1) == 2
    await devs[wave1[0]].upgrade()
    await devs[wave1[1]].push()
    await devs[wave1[1]].call(protocol.PROGRESS, {"step": "-4"})
    paused = await status_is(server, j["id"], "paused")
    assert paused["statusReason"].startswith("wave 1 below 100 % success")
    assert paused["counts"]["pending"] == 2
    for dk in devs:
        if dk not in wave1:
            assert devs[dk].queue(protocol.UPGRADE).empty()
    resumed = await server.call("POST", f"/jobs/{j['id']}/resume", 200)
    assert resumed["status"] == "running" and resumed["currentWave"] == 2
    for dk in devs:
        if dk not in wave1:
            await devs[dk].upgrade()
    done = await status_is(server, j["id"], "completed")
    assert done["counts"] == {**done["counts"], "succeeded": 3, "failed": 1}
    for d in devs.values():
        await d.close()


async def test_a_device_with_no_known_version_takes_its_first_report_as_the_source(
    server: Server, fw: dict[str, Any]
) -> None:
    """A device that never reported a version gets a task with no source version. Its first
    report after connecting can cross the push: that report is the version it is leaving, not
    an unexpected one (before, the task failed and the device's progress got 404)."""
    devs = await fleet(server, {"first": "", "second": ""})
    j = await job(server, fw, maxConcurrency=1)
    assert {t["fromVersion"] for t in (await server.call("GET", f"/jobs/{j['id']}/tasks", 200))["items"]} == {None}
    first = await devs["first"].connect()  # no inform yet: the push is on its way first
    await first.push()
    assert (await task(server, j["id"], "first"))["status"] == "published"
    assert (await first.call(protocol.INFORM, {"version": "1.0"}))["code"] == 200
    t = await task(server, j["id"], "first")
    assert (t["status"], t["fromVersion"]) == ("published", "1.0")
    assert (await first.call(protocol.PROGRESS, {"step": "50"}))["code"] == 200
    assert (await first.call(protocol.INFORM, {"version": "1.0"}))["code"] == 200  # now its source: rebooting
    assert (await task(server, j["id"], "first"))["status"] == "upgrading"
    second = await devs["second"].connect("1.1")  # pending behind the cap: learned for its push
    t = await task(server, j["id"], "second")
    assert (t["status"], t["fromVersion"]) == ("pending", "1.1")
    await first.call(protocol.INFORM, {"version": "2.0"})
    await task_is(server, j["id"], "first", "succeeded")
    await second.upgrade()
    done = await status_is(server, j["id"], "completed")
    assert done["counts"]["succeeded"] == 2
    log = [
        json.loads(line) for line in (await server.call("GET", f"/events?jobId={j['id']}", 200)).decode().splitlines()
    ]
    # Its task was made without one; every event after its report carries the learned version.
    versions = {e["status"]: e["fromVersion"] for e in log if e["deviceKey"] == "second"}
    assert versions == {"pending": None, "published": "1.1", "upgrading": "1.1", "succeeded": "1.1"}
    await first.close()
    await second.close()


async def test_unexpected_version_fails_and_upgrade_reply_refusal(server: Server, fw: dict[str, Any]) -> None:
    devs = await fleet(server, {"wrong": "1.0", "refuses": "1.0"})
    wrong, refuses = await devs["wrong"].connect("1.0"), await devs["refuses"].connect("1.0")
    j = await job(server, fw)
    await wrong.push()
    await wrong.call(protocol.PROGRESS, {"step": 100})
    await wrong.call(protocol.INFORM, {"version": "1.0"})  # source version: still rebooting
    assert (await task(server, j["id"], "wrong"))["status"] == "upgrading"
    await wrong.call(protocol.INFORM, {"version": "9.9.9"})
    t = await task_is(server, j["id"], "wrong", "failed")
    assert t["desc"] == "unexpected version 9.9.9"
    assert (await server.call("GET", "/products/pk1/devices/wrong", 200))["version"] == "9.9.9"
    await refuses.push()
    assert refuses.client is not None
    await refuses.client.publish(
        "/sys/pk1/refuses/ota/device/upgrade_reply", json.dumps({"id": "1", "code": "1101", "message": "busy"}), qos=1
    )
    t = await task_is(server, j["id"], "refuses", "failed")
    assert t["desc"] == "busy"
    await wrong.close()
    await refuses.close()


async def test_verify_job_gates_upgrade_jobs(server: Server) -> None:
    await server.product("pk1")
    fw = await server.firmware("pk1", "3.0", b"x" * 100, enableVerification="true")
    devs = await fleet(server, {"lab": "1.0", "field": "1.0"})
    lab = await devs["lab"].connect("1.0")
    field = await devs["field"].connect("1.0")
    err = await job(server, fw, expect=409)
    assert err["error"]["code"] == "unverified"
    await job(server, fw, expect=400, type="verify", scope={"versionNumbers": ["1.0"]})
    too_many = [f"x{i}" for i in range(11)]
    await job(server, fw, expect=400, type="verify", scope={"deviceKeys": too_many})
    v = await job(server, fw, type="verify", scope={"deviceKeys": ["lab"]})
    assert v["total"] == 1
    await lab.upgrade()
    await status_is(server, v["id"], "completed")
    assert (await server.call("GET", f"/firmware/{fw['id']}", 200))["status"] == "verified"
    up = await job(server, fw, scope={"versionNumbers": ["1.0"]})
    assert up["total"] == 1  # lab is on 3.0 already
    await lab.close()
    await field.close()


async def test_one_active_task_per_device_and_firmware_in_use(server: Server, fw: dict[str, Any]) -> None:
    devs = await fleet(server, {"d1": "1.0", "d2": "1.0"})
    d = await devs["d1"].connect("1.0")
    await (await devs["d2"].connect("1.0")).close()
    fw3 = await server.firmware("pk1", "3.0", b"y" * 10)
    j1 = await job(server, fw, scope={"deviceKeys": ["d1"]})
    j2 = await job(server, fw3)
    assert j1["total"] == 1 and j2["total"] == 1 and j2["skipped"] == 1  # d1 is busy in j1
    busy = await job(server, fw3, expect=400, scope={"deviceKeys": ["d1"]})
    assert "1 matching device(s) are busy" in busy["error"]["message"]
    await server.call("POST", f"/jobs/{j2['id']}/cancel", 200)
    err = await server.call("DELETE", f"/firmware/{fw['id']}", 409)
    assert j1["id"] in err["error"]["message"]
    await server.call("POST", f"/jobs/{j1['id']}/pause", 200)
    await server.call("POST", f"/jobs/{j1['id']}/pause", 409)
    await server.call("POST", f"/jobs/{j1['id']}/resume", 200)
    await server.call("POST", f"/jobs/{j1['id']}/cancel", 200)
    await server.call("POST", f"/jobs/{j1['id']}/resume", 409)
    assert (await task(server, j1["id"], "d1"))["status"] == "canceled"
    await server.call("DELETE", f"/firmware/{fw['id']}", 204)
    await d.close()


async def test_incremental_job_adds_matching_devices(server: Server, fw: dict[str, Any]) -> None:
    devs = await fleet(server, {"a": "1.0"})
    a = await devs["a"].connect("1.0")
    j = await job(server, fw, policy="incremental", scope={"versionNumbers": ["1.0"]})
    assert j["total"] == 1
    await a.upgrade()
    # A device registered later, and a device whose inform puts it in scope, join.
    more = await fleet(server, {"b": "", "c": ""})
    b = await more["b"].connect("1.0")
    c = await more["c"].connect("0.1")
    await b.upgrade()
    assert (await task(server, j["id"], "b"))["status"] in ("succeeded", "upgrading")
    assert (await counts(server, j["id"]))["succeeded"] >= 1
    assert c.queue(protocol.UPGRADE).empty()
    await c.call(protocol.INFORM, {"version": "1.0"})
    await c.upgrade()
    await task_is(server, j["id"], "c", "succeeded")
    assert (await server.call("GET", f"/jobs/{j['id']}", 200))["status"] == "running"
    for d in (a, b, c):
        await d.close()


async def test_bad_job_bodies(server: Server, fw: dict[str, Any]) -> None:
    bad_bodies: list[dict[str, Any]] = [
        {"mode": "pull"},
        {"policy": "sometimes"},
        {"maxConcurrency": 0},
        {"timeoutSeconds": -1},
        {"waves": [{"percent": 50}, {"percent": 40}]},
        {"waves": [{"percent": 50}]},
        {"schedule": {"start": "yesterday"}},
        {"schedule": {"dailyWindow": ["25:00", "01:00"]}},
        {"abort": {"failureRatio": 2}},
        {"scope": {"deviceKeys": ["a/b"]}},
    ]
    for body in bad_bodies:
        err = await job(server, fw, expect=400, **body)
        assert err["error"]["code"] == "invalid"
    await server.call("POST", "/jobs", 404, json={"firmwareId": "fw-nope"})
    assert (await server.call("GET", "/jobs", 200))["total"] == 0


async def test_upgrade_log_jsonl_and_csv(server: Server, fw: dict[str, Any]) -> None:
    devs = await fleet(server, {"d1": "1.0"})
    d = await devs["d1"].connect("1.0")
    j = await job(server, fw)
    await d.push()
    await d.call(protocol.PROGRESS, {"step": 10, "desc": "dl"})
    await d.call(protocol.PROGRESS, {"step": 70, "desc": "flash"})
    await d.call(protocol.INFORM, {"version": "2.0"})
    await status_is(server, j["id"], "completed")
    raw = await server.call("GET", f"/events?jobId={j['id']}")
    rows = [json.loads(line) for line in raw.decode().splitlines()]
    assert [(r["status"], r["kind"], r["step"]) for r in rows] == [
        ("pending", "state", None),
        ("published", "state", None),
        ("upgrading", "state", 10),
        ("upgrading", "progress", 70),
        ("succeeded", "state", 70),
        ("completed", "job", None),
    ]
    rows = rows[:-1]
    assert all(r["jobId"] == j["id"] and r["fromVersion"] == "1.0" and r["toVersion"] == "2.0" for r in rows)
    assert rows[0]["ts"].endswith("Z") and rows[-1]["attempt"] == 1
    text = (await server.call("GET", f"/events?jobId={j['id']}&format=csv")).decode()
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert [r["status"] for r in parsed] == [*(r["status"] for r in rows), "completed"]
    assert parsed[0]["step"] == "" and parsed[2]["step"] == "10"
    await d.close()


async def test_the_engine_stops_when_kicked_as_it_is_stopped(server: Server) -> None:
    """A kick that ends the engine's wait just as stop() cancels it must not keep it running
    (Python 3.11's asyncio.wait_for swallowed exactly that cancel: the server never stopped)."""
    engine = server.services.engine
    for steps in range(8):  # the cancel lands at each point of the wake-up in turn
        await engine.stop()
        await engine.start()
        await asyncio.sleep(0.05)  # into its wait
        engine.kick()
        for _ in range(steps):
            await asyncio.sleep(0)
        async with asyncio.timeout(5):
            await engine.stop()
    await engine.start()
