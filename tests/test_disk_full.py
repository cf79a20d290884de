"""A data dir on a small file system that fills up: uploads and writes are refused with a clear
error (507 `disk-full`), nothing half-written stays, the server keeps serving, and once space is
free again everything works and the database is intact.

The file system is a real tmpfs of a few MiB, mounted in a mount namespace of the server's own
(`unshare --user --map-root-user --mount`: no privileges needed where user namespaces are
allowed, and root may anyway). The test reaches the server's data dir through
`/proc/<pid>/root`, which shows the mounts of that process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import TOKEN

SIZE_MB = 16


@dataclass
class Answer:
    status: int
    body: Any


@dataclass
class Boxed:
    proc: subprocess.Popen[str]
    pid: int
    url: str
    data: Path  # the server's data dir as this process sees it

    def stop(self) -> list[str]:
        """SIGTERM the server; the rest of the wrapper's output (its exit code, the integrity check)."""
        os.kill(self.pid, signal.SIGTERM)
        assert self.proc.stdout is not None
        rest = self.proc.stdout.read().splitlines()
        self.proc.wait(timeout=30)
        return rest

    async def call(self, method: str, path: str, **kw: Any) -> Answer:
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http,
            http.request(method, self.url + path, **kw) as resp,
        ):
            text = await resp.text()
            return Answer(resp.status, json.loads(text) if text.startswith(("{", "[")) else text)


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
        capture_output=True,
        timeout=30,
    )
    return probe.returncode == 0


@pytest.fixture
def boxed(tmp_path: Path) -> Iterator[Boxed]:
    if not _can_unshare():
        pytest.fail("this machine allows no mount namespace (unshare --user --mount): the disk-full test needs one")
    data = tmp_path / "data"
    data.mkdir()
    # After the server stops, in the same namespace: the database's own integrity check.
    check = (
        "import sqlite3,sys; db = sqlite3.connect(sys.argv[1]);"
        " print('INTEGRITY', db.execute('PRAGMA integrity_check').fetchone()[0])"
    )
    script = (
        f'D="$1"; shift; mount -t tmpfs -o size={SIZE_MB}m tmpfs "$D" || exit 3; '
        '"$@" & echo "SERVER PID $!"; wait $!; echo "SERVER EXIT $?"; '
        f'"{sys.executable}" -c "{check}" "$D/otabox.db"'
    )
    cmd = [sys.executable, "-m", "otabox", "serve", "--data-dir", str(data), "--host", "127.0.0.1",
           "--http-port", "0", "--mqtt-port", "0"]  # fmt: skip
    proc = subprocess.Popen(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", str(data), *cmd],
        env={**os.environ, "OTABOX_ADMIN_TOKEN": TOKEN},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    pid = http = None
    assert proc.stdout is not None
    for line in proc.stdout:
        if m := re.match(r"SERVER PID (\d+)", line):
            pid = int(m.group(1))
        if m := re.search(r"HTTP port (\d+)", line):
            http = int(m.group(1))
            break
    assert pid and http, "the server did not start"
    box = Boxed(proc, pid, f"http://127.0.0.1:{http}", Path(f"/proc/{pid}/root") / data.relative_to("/"))
    try:
        yield box
    finally:
        if proc.poll() is None:
            box.stop()


async def _upload(box: Boxed, version: str, size: int) -> Answer:
    form = aiohttp.FormData()
    form.add_field("name", "main")
    form.add_field("version", version)
    form.add_field("file", os.urandom(size), filename="fw.bin", content_type="application/octet-stream")
    return await box.call("POST", "/api/v1/products/pk1/firmware", data=form)


def _disk_full(answer: Answer) -> None:
    assert answer.status == 507, answer
    assert answer.body["error"]["code"] == "disk-full" and "disk is full" in answer.body["error"]["message"]


async def test_a_full_disk_refuses_writes_clearly_and_loses_nothing(boxed: Boxed) -> None:
    box = boxed
    api = "/api/v1/products/pk1"
    assert (await box.call("POST", "/api/v1/products", json={"productKey": "pk1"})).status == 201
    assert (await box.call("POST", f"{api}/devices", json={"deviceKey": "d1"})).status == 201
    assert (await _upload(box, "1.0.0", 4 * 1024 * 1024)).status == 201

    # An upload larger than the space left: refused, and no partial file stays behind.
    _disk_full(await _upload(box, "2.0.0", (SIZE_MB + 2) * 1024 * 1024))
    assert [f["version"] for f in (await box.call("GET", f"{api}/firmware")).body["items"]] == ["1.0.0"]
    assert list((box.data / "firmware" / "tmp").iterdir()) == []

    # The disk completely full: database writes are refused too; reads go on.
    filler = box.data / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 1024 * 1024)
                fh.flush()
        except OSError:
            pass
    made = 0
    for i in range(2000):  # SQLite may have free pages left in its file: use them up
        created = await box.call("POST", f"{api}/devices", json={"deviceKey": f"y{i}", "tags": {"t": "v" * 200}})
        if created.status != 201:
            break
        made += 1
    _disk_full(created)
    _disk_full(await _upload(box, "3.0.0", 64 * 1024))
    assert (await box.call("GET", f"{api}/devices/d1")).status == 200
    assert (await box.call("GET", "/healthz")).body["status"] == "ok"

    # Space again: writes work, nothing acknowledged was lost, the database is intact.
    filler.unlink()
    assert (await box.call("POST", f"{api}/devices", json={"deviceKey": "after"})).status == 201
    assert (await _upload(box, "3.0.0", 64 * 1024)).status == 201
    versions = sorted(f["version"] for f in (await box.call("GET", f"{api}/firmware")).body["items"])
    assert versions == ["1.0.0", "3.0.0"]
    assert (await box.call("GET", f"{api}/devices?limit=1")).body["total"] == 2 + made  # d1, after, the y*
    rest = box.stop()
    assert "SERVER EXIT 0" in rest and "INTEGRITY ok" in rest, rest
