"""The admin CLI (`otabox.cli.main`) against a real server, run in a thread as a user would."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from otabox import __version__, protocol
from otabox.cli import main
from tests.conftest import TOKEN, Server, mqtt_client, request

MAX_UPLOAD = 1024 * 1024


@pytest.fixture
def server_settings() -> dict[str, Any]:
    return {"max_upload_bytes": MAX_UPLOAD}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI reads these; the developer's own shell must not steer the tests.
    for name in ("OTABOX_URL", "OTABOX_TOKEN", "OTABOX_ADMIN_TOKEN", "OTABOX_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)


@dataclass
class Run:
    rc: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


class Cli:
    def __init__(self, server: Server, capsys: pytest.CaptureFixture[str]) -> None:
        self.server = server
        self.capsys = capsys

    async def __call__(self, *args: str, url: str | None = None, token: str | None = TOKEN) -> Run:
        argv = [*args, "--url", url or self.server.url]
        if token is not None:
            argv += ["--token", token]
        return await self.raw(*argv)

    async def raw(self, *argv: str) -> Run:
        self.capsys.readouterr()
        rc = await asyncio.to_thread(main, list(argv))
        out, err = self.capsys.readouterr()
        return Run(rc, out, err)


@pytest.fixture
def cli(server: Server, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(server, capsys)


def fields(text: str) -> dict[str, str]:
    """`key  value` lines of a one-object (non --json) output."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        out[key] = value.strip()
    return out


def table(text: str) -> list[list[str]]:
    """Rows of a table output (header first), split on runs of 2+ spaces."""
    return [re.split(r" {2,}", line.strip()) for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------- products


async def test_product_add_and_list(cli: Cli) -> None:
    run = await cli("product", "add", "thermo", "--name", "Thermostat")
    assert run.rc == 0, run.err
    shown = fields(run.out)
    assert shown["productKey"] == "thermo" and shown["name"] == "Thermostat" and shown["createdAt"].endswith("Z")
    run = await cli("product", "add", "lamp", "--json")
    assert run.rc == 0 and run.json()["productKey"] == "lamp" and run.json()["name"] == "lamp"

    run = await cli("product", "list")
    assert run.rc == 0
    rows = table(run.out)
    assert rows[0] == ["productKey", "name", "devices", "createdAt"]
    assert [r[:3] for r in rows[1:-1]] == [["lamp", "lamp", "0"], ["thermo", "Thermostat", "0"]]
    assert rows[-1] == ["(2 of 2)"]
    run = await cli("product", "list", "--limit", "1", "--json")
    data = run.json()
    assert data["total"] == 2 and [p["productKey"] for p in data["items"]] == ["lamp"]


async def test_api_errors_exit_1_with_the_message(cli: Cli) -> None:
    assert (await cli("product", "add", "dup")).rc == 0
    run = await cli("product", "add", "dup")
    assert run.rc == 1 and run.out == ""
    assert run.err.startswith("otabox: 409 duplicate: ") and "dup" in run.err
    run = await cli("product", "add", "dup", "--json")
    assert run.rc == 1 and run.json()["error"]["status"] == 409
    run = await cli("device", "show", "dup", "ghost")
    assert run.rc == 1 and run.err.startswith("otabox: 404 not-found: ") and "ghost" in run.err
    run = await cli("firmware", "show", "fw-nothing")
    assert run.rc == 1 and "404" in run.err
    run = await cli("product", "add", "a+b")
    assert run.rc == 1 and "400" in run.err and "productKey" in run.err
    run = await cli("product", "list", token="wrong-token")
    assert run.rc == 1 and run.err.startswith("otabox: 401 unauthorized")
    run = await cli("product", "list", token=None)
    assert run.rc == 1 and "401" in run.err


async def test_unreachable_server(cli: Cli) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on `port` any more.
    run = await cli("product", "list", url=f"http://127.0.0.1:{port}")
    assert run.rc == 1 and run.out == ""
    assert f"cannot reach the server at http://127.0.0.1:{port}" in run.err


async def test_url_and_token_from_data_dir_and_environment(
    cli: Cli, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTABOX_TOKEN", TOKEN)
    run = await cli.raw("product", "add", "viaenv", "--data-dir", str(server.data_dir))
    assert run.rc == 0, run.err
    monkeypatch.setenv("OTABOX_URL", server.url)
    run = await cli.raw("product", "list", "--json")
    assert run.rc == 0 and run.json()["total"] == 1


async def test_version(cli: Cli) -> None:
    with pytest.raises(SystemExit) as exc:
        await cli.raw("--version")
    assert exc.value.code == 0
    out, _ = cli.capsys.readouterr()
    assert out.strip() == f"otabox {__version__}"


# ---------------------------------------------------------------- devices


async def test_device_add_prints_the_secret(cli: Cli, server: Server) -> None:
    await server.product("pk1")
    run = await cli("device", "add", "pk1", "d1", "--tag", "site=east", "--tag", "rack=7")
    assert run.rc == 0, run.err
    shown = fields(run.out)
    secret = shown["deviceSecret"]
    assert len(secret) >= 16 and shown["deviceKey"] == "d1"
    assert json.loads(shown["tags"]) == {"site": "east", "rack": "7"}
    # The printed secret is the device's: it logs in with it.
    async with mqtt_client(server, "pk1", "d1", secret) as c:
        assert (await request(c, "pk1", "d1", protocol.INFORM, {"version": "1.0"}))["code"] == 200
    run = await cli("device", "add", "pk1", "d2", "--secret", "my-own-secret", "--auth", "plain", "--json")
    assert run.rc == 0 and run.json()["deviceSecret"] == "my-own-secret" and run.json()["auth"] == "plain"
    run = await cli("device", "show", "pk1", "d1", "--json")
    assert run.rc == 0 and run.json()["version"] == "1.0" and "deviceSecret" not in run.json()
    assert secret not in run.out
    run = await cli("device", "add", "pk1", "d1")
    assert run.rc == 1 and "409" in run.err


async def test_device_import_writes_secrets_file_0600(cli: Cli, server: Server, tmp_path: Path) -> None:
    await server.product("pk1")
    src = tmp_path / "devices.csv"
    src.write_text("deviceKey,deviceSecret,site\ni1,secret-i1-long,east\nbad/key,secret-bad-long,east\ni2,,west\n")
    out = tmp_path / "secrets.csv"
    run = await cli("device", "import", "pk1", str(src), "--secrets-out", str(out))
    assert run.rc == 1, run.err  # a row was rejected: the script must notice
    lines = run.out.splitlines()
    assert lines[0].startswith("columns: deviceKey from") and lines[1] == "created 2, rejected 1"
    assert lines[2].startswith("  row 2 (bad/key): ") and "deviceKey" in lines[2]
    assert lines[3] == f"secrets of created devices written to {out}"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    rows = [line.split(",") for line in out.read_text().splitlines()]
    assert rows[0] == ["deviceKey", "deviceSecret"]
    secrets = dict(rows[1:])
    assert set(secrets) == {"i1", "i2"} and secrets["i1"] == "secret-i1-long"
    async with mqtt_client(server, "pk1", "i2", secrets["i2"]) as c:
        assert (await request(c, "pk1", "i2", protocol.INFORM, {"version": "1"}))["code"] == 200
    assert (await server.call("GET", "/products/pk1/devices/i2", 200))["tags"] == {"site": "west"}


async def test_device_import_json_file_with_json_output(cli: Cli, server: Server, tmp_path: Path) -> None:
    await server.product("pk1")
    src = tmp_path / "devices.json"
    src.write_text(json.dumps([{"deviceKey": "j1", "tags": {"site": "north"}}, {"deviceKey": "j1"}]))
    out = tmp_path / "secrets.csv"
    out.write_text("stale, world-readable\n")
    os.chmod(out, 0o644)
    run = await cli("device", "import", "pk1", str(src), "--json", "--secrets-out", str(out))
    assert run.rc == 1, run.err  # the duplicate row was rejected
    result = run.json()
    assert result["created"] == 1 and result["rejected"] == 1 and result["errors"][0]["row"] == 2
    # --secrets-out is honoured with --json too, and an existing file is narrowed to 0600.
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_text() == f"deviceKey,deviceSecret\nj1,{result['devices'][0]['deviceSecret']}\n"


async def test_device_import_missing_file_names_the_file(cli: Cli, server: Server, tmp_path: Path) -> None:
    await server.product("pk1")
    run = await cli("device", "import", "pk1", str(tmp_path / "nope.csv"))
    assert run.rc == 1 and "nope.csv" in run.err and "cannot reach" not in run.err


async def test_device_list_filters(cli: Cli, server: Server) -> None:
    a = await server.device("a", tags={"site": "east"})
    await server.device("b", tags={"site": "west"})
    await server.device("c", tags={"site": "east"})
    async with mqtt_client(server, "pk1", "a", a["deviceSecret"]) as c:
        assert (await request(c, "pk1", "a", protocol.INFORM, {"version": "2.0"}))["code"] == 200
        run = await cli("device", "list", "pk1")
        rows = table(run.out)
        assert rows[0] == ["deviceKey", "version", "online", "lastSeen", "tags"]
        assert [r[:3] for r in rows[1:-1]] == [["a", "2.0", "yes"], ["b", "-", "no"], ["c", "-", "no"]]
        assert rows[1][4] == "site=east" and rows[-1] == ["(3 of 3)"]

        async def keys(*flags: str) -> list[str]:
            run = await cli("device", "list", "pk1", "--json", *flags)
            assert run.rc == 0, run.err
            return [d["deviceKey"] for d in run.json()["items"]]

        assert await keys("--tag", "site=east") == ["a", "c"]
        assert await keys("--version", "2.0") == ["a"]
        assert await keys("--online", "true") == ["a"]
        assert await keys("--online", "false", "--tag", "site=east") == ["c"]
        assert await keys("--limit", "1", "--offset", "1") == ["b"]
    run = await cli("device", "list", "nope")
    assert run.rc == 1 and "404" in run.err


# ---------------------------------------------------------------- firmware


async def test_firmware_add_list_show_url_delete(cli: Cli, server: Server, tmp_path: Path) -> None:
    await server.device("d1")
    blob = os.urandom(100_000)
    path = tmp_path / "fw-2.0.bin"
    path.write_bytes(blob)
    run = await cli("firmware", "add", "pk1", str(path), "--name", "main-fw", "--version", "2.0.0", "--desc", "notes")
    assert run.rc == 0, run.err
    shown = fields(run.out)
    fw_id = shown["id"]
    assert shown["sha256"] == hashlib.sha256(blob).hexdigest() == shown["sign"]
    assert shown["size"] == str(len(blob)) and shown["status"] == "unverified"
    run = await cli(
        "firmware", "add", "pk1", str(path), "--name", "md5-fw", "--version", "2.0.1", "--sign-method", "md5", "--json"
    )
    md5_fw = run.json()
    assert md5_fw["sign"] == hashlib.md5(blob).hexdigest() and md5_fw["signMethod"] == "md5"

    run = await cli("firmware", "list", "pk1")
    rows = table(run.out)
    assert rows[0] == ["id", "name", "version", "size", "status", "signMethod", "sign"]
    assert [r[1:3] for r in rows[1:-1]] == [["main-fw", "2.0.0"], ["md5-fw", "2.0.1"]]
    assert rows[-1] == ["(2 of 2)"]
    run = await cli("firmware", "show", fw_id, "--json")
    assert run.json()["desc"] == "notes" and run.json()["id"] == fw_id

    run = await cli("firmware", "url", fw_id, "d1")
    url = fields(run.out)["fileUrl"]
    async with aiohttp.ClientSession() as anon, anon.get(url) as resp:
        assert resp.status == 200 and await resp.read() == blob
    run = await cli("firmware", "url", fw_id, "ghost")
    assert run.rc == 1 and "404" in run.err

    run = await cli("firmware", "add", "pk1", str(path), "--name", "main-fw", "--version", "2.0.0")
    assert run.rc == 1 and "409" in run.err
    run = await cli("firmware", "delete", fw_id)
    assert run.rc == 0 and fields(run.out) == {"deleted": fw_id}
    run = await cli("firmware", "delete", fw_id)
    assert run.rc == 1 and "404" in run.err
    run = await cli("firmware", "list", "pk1", "--json")
    assert [f["id"] for f in run.json()["items"]] == [md5_fw["id"]]


async def test_firmware_add_too_large_and_missing_file(cli: Cli, server: Server, tmp_path: Path) -> None:
    await server.product("pk1")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * MAX_UPLOAD))
    run = await cli("firmware", "add", "pk1", str(big), "--name", "big", "--version", "1")
    assert run.rc == 1 and run.err.startswith("otabox: 413 too-large")
    run = await cli("firmware", "add", "pk1", str(tmp_path / "missing.bin"), "--name", "m", "--version", "1")
    assert run.rc == 1 and "missing.bin" in run.err and "cannot reach" not in run.err
    assert (await server.call("GET", "/products/pk1/firmware", 200))["total"] == 0
