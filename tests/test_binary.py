"""The one-file binary (build/build.sh -> dist/otabox) started with no Python around it, serving a device end to end.

The binary is built at most once per source state: a hash of everything that goes into it is
kept in dist/.otabox.stamp, and a matching dist/otabox is reused.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from otabox import __version__, delta, protocol
from tests.conftest import TOKEN, Device, Server, wait_for
from tests.s3 import S3

ROOT = Path(__file__).resolve().parent.parent
BINARY = ROOT / "dist" / "otabox"
STAMP = ROOT / "dist" / ".otabox.stamp"
BUILD_LOG = ROOT / "build" / "work" / "build.log"
# A cold build first makes build/.venv from the package index; a warm one takes ~30 s.
BUILD_TIMEOUT = 15 * 60
MAX_SIZE_MB = 40
START_TIMEOUT = 30.0  # a one-file binary unpacks itself before Python starts
STOP_TIMEOUT = 10.0

pytestmark = pytest.mark.timeout(BUILD_TIMEOUT + 120)

Say = Callable[[str], None]


def source_hash() -> str:
    """Hash of what the binary is built from: the package (code and data), pyproject.toml, build/*."""
    files = [ROOT / "pyproject.toml"]
    files += [p for p in (ROOT / "build").iterdir() if p.is_file()]
    files += [
        p
        for p in (ROOT / "otabox").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
    ]
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def without_our_python(env: dict[str, str]) -> dict[str, str]:
    """`env` with no trace of the test virtualenv (build.sh makes its own)."""
    out = {
        k: v
        for k, v in env.items()
        if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME") and not k.startswith("OTABOX_")
    }
    venv_bin = str(Path(sys.prefix) / "bin")
    out["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    return out


@pytest.fixture(scope="module")
def say(pytestconfig: pytest.Config) -> Say:
    """Write a line to the terminal whether or not output is captured (-s)."""
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")

    def write(line: str) -> None:
        if reporter is None or capture is None:
            print(f"[binary] {line}")
            return
        with capture.global_and_fixture_disabled():
            reporter.ensure_newline()
            reporter.write_line(f"[binary] {line}")

    return write


@pytest.fixture(scope="module")
def binary(say: Say) -> Path:
    """dist/otabox for the current sources: reused when the stamp matches, else built (a failed build fails)."""
    digest = source_hash()
    if BINARY.is_file() and STAMP.is_file() and STAMP.read_text().strip() == digest:
        say(f"reusing {BINARY.relative_to(ROOT)} (sources unchanged)")
        return BINARY
    STAMP.unlink(missing_ok=True)
    BUILD_LOG.parent.mkdir(parents=True, exist_ok=True)
    say(f"building {BINARY.relative_to(ROOT)} with build/build.sh (log: {BUILD_LOG.relative_to(ROOT)}) ...")
    started = time.monotonic()
    with BUILD_LOG.open("wb") as log:
        try:
            rc = subprocess.run(
                [str(ROOT / "build" / "build.sh")],
                cwd=ROOT,
                env=without_our_python(dict(os.environ)),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=BUILD_TIMEOUT,
            ).returncode
        except subprocess.TimeoutExpired:
            pytest.fail(f"build/build.sh took over {BUILD_TIMEOUT} s; see {BUILD_LOG}")
    tail = "\n".join(BUILD_LOG.read_text(errors="replace").splitlines()[-40:])
    if rc != 0 or not BINARY.is_file():
        pytest.fail(f"build/build.sh exited {rc}; end of {BUILD_LOG}:\n{tail}")
    # The hash taken before the build: sources edited meanwhile make the next run rebuild.
    STAMP.write_text(digest + "\n")
    say(f"built in {time.monotonic() - started:.0f} s")
    return BINARY


@pytest.fixture
def bare_env(tmp_path: Path) -> dict[str, str]:
    """An environment with no Python on PATH and no virtualenv: what an air-gapped box gives the binary."""
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    return {"PATH": str(empty_bin), "HOME": str(tmp_path), "LANG": "C.UTF-8"}


def test_size_and_version(
    binary: Path, bare_env: dict[str, str], tmp_path: Path, say: Say, record_property: Any
) -> None:
    size_mb = binary.stat().st_size / 1024 / 1024
    say(f"dist/otabox is {size_mb:.1f} MB")
    record_property("binary_size_mb", round(size_mb, 1))
    assert size_mb <= MAX_SIZE_MB
    out = subprocess.run(
        [str(binary), "--version"], cwd=tmp_path, env=bare_env, capture_output=True, text=True, timeout=60
    )
    assert (out.returncode, out.stdout, out.stderr) == (0, f"otabox {__version__}\n", "")


async def run(binary: Path, *args: str, cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run a short command of the binary: its exit code and output."""
    proc = await asyncio.create_subprocess_exec(
        str(binary),
        *args,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(60):
            stdout, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    return await proc.wait(), stdout.decode()


async def test_binary_serves_a_device_end_to_end(
    binary: Path, bare_env: dict[str, str], tmp_path: Path, say: Say, record_property: Any, s3_server: S3
) -> None:
    site = tmp_path / "site"  # the working directory: the default data dir is relative to it
    site.mkdir()
    env = {**bare_env, "OTABOX_ADMIN_TOKEN": TOKEN, **s3_server.env}
    args = ["serve", "--host", "127.0.0.1", "--http-port", "0", "--mqtt-port", "0", "--scheduler-interval", "0.1"]
    # Firmware in S3: the SDK, imported on first use only, must be in the binary too.
    prefix = f"binary-{os.getpid()}"
    args += ["--storage-url", f"s3://{s3_server.bucket}/{prefix}?endpoint={s3_server.endpoint}"]
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        t0 = time.monotonic()
        # Its own process group: the binary is a launcher process plus the server, its child.
        proc = await asyncio.create_subprocess_exec(
            str(binary),
            *args,
            cwd=site,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    data_dir = site / "otabox-data"
    try:
        ports_file = data_dir / "ports.json"

        async def healthy() -> Any:
            assert proc.returncode is None, f"serve exited {proc.returncode}:\n{log.read_text(errors='replace')}"
            if not ports_file.exists():  # written by the binary once both listeners are bound
                return None
            url = f"http://127.0.0.1:{json.loads(ports_file.read_text())['http']}/healthz"
            async with aiohttp.ClientSession() as http, http.get(url) as resp:
                return await resp.json() if resp.status == 200 else None

        health = await wait_for(healthy, timeout=START_TIMEOUT)
        startup = time.monotonic() - t0
        say(f"first /healthz 200 after {startup:.2f} s")
        record_property("binary_start_seconds", round(startup, 2))
        assert health["status"] == "ok" and health["version"] == __version__

        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            server = Server(
                local_app=None,
                http=http,
                url=f"http://127.0.0.1:{health['httpPort']}",
                data_dir=data_dir,
                mqtt=health["mqttPort"],
            )
            secret = (await server.device("d1", "pk1"))["deviceSecret"]
            device = await Device(server, "pk1", "d1", secret).connect("1.0.0")  # an EnOS login over MQTT
            content = bytes(range(256)) * 400
            before = content[:-300] + bytes(300)
            await server.firmware("pk1", "1.0.0", before, name="main")
            fw = await server.firmware("pk1", "2.0.0", content, name="main")
            assert s3_server.sha256_of(s3_server.key(fw["sha256"], prefix)) == fw["sha256"]

            # The delta 1.0.0 -> 2.0.0 is made by the binary's own `delta make` child process.
            async def delta_made() -> Any:
                items = (await server.call("GET", f"/firmware/{fw['id']}/deltas", 200))["items"]
                return items[0] if items else None

            made = await wait_for(delta_made, timeout=60)
            assert made["status"] == "ready", made

            # A download URL minted for the device, fetched like a device does (no admin token).
            minted = await server.call("GET", f"/firmware/{fw['id']}/url?deviceKey=d1", 200)
            async with aiohttp.ClientSession() as plain, plain.get(minted["fileUrl"]) as resp:
                assert resp.status == 200 and await resp.read() == content

            # A batch job: push over MQTT, download from the push, report the new version.
            job = await server.call("POST", "/jobs", 201, json={"firmwareId": fw["id"]})
            push = await device.push()
            assert push["version"] == "2.0.0" and push["sign"] == hashlib.sha256(content).hexdigest()
            async with aiohttp.ClientSession() as plain, plain.get(push["fileUrl"]) as resp:
                assert resp.status == 200 and await resp.read() == content
            async with aiohttp.ClientSession() as plain, plain.get(push["delta"]["fileUrl"]) as resp:
                assert resp.status == 200
                (site / "patch").write_bytes(await resp.read())
            (site / "before").write_bytes(before)
            delta.apply(site / "before", site / "patch", site / "rebuilt", push["delta"]["algorithm"])
            assert (site / "rebuilt").read_bytes() == content
            assert (await device.call(protocol.PROGRESS, {"step": "100", "desc": "flashed"}))["code"] == 200
            assert (await device.call(protocol.INFORM, {"version": "2.0.0"}))["code"] == 200

            async def completed() -> Any:
                return (await server.call("GET", f"/jobs/{job['id']}", 200))["status"] == "completed"

            await wait_for(completed)
            shown = await server.call("GET", "/products/pk1/devices/d1", 200)
            assert shown["version"] == "2.0.0" and shown["online"] is True
            await device.close()

            console = ROOT / "otabox" / "console"
            if (console / "templates").is_dir():
                from otabox.server.http.console import PREFIX

                # Templates and static files are data inside the binary, not modules.
                static = min(p for p in (console / "static").rglob("*") if p.is_file())
                async with aiohttp.ClientSession() as plain:
                    async with plain.get(f"{server.url}{PREFIX}/login") as resp:
                        assert resp.status == 200 and "<html" in await resp.text()
                    async with plain.get(
                        f"{server.url}{PREFIX}/static/{static.relative_to(console / 'static')}"
                    ) as resp:
                        assert resp.status == 200 and await resp.read() == static.read_bytes()

        # The admin CLI in the same binary finds the server through ./otabox-data/ports.json.
        rc, listed = await run(binary, "product", "list", "--json", cwd=site, env={**bare_env, "OTABOX_TOKEN": TOKEN})
        assert rc == 0 and [p["productKey"] for p in json.loads(listed)["items"]] == ["pk1"]

        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(STOP_TIMEOUT):
            rc = await proc.wait()
        assert rc == 0, log.read_text(errors="replace")
        assert "otabox stopped" in log.read_text(errors="replace")
    finally:
        if proc.returncode is None:
            # SIGKILL to the launcher alone would orphan the server, still holding its ports.
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
