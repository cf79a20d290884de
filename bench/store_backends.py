"""The store on SQLite and on PostgreSQL, side by side: the write path device reports take.

    .venv/bin/python -m bench.store_backends [--tasks 5000] [--concurrency 200]

For each backend, a fresh store (a temp SQLite file; a database on a PostgreSQL that
scripts/postgres starts, with its test settings: fsync off), a job over N devices, then:

- serial: N/10 one-task transitions, one at a time (each its own commit: commit latency);
- concurrent: all N tasks moved pending -> published -> upgrading -> succeeded by C callers at
  once (what a fleet's reports do; group commit batches them): transitions/s, commits, ops/commit;
- reads: N `active_task` lookups, C at a time (the read each report does first).

Every transition writes its event in the same transaction, as in the server. Prints a table;
nothing is kept. PostgreSQL here runs on the same 2 cores as the benchmark, over TCP loopback
and over its unix socket.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from otabox.models import Firmware, FirmwareStatus, Job, JobSpec, JobStatus, JobType, PauseCause, TaskState
from otabox.server.store import Store

ROOT = Path(__file__).resolve().parent.parent


async def _setup(store: Store, n: int) -> None:
    await store.create_product("pk1", "bench")
    await store.create_devices("pk1", [(f"d{i:06}", "enc", "sign", {}) for i in range(n)])
    fw = Firmware("f1", "pk1", "fw", "2.0", "", 1, "m", "s", "sha256", "fw.bin", FirmwareStatus.UNVERIFIED,
                  False, 1, None, time.time())  # fmt: skip
    await store.create_firmware(fw)
    job = Job("j1", "bench", JobType.UPGRADE, "f1", "pk1", "2.0", JobStatus.RUNNING, "", PauseCause.NONE, 0, 0,
              time.time(), time.time(), None, JobSpec())  # fmt: skip
    await store.create_job(job, [(f"d{i:06}", "1.0", 0) for i in range(n)])


async def _measure(target: str | Path, n: int, concurrency: int) -> dict[str, Any]:
    store = await Store.open(target)
    try:
        await _setup(store, n)
        out: dict[str, Any] = {}
        serial = max(1, n // 10)
        started = time.perf_counter()
        for i in range(serial):
            await store.transition("j1", "pk1", f"d{i:06}", progress=1)
        out["serial commit ms"] = (time.perf_counter() - started) / serial * 1000

        keys = [f"d{i:06}" for i in range(n)]
        queue: asyncio.Queue[str] = asyncio.Queue()
        for dk in keys:
            queue.put_nowait(dk)

        async def report() -> None:
            while not queue.empty():
                dk = queue.get_nowait()
                for state in (TaskState.PUBLISHED, TaskState.UPGRADING, TaskState.SUCCEEDED):
                    await store.transition("j1", "pk1", dk, status=state)

        commits = store.commits
        started = time.perf_counter()
        await asyncio.gather(*(report() for _ in range(concurrency)))
        took = time.perf_counter() - started
        out["transitions/s"] = 3 * n / took
        out["commits"] = store.commits - commits
        out["ops/commit"] = 3 * n / max(1, store.commits - commits)
        assert await store.succeeded_count("j1") == n

        sem = asyncio.Semaphore(concurrency)

        async def read(dk: str) -> None:
            async with sem:
                await store.active_task("pk1", dk)

        started = time.perf_counter()
        await asyncio.gather(*(read(dk) for dk in keys))
        out["reads/s"] = n / (time.perf_counter() - started)
        return out
    finally:
        await store.close()


async def _fresh(url: str, name: str) -> str:
    """A new empty database on the server `url` names, and its URL."""
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    finally:
        await admin.close()
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=200)
    args = parser.parse_args(argv)
    n, c = args.tasks, args.concurrency
    script = ROOT / "scripts" / "postgres"
    started = subprocess.run([sys.executable, str(script), "start"], capture_output=True, text=True, check=True)
    pg = json.loads(started.stdout.strip().splitlines()[-1])
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = {
                "sqlite": asyncio.run(_measure(Path(tmp) / "otabox.db", n, c)),
                "postgresql": asyncio.run(_measure(asyncio.run(_fresh(pg["url"], "tcp")), n, c)),
                "pg unix socket": asyncio.run(_measure(asyncio.run(_fresh(pg["socket_url"], "unix")), n, c)),
            }
    finally:
        subprocess.run([sys.executable, str(script), "stop", pg["dir"]], check=False)
    names = list(results["sqlite"])
    print(f"{args.tasks} tasks, {args.concurrency} concurrent callers")
    print(f"{'':22}" + "".join(f"{b:>16}" for b in results))
    for name in names:
        print(f"{name:22}" + "".join(f"{results[b][name]:>16.1f}" for b in results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
