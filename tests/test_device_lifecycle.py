"""Device lifecycle: tags replaced, secrets rotated, devices deleted — through the API, the CLI and
the console, with the upgrade log kept and the old credentials refused at once."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiomqtt
import pytest

from otabox import protocol
from tests.conftest import Device, Server, mqtt_client, wait_for
from tests.test_cli import Cli, cli  # noqa: F401  (cli: fixture)
from tests.test_console import Console, ui  # noqa: F401  (ui: fixture)

# The store behind these tests runs on SQLite and on PostgreSQL (tests/postgres.py).
pytestmark = pytest.mark.both_backends


@pytest.fixture
def server_settings() -> dict[str, Any]:
    return {"scheduler_interval": 0.1}


async def refused(server: Server, dk: str, secret: str) -> bool:
    try:
        async with mqtt_client(server, "pk1", dk, secret):
            return False
    except aiomqtt.MqttError:
        return True


async def test_patch_replaces_tags_and_refuses_what_it_does_not_know(server: Server) -> None:
    await server.device("d1", tags={"site": "east", "floor": "2"})
    dev = await server.call("PATCH", "/products/pk1/devices/d1", 200, json={"tags": {"site": "west"}})
    assert dev["tags"] == {"site": "west"}
    err = await server.call("PATCH", "/products/pk1/devices/d1", 400, json={"colour": "red"})
    assert "colour" in err["error"]["message"]
    await server.call("PATCH", "/products/pk1/devices/ghost", 404, json={"tags": {}})
    assert (await server.call("GET", "/products/pk1/devices/d1", 200))["tags"] == {"site": "west"}


async def test_rotate_secret_refuses_the_old_one_and_ends_its_connection(server: Server) -> None:
    old = (await server.device("d1"))["deviceSecret"]
    dev = await Device(server, "pk1", "d1", old).connect("1.0")
    new = (await server.call("POST", "/products/pk1/devices/d1:rotate-secret", 200))["deviceSecret"]
    assert new != old and len(new) >= 8

    async def offline() -> bool:
        return not (await server.call("GET", "/products/pk1/devices/d1", 200))["online"]

    assert await wait_for(offline)  # the connection made with the old secret was closed
    assert await refused(server, "d1", old)
    again = await Device(server, "pk1", "d1", new).connect("1.0")
    await again.close()
    await dev.close()


async def test_delete_cancels_the_active_task_keeps_the_history_and_refuses_the_device(server: Server) -> None:
    await server.product("pk1")
    fw = await server.firmware("pk1", "2.0", b"x" * 1000)
    secret = (await server.device("d1"))["deviceSecret"]
    await server.device("d2")
    dev = await Device(server, "pk1", "d1", secret).connect("1.0")
    await (
        await Device(
            server,
            "pk1",
            "d2",
            (await server.call("POST", "/products/pk1/devices/d2:rotate-secret", 200))["deviceSecret"],
        ).connect("1.0")
    ).close()
    job = await server.call("POST", "/jobs", 201, json={"firmwareId": fw["id"]})
    await dev.push()
    await server.call("DELETE", "/products/pk1/devices/d1", 204)
    await server.call("GET", "/products/pk1/devices/d1", 404)
    await server.call("DELETE", "/products/pk1/devices/d1", 404)
    tasks = {t["deviceKey"]: t for t in (await server.call("GET", f"/jobs/{job['id']}/tasks", 200))["items"]}
    assert tasks["d1"]["status"] == "canceled" and tasks["d1"]["desc"] == "device deleted"
    raw = await server.call("GET", f"/events?jobId={job['id']}", 200)
    rows = [json.loads(line) for line in raw.decode().splitlines() if json.loads(line)["deviceKey"] == "d1"]
    assert [r["status"] for r in rows] == ["pending", "published", "canceled"]
    assert await refused(server, "d1", secret)
    await asyncio.sleep(0)
    await dev.close()


async def test_the_cli_tags_rotates_and_deletes(server: Server, cli: Cli) -> None:  # noqa: F811
    await server.device("d1")
    run = await cli("device", "tag", "pk1", "d1", "--tag", "site=north", "--json")
    assert run.rc == 0 and run.json()["tags"] == {"site": "north"}
    run = await cli("device", "rotate-secret", "pk1", "d1", "--json")
    assert run.rc == 0 and len(run.json()["deviceSecret"]) >= 8
    run = await cli("device", "delete", "pk1", "d1")
    assert run.rc == 0
    run = await cli("device", "delete", "pk1", "d1")
    assert run.rc == 1 and "404" in run.err


async def test_the_console_creates_imports_tags_rotates_and_deletes(server: Server, ui: Console) -> None:  # noqa: F811
    location = await ui.post("/ui/products", {"csrf": ui.csrf, "productKey": "pk9", "name": "Meters"}, expect=303)
    assert "pk9" in await ui.get(location)
    page = await ui.post("/ui/products/pk9/devices", {"csrf": ui.csrf, "deviceKey": "m1", "tags": "site=east"})
    assert "m1" in page and "shown once" in page
    secret_shown = page.split('id="new-secret">', 1)[1].split("<", 1)[0]
    page = await ui.post(
        "/ui/products/pk9/devices:import", {"csrf": ui.csrf, "csv": "deviceKey,site\nm2,west\nbad/key,x\n"}
    )
    assert "created 1" in page and "rejected 1" in page and "m2" in page
    location = await ui.post("/ui/devices/pk9/m1/tags", {"csrf": ui.csrf, "tags": "site=south\nfloor=3"}, expect=303)
    assert (await server.call("GET", "/products/pk9/devices/m1", 200))["tags"] == {"site": "south", "floor": "3"}
    page = await ui.post("/ui/devices/pk9/m1/rotate-secret", {"csrf": ui.csrf})
    new = page.split('id="new-secret">', 1)[1].split("<", 1)[0]
    assert new and new != secret_shown
    assert "Delete device" in await ui.get("/ui/devices/pk9/m1/delete")
    location = await ui.post("/ui/devices/pk9/m1/delete", {"csrf": ui.csrf}, expect=303)
    assert "Deleted device m1" in await ui.get(location)
    await server.call("GET", "/products/pk9/devices/m1", 404)
    assert protocol.valid_key("m2")
