"""Webhooks against real HTTP receivers: signed deliveries of the upgrade log's events, retries, a
receiver that hangs costing the rollout nothing."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from otabox import protocol
from tests.conftest import Device, Server, wait_for

# The store behind these tests runs on SQLite and on PostgreSQL (tests/postgres.py).
pytestmark = pytest.mark.both_backends

SECRET = "a-secret-of-some-length"


@pytest.fixture
def server_settings() -> dict[str, Any]:
    return {"scheduler_interval": 0.1, "webhook_timeout": 30.0}


class Receiver:
    """An HTTP server on a free port: `/ok` records each POST, `/hang` never answers."""

    def __init__(self) -> None:
        self.got: list[tuple[dict[str, str], bytes]] = []
        self.hanging = 0
        self.url = ""

    async def ok(self, request: web.Request) -> web.Response:
        self.got.append((dict(request.headers), await request.read()))
        return web.Response(status=204)

    async def hang(self, request: web.Request) -> web.Response:
        self.hanging += 1
        await asyncio.Event().wait()  # the receiver is stuck
        raise AssertionError("unreachable")

    def types(self) -> list[str]:
        return [json.loads(body)["type"] for _, body in self.got]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/ok", rec.ok)
    app.router.add_post("/hang", rec.hang)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rec.url = f"http://127.0.0.1:{port}"
    yield rec
    await runner.cleanup()


async def subscribe(server: Server, url: str, events: list[str]) -> dict[str, Any]:
    hook: dict[str, Any] = await server.call(
        "POST", "/webhooks", 201, json={"url": url, "events": events, "secret": SECRET}
    )
    return hook


async def test_signed_deliveries_and_a_hanging_receiver_costs_the_rollout_nothing(
    server: Server, receiver: Receiver
) -> None:
    await server.product("pk1")
    fw = await server.firmware("pk1", "2.0", b"\x01" * 1000)
    good = await subscribe(server, receiver.url + "/ok", ["job.completed", "task.failed"])
    stuck = await subscribe(server, receiver.url + "/hang", ["task.succeeded", "task.failed", "job.completed"])
    assert "secret" not in good and good["events"] == ["job.completed", "task.failed"]
    devs = []
    for dk in ("d1", "d2"):
        secret = (await server.device(dk))["deviceSecret"]
        devs.append(await Device(server, "pk1", dk, secret).connect("1.0"))
    job = await server.call("POST", "/jobs", 201, json={"firmwareId": fw["id"]})
    await devs[0].upgrade()
    await devs[1].push()
    await devs[1].call(protocol.PROGRESS, {"step": "-3", "desc": "bad digest"})

    async def completed() -> bool:
        return bool((await server.call("GET", f"/jobs/{job['id']}", 200))["status"] == "completed")

    await wait_for(completed)
    await wait_for(lambda: _true(sorted(receiver.types()) == ["job.completed", "task.failed"]))
    # The rollout finished and the other receiver was served while the stuck one held its
    # deliveries (30 s timeout): neither the engine nor other webhooks waited for it.
    assert receiver.hanging >= 1
    for headers, body in receiver.got:
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert headers["X-Otabox-Signature"] == expected
        assert headers["Content-Type"] == "application/json"
        delivery = json.loads(body)
        assert delivery["webhookId"] == good["id"] and delivery["event"]["jobId"] == job["id"]
    failed = next(json.loads(b) for _, b in receiver.got if json.loads(b)["type"] == "task.failed")
    assert failed["event"]["deviceKey"] == "d2" and failed["event"]["status"] == "failed"
    assert failed["event"]["desc"] == "bad digest"

    history = (await server.call("GET", f"/webhooks/{good['id']}/deliveries", 200))["items"]
    assert sorted(d["type"] for d in history) == ["job.completed", "task.failed"]
    assert all(d["status"] == "delivered" and d["attempts"] == 1 and d["lastStatus"] == 204 for d in history)
    waiting = (await server.call("GET", f"/webhooks/{stuck['id']}/deliveries", 200))["items"]
    assert {d["status"] for d in waiting} == {"pending"} and len(waiting) == 3
    for dev in devs:
        await dev.close()


async def test_a_failing_receiver_is_retried_with_the_outcome_recorded(server: Server, receiver: Receiver) -> None:
    hook = await subscribe(server, receiver.url + "/missing", ["job.canceled"])  # answers 404
    await server.product("pk1")
    fw = await server.firmware("pk1", "2.0", b"\x01" * 1000)
    await server.device("d1")
    job = await server.call("POST", "/jobs", 201, json={"firmwareId": fw["id"], "scope": {"deviceKeys": ["d1"]}})
    await server.call("POST", f"/jobs/{job['id']}/cancel", 200)

    async def retried() -> Any:
        items = (await server.call("GET", f"/webhooks/{hook['id']}/deliveries", 200))["items"]
        return items[0] if items and items[0]["attempts"] >= 2 else None

    d = await wait_for(retried, timeout=15)  # 1 s, then 2 s between attempts
    assert d["type"] == "job.canceled" and d["status"] == "pending"
    assert d["lastStatus"] == 404 and d["lastError"] == "HTTP 404" and d["nextAt"]
    assert d["body"]["event"]["actor"] == "admin"
    await server.call("DELETE", f"/webhooks/{hook['id']}", 204)
    assert (await server.call("GET", "/webhooks", 200))["items"] == []
    await server.call("GET", f"/webhooks/{hook['id']}/deliveries", 404)


async def test_firmware_verified_is_told_once_with_the_firmware_and_its_verify_job(
    server: Server, receiver: Receiver
) -> None:
    hook = await subscribe(server, receiver.url + "/ok", ["firmware.verified", "job.completed"])
    await server.product("pk1")
    fw = await server.firmware("pk1", "2.0", b"\x03" * 1000, name="main", enableVerification="true")
    devs = []
    for dk in ("d1", "d2"):
        secret = (await server.device(dk))["deviceSecret"]
        devs.append(await Device(server, "pk1", dk, secret).connect("1.0"))
    body = {"firmwareId": fw["id"], "type": "verify", "scope": {"deviceKeys": ["d1", "d2"]}}
    job = await server.call("POST", "/jobs", 201, json=body)
    for dev in devs:  # the first success verifies it (minSuccessForVerified 1); the second adds nothing
        await dev.upgrade()
    await wait_for(lambda: _true(sorted(receiver.types()) == ["firmware.verified", "job.completed"]))
    got = next(json.loads(b) for _, b in receiver.got if json.loads(b)["type"] == "firmware.verified")
    assert got["webhookId"] == hook["id"]
    firmware = got["firmware"]
    assert (firmware["id"], firmware["productKey"], firmware["name"], firmware["version"], firmware["status"]) == (
        fw["id"], "pk1", "main", "2.0", "verified",
    )  # fmt: skip
    event = got["event"]
    assert (event["jobId"], event["jobType"], event["kind"], event["status"]) == (
        job["id"], "verify", "job", "firmwareVerified",
    )  # fmt: skip
    assert event["actor"] == "system" and event["desc"] == "main 2.0 verified: 1 device(s) succeeded, 1 needed"
    assert (await server.call("GET", f"/firmware/{fw['id']}", 200))["status"] == "verified"
    # One row in the upgrade log, though both devices succeeded, before the job completed.
    log = [json.loads(line) for line in (await server.call("GET", f"/events?jobId={job['id']}")).decode().splitlines()]
    assert [e["status"] for e in log if e["kind"] == "job"] == ["firmwareVerified", "completed"]
    assert (await server.call("POST", "/webhooks", 400, json={
        "url": receiver.url + "/ok", "events": ["job.firmwareVerified"], "secret": SECRET,
    }))["error"]["code"] == "invalid"  # fmt: skip
    for dev in devs:
        await dev.close()


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"url": "ftp://x/y", "events": ["job.completed"], "secret": SECRET}, "url must be an http(s) URL"),
        ({"url": "http://x/y", "events": ["job.exploded"], "secret": SECRET}, "unknown event type"),
        ({"url": "http://x/y", "events": [], "secret": SECRET}, "events must be a non-empty list"),
        ({"url": "http://x/y", "events": ["job.completed"], "secret": "short"}, "secret must be"),
        ({"url": "http://x/y", "events": ["job.completed"], "secret": SECRET, "x": 1}, "unknown field"),
    ],
)
async def test_bad_subscriptions_are_refused_and_nothing_is_stored(
    server: Server, body: dict[str, Any], words: str
) -> None:
    refused = await server.call("POST", "/webhooks", 400, json=body)
    assert words in refused["error"]["message"]
    assert (await server.call("GET", "/webhooks", 200))["items"] == []


async def _true(value: bool) -> bool:
    return value
