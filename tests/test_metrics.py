"""GET /metrics: Prometheus text that a Prometheus parser reads, with numbers equal to the API's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from otabox import protocol
from tests.conftest import Device, Server, mqtt_client, start_server, stop_within, wait_for


@pytest.fixture
def server_settings() -> dict[str, Any]:
    return {"scheduler_interval": 0.1}


async def scrape(server: Server, headers: dict[str, str] | None = None) -> dict[tuple[str, tuple[Any, ...]], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    async with server.http.get(server.url + "/metrics", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_equal_what_the_api_shows(server: Server) -> None:
    await server.product("pk1")
    fw = await server.firmware("pk1", "2.0", b"\x01" * 5000)
    devs = []
    for dk in ("d1", "d2", "d3"):
        secret = (await server.device(dk))["deviceSecret"]
        devs.append(await Device(server, "pk1", dk, secret).connect("1.0"))
    with pytest.raises(aiomqtt.MqttError):  # one refused login
        async with mqtt_client(server, "pk1", "d1", "wrong-secret"):
            pass
    job = await server.call("POST", "/jobs", 201, json={"firmwareId": fw["id"]})
    first = await devs[0].upgrade()  # d1 succeeds: push, progress, inform
    async with aiohttp.ClientSession() as plain, plain.get(first["fileUrl"]) as resp:
        assert resp.status == 200 and len(await resp.read()) == 5000
    await devs[1].push()
    await devs[1].call(protocol.PROGRESS, {"step": "-2", "desc": "no network"})  # d2 fails

    async def settled() -> Any:
        j = await server.call("GET", f"/jobs/{job['id']}", 200)
        return j if j["counts"]["succeeded"] == 1 and j["counts"]["failed"] == 1 else None

    shown = await wait_for(settled)
    m = await scrape(server)

    assert m[("otabox_devices_connected", ())] == 3
    assert m[("otabox_mqtt_logins_total", (("outcome", "accepted"),))] == 3
    assert m[("otabox_mqtt_logins_total", (("outcome", "refused"),))] == 1
    for state, n in shown["counts"].items():
        assert m[("otabox_tasks", (("state", state),))] == n, state
    assert m[("otabox_jobs", (("status", "running"),))] == 1
    assert m[("otabox_download_bytes_total", ())] == 5000
    # 3 informs at connect, then d1's progress and inform, d2's progress: 6 device messages in;
    # out: their 6 replies and the 3 pushes (d3's too), at least.
    assert m[("otabox_mqtt_messages_total", (("direction", "in"),))] == 6
    assert m[("otabox_mqtt_messages_total", (("direction", "out"),))] >= 9
    assert m[("otabox_store_commit_seconds_count", ())] > 0
    assert m[("otabox_store_commit_seconds_sum", ())] > 0
    assert ("otabox_event_loop_lag_seconds", ()) in m
    assert m[("process_open_fds", ())] > 0  # the process collector comes along
    for dev in devs:
        await dev.close()

    async def gone() -> bool:
        return (await scrape(server))[("otabox_devices_connected", ())] == 0

    await wait_for(gone)


async def test_metrics_need_a_token_unless_public(server: Server, tmp_path: Path) -> None:
    async with aiohttp.ClientSession() as plain:
        async with plain.get(server.url + "/metrics") as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"]
        async with plain.get(server.url + "/metrics", headers={"Authorization": "Bearer nope"}) as resp:
            assert resp.status == 401
    app = await start_server(tmp_path / "public", metrics_public=True)
    try:
        async with aiohttp.ClientSession() as plain, plain.get(f"http://127.0.0.1:{app.http_port}/metrics") as resp:
            assert resp.status == 200
            assert "otabox_devices_connected 0.0" in await resp.text()
    finally:
        await stop_within(app)
