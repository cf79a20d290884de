"""Kill -9 at random moments, again and again, while uploads, imports and a rollout run; after each
kill the data dir must hold everything that was acknowledged and nothing half-made.

Invariants checked on the database file itself after every kill (and through the API after the
restart): the database is intact; every firmware upload and device import that got its 201 is
there; every upgrade-log row of a task belongs to a task that exists; a job's total is its task
rows; every stored firmware file is whole (size and sha256 as recorded); once restarted, no
stored file is one no record refers to.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import Device, Server
from tests.test_restart import procs, spawn  # noqa: F401  (the fixture that kills what is left)

CYCLES = 6
SEED = 20261203


class Acked:
    """What the server acknowledged (201) before it was killed."""

    def __init__(self) -> None:
        self.firmware: dict[str, str] = {}  # id -> sha256
        self.devices: set[str] = set()
        self.imported = 0  # devices acknowledged by imports (beside the three made first)


async def uploads(server: Server, acked: Acked, cycle: int, rng: random.Random) -> None:
    for i in range(1000):
        content = rng.randbytes(rng.randrange(20_000, 400_000))
        with contextlib.suppress(aiohttp.ClientError, OSError, AssertionError):
            fw = await server.firmware("pk1", f"9.{cycle}.{i}", content, name="crash")
            acked.firmware[fw["id"]] = hashlib.sha256(content).hexdigest()


async def imports(server: Server, acked: Acked, cycle: int) -> None:
    for batch in range(1000):
        keys = [f"c{cycle}-b{batch}-{i}" for i in range(50)]
        body = "deviceKey\n" + "\n".join(keys) + "\n"
        with contextlib.suppress(aiohttp.ClientError, OSError, AssertionError):
            await server.call(
                "POST", "/products/pk1/devices:import", 200, data=body.encode(), headers={"Content-Type": "text/csv"}
            )
            acked.devices.update(keys)
            acked.imported += len(keys)


async def rollout(server: Server, devices: list[Device]) -> None:
    """Devices reporting progress on whatever was pushed to them, over and over."""
    with contextlib.suppress(Exception):
        for d in devices:
            await d.connect("1.0", port=server.mqtt_port)
        for step in range(1, 1000):
            for d in devices:
                await d.call("ota/device/progress", {"step": str(step % 90), "desc": "working"})


def check_database(data: Path, acked: Acked) -> None:
    db = sqlite3.connect(f"file:{data / 'otabox.db'}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        firmware = dict(db.execute("SELECT id, sha256 FROM firmware").fetchall())
        lost = {k for k in acked.firmware if k not in firmware}
        assert not lost, f"acknowledged firmware lost: {lost}"
        devices = {r[0] for r in db.execute("SELECT device_key FROM devices WHERE product_key = 'pk1'")}
        assert acked.devices <= devices, f"acknowledged devices lost: {len(acked.devices - devices)}"
        orphans = db.execute(
            "SELECT COUNT(*) FROM events e WHERE e.kind != 'job' AND NOT EXISTS"
            " (SELECT 1 FROM tasks t WHERE t.job_id = e.job_id AND t.device_key = e.device_key)"
        ).fetchone()[0]
        assert orphans == 0, f"{orphans} log rows of tasks that do not exist"
        for sha, size in db.execute("SELECT sha256, size FROM firmware"):
            path = data / "firmware" / sha[:2] / sha
            assert path.stat().st_size == size, f"firmware file {sha} is not whole"
            assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    finally:
        db.close()


async def test_kill_9_again_and_again_loses_nothing_acknowledged(tmp_path: Path, procs: list[Any]) -> None:  # noqa: F811
    rng = random.Random(SEED)
    data = tmp_path / "data"
    acked = Acked()
    for cycle in range(CYCLES):
        proc, server, http = await spawn(data)
        procs.append(proc)
        if cycle == 0:
            await server.product("pk1")
            fw = await server.firmware("pk1", "2.0", b"\x02" * 10_000)
            secrets = {dk: (await server.device(dk))["deviceSecret"] for dk in ("r1", "r2", "r3")}
            await server.call("POST", "/jobs", 201, json={"firmwareId": fw["id"], "timeoutSeconds": 3600})
            acked.devices.update(secrets)
        else:
            # Restarted: the API agrees with the file, and nothing unreferenced is stored.
            referenced = set(acked.firmware.values()) | {hashlib.sha256(b"\x02" * 10_000).hexdigest()}
            stored = {p.name for p in (data / "firmware").glob("??/*")}
            assert stored <= referenced | _all_digests(data), stored - referenced
            for job in (await server.call("GET", "/jobs", 200))["items"]:
                tasks = await server.call("GET", f"/jobs/{job['id']}/tasks?limit=1000", 200)
                assert job["total"] == tasks["total"] == sum(job["counts"].values())
        devices = [Device(server, "pk1", dk, s) for dk, s in secrets.items()]
        work = [
            asyncio.create_task(uploads(server, acked, cycle, rng)),
            asyncio.create_task(imports(server, acked, cycle)),
            asyncio.create_task(rollout(server, devices)),
        ]
        await asyncio.sleep(rng.uniform(0.3, 1.5))
        proc.kill()  # SIGKILL, mid-whatever
        await proc.wait()
        for task in work:
            task.cancel()
        await asyncio.gather(*work, return_exceptions=True)
        for d in devices:
            with contextlib.suppress(Exception):
                await d.close()
        await http.close()
        check_database(data, acked)
    # The workload did write between the kills (else the checks above proved nothing).
    assert len(acked.firmware) >= CYCLES and acked.imported >= 50 * CYCLES, (len(acked.firmware), acked.imported)


def _all_digests(data: Path) -> set[str]:
    db = sqlite3.connect(f"file:{data / 'otabox.db'}?mode=ro", uri=True)
    try:
        return {r[0] for r in db.execute("SELECT sha256 FROM firmware UNION SELECT sha256 FROM deltas")}
    finally:
        db.close()


async def test_a_file_left_by_a_crash_between_store_and_commit_is_swept_at_start(
    tmp_path: Path,
    procs: list[Any],  # noqa: F811
) -> None:
    data = tmp_path / "data"
    proc, server, http = await spawn(data)
    procs.append(proc)
    await server.product("pk1")
    fw = await server.firmware("pk1", "1.0", b"kept" * 1000)
    proc.kill()
    await proc.wait()
    await http.close()
    orphan = data / "firmware" / "ab" / ("ab" + "0" * 62)  # as if the row never committed
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"half a firmware")
    proc, server, http = await spawn(data)
    procs.append(proc)
    assert not orphan.exists()
    assert (data / "firmware" / fw["sha256"][:2] / fw["sha256"]).exists()
    await server.call("GET", f"/firmware/{fw['id']}", 200)
    await http.close()
