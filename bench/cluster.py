"""`python -m bench.cluster`: one node on SQLite vs one on PostgreSQL vs several on PostgreSQL, same run.

    python -m bench.cluster [--devices 10000] [--layouts sqlite1,pg1,pg3] [--image-kb 1024]
                            [--sims K] [--json PATH] [--keep]

For each layout: a fresh data dir per node (and, on PostgreSQL, a fresh database on one
`scripts/postgres` server), the nodes as `python -m otabox serve` child processes on 127.0.0.1,
N devices created through the API, and K `otabox simulate` processes (the load generators,
each with its share of the devices, connected straight to one node: node i gets the devices of
simulators i, i+nodes, ...). Measured, per layout:

- storm: from the simulators' start until every device is connected and has reported its
  version (the sum of `devicesConnected` over `GET /nodes`, and the devices' `version`);
- fan-out: from creating one push job over every device until none is pending any more;
- rollout: from the job's creation until it is completed (every device downloads the image of
  `--image-kb` from a node, reports progress, reboots and reports the new version);
- events/s: upgrade-log rows written during the rollout per second (state and progress rows);
- RSS of each node at the end, and the database's size.

What limits the figures: everything shares this machine's cores, PostgreSQL and the simulators
included (their CPU is printed beside each figure); one node's devices are capped by its open
files (20,000 here), so large fleets need several nodes. Results go to bench/cluster-results.json
and, in words, to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.servers import REPO, Proc, _spawn, free_port, raise_nofile
from otabox.cli.client import Client
from otabox.cli.simulate import create_devices

TOKEN = "bench-cluster-token"
PK = "fleet"
POSTGRES = REPO / "scripts" / "postgres"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def wait(what: str, check: Any, timeout: float, every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


class Node:
    def __init__(self, work: Path, name: str, database_url: str | None) -> None:
        self.name = name
        self.http, self.mqtt = free_port(), free_port()
        data = work / name
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTABOX_")}
        env["OTABOX_ADMIN_TOKEN"] = TOKEN
        argv = [sys.executable, "-m", "otabox", "serve", "--data-dir", str(data), "--host", "127.0.0.1"]
        argv += ["--http-port", str(self.http), "--mqtt-port", str(self.mqtt), "--node-id", name]
        argv += ["--log-level", "WARNING"]
        if database_url:
            argv += ["--database-url", database_url]
        self.proc: Proc = _spawn(f"otabox-{name}", argv, work / f"{name}.log", env=env, cwd=REPO)
        self.client = Client(f"http://127.0.0.1:{self.http}", TOKEN)

    def ready(self) -> bool:
        if not self.proc.alive():
            raise RuntimeError(f"node {self.name} exited:\n{self.proc.tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/healthz", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False


def start_postgres() -> dict[str, Any]:
    """One throw-away server (scripts/postgres) in a folder of its own: as root the cluster belongs to
    an unprivileged user, who cannot enter our 0700 work folder. Stopped when this process ends."""
    done = subprocess.run(
        [sys.executable, str(POSTGRES), "start", "--owner-pid", str(os.getpid())],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"scripts/postgres start failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    info: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return info


def new_database(server_url: str, name: str) -> str:
    import asyncio

    import asyncpg

    async def create() -> None:
        conn = await asyncpg.connect(server_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        finally:
            await conn.close()

    asyncio.run(create())
    base, _, _ = server_url.rpartition("/")
    return f"{base}/{name}"


def layout_nodes(layout: str) -> tuple[str, int]:
    backend, count = layout[:-1], int(layout[-1])
    if backend not in ("sqlite", "pg") or count < 1 or (backend == "sqlite" and count != 1):
        raise ValueError(f"layout {layout!r}: sqlite1, or pgN (N nodes on PostgreSQL)")
    return backend, count


def run_layout(layout: str, args: argparse.Namespace, work: Path, pg: dict[str, Any] | None) -> dict[str, Any]:
    backend, count = layout_nodes(layout)
    folder = work / layout
    folder.mkdir()
    url = new_database(pg["url"], f"bench_{layout}") if backend == "pg" and pg else None
    nodes: list[Node] = []
    sims: list[Proc] = []
    try:
        for i in range(count):
            nodes.append(Node(folder, f"node{i + 1}", url))
            wait(f"node{i + 1} ready", nodes[-1].ready, 60)  # one at a time: the first makes the schema
        api = nodes[0].client
        api.post("/products", {"productKey": PK, "name": "bench fleet"})
        log(f"{layout}: creating {args.devices} devices")
        devices = create_devices(api, PK, args.devices, "d-", "1.0.0")
        parts = [devices[i :: args.sims] for i in range(args.sims)]
        t0 = time.monotonic()
        for i, part in enumerate(parts):
            node = nodes[i % count]
            path = folder / f"sim{i}.csv"
            with path.open("w", newline="") as fh:
                csv.writer(fh).writerows(part)
            argv = [sys.executable, "-m", "otabox", "simulate", PK, "--url", f"http://127.0.0.1:{node.http}"]
            argv += ["--token", TOKEN, "--csv", str(path), "--mqtt-port", str(node.mqtt), "--json"]
            argv += ["--duration", str(args.max_seconds), "--flash-time", "0.2-1", "--reboot-time", "0.2-1"]
            argv += ["--connect-concurrency", "200", "--http-connections", "64"]
            sims.append(_spawn(f"sim{i}", argv, folder / f"sim{i}.log", cwd=REPO))

        def connected() -> bool:
            listed = api.get("/nodes")["items"]
            return sum(n["devicesConnected"] for n in listed) >= args.devices

        wait("storm", connected, args.max_seconds, every=0.1)
        storm = time.monotonic() - t0

        def reported() -> bool:
            return bool(api.get(f"/products/{PK}/devices", version="1.0.0", limit=1)["total"] >= args.devices)

        wait("versions reported", reported, 120)
        log(f"{layout}: storm {storm:.1f} s")
        image = folder / "fw.bin"
        image.write_bytes(os.urandom(args.image_kb * 1024))
        fw = api.upload_firmware(PK, image, {"name": "bench", "version": "2.0.0"})
        cpu0 = {n.name: n.proc.cpu_seconds() for n in nodes}
        t1 = time.monotonic()
        job = api.post("/jobs", {"firmwareId": fw["id"], "name": "bench", "scope": {"versionNumbers": ["1.0.0"]}})
        fanout = None
        while True:
            state = api.get(f"/jobs/{job['id']}")
            if fanout is None and state["counts"]["pending"] == 0:
                fanout = time.monotonic() - t1
            if state["status"] not in ("running", "scheduled"):
                break
            if time.monotonic() - t1 > args.max_seconds:
                raise TimeoutError(f"rollout not done in {args.max_seconds} s: {state['counts']}")
            time.sleep(0.2)
        rollout = time.monotonic() - t1
        rows = len(api.get("/events", jobId=job["id"]).splitlines())  # JSON lines: text
        result = {
            "layout": layout,
            "nodes": count,
            "backend": "sqlite" if backend == "sqlite" else "postgresql",
            "devices": args.devices,
            "stormSeconds": round(storm, 2),
            "fanoutSeconds": round(fanout or rollout, 2),
            "rolloutSeconds": round(rollout, 2),
            "jobStatus": state["status"],
            "counts": {k: v for k, v in state["counts"].items() if v},
            "logRows": rows,
            "eventsPerSecond": round(rows / rollout, 1),
            "imageKiB": args.image_kb,
            "nodeRssMiB": {n.name: round(n.proc.rss() / 2**20) for n in nodes},
            "nodeCpuSecondsRollout": {n.name: round(n.proc.cpu_seconds() - cpu0[n.name], 1) for n in nodes},
            "simCpuSeconds": round(sum(s.cpu_seconds() for s in sims), 1),
        }
        log(f"{layout}: {json.dumps(result)}")
        return result
    finally:
        for s in sims:
            s.stop()
        for n in nodes:
            n.proc.stop(30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n")[0] if __doc__ else "")
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--layouts", default="sqlite1,pg1,pg3", help="comma-separated: sqlite1, pg1, pg3, ... [%(default)s]")
    p.add_argument("--image-kb", type=int, default=1024, help="firmware image size, KiB [1024]")
    p.add_argument("--sims", type=int, default=0, help="simulator processes [one per 5,000 devices, at least 2]")
    p.add_argument("--max-seconds", type=float, default=900.0, help="bound of each phase [900]")
    p.add_argument("--json", default=str(REPO / "bench" / "cluster-results.json"))
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, data dirs)")
    args = p.parse_args(argv)
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    try:
        for layout in layouts:
            layout_nodes(layout)
    except ValueError as exc:
        p.error(str(exc))
    args.sims = args.sims or max(2, -(-args.devices // 5000))
    nofile = raise_nofile()
    work = Path(tempfile.mkdtemp(prefix="otabox-bench-cluster-"))
    log(f"work in {work}; open files limit {nofile}")
    pg = start_postgres() if any(x.startswith("pg") for x in layouts) else None
    results = []
    try:
        for layout in layouts:
            results.append(run_layout(layout, args, work, pg))
    finally:
        if pg:
            subprocess.run([sys.executable, str(POSTGRES), "stop", pg["dir"]], timeout=60, check=False)
        if not args.keep:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    out = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "devices": args.devices, "results": results}
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'layout':8} {'storm s':>8} {'fan-out s':>9} {'rollout s':>9} {'events/s':>9}  node RSS MiB")
    for r in results:
        rss = ", ".join(f"{v}" for v in r["nodeRssMiB"].values())
        row = f"{r['layout']:8} {r['stormSeconds']:8.1f} {r['fanoutSeconds']:9.1f} {r['rolloutSeconds']:9.1f}"
        print(f"{row} {r['eventsPerSecond']:9.0f}  {rss}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
