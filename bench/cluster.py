"""`python -m bench.cluster`: one node on SQLite vs one on PostgreSQL vs several on PostgreSQL, same run.

    python -m bench.cluster [--devices 10000] [--layouts sqlite1,pg1,pg3] [--image-kb 1024]
                            [--sims K] [--figure rollout|progress] [--json PATH] [--keep]

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

`--figure progress` replaces the simulators and the rollout by the progress figure of
`python -m bench` (see `run_progress`): K `bench.stormclient` processes connect the devices,
one push job goes to all of them, and each sends `--progress-reports` reports, each after the
previous reply; the storm, the push fan-out and the reports stored per second are measured.

What limits the figures: everything shares this machine's cores, PostgreSQL and the simulators
included (their CPU is printed beside each figure); one node's devices are capped by its open
files (20,000 here), so large fleets need several nodes. Results go to bench/cluster-results.json
and, in words, to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.clients import StormProcesses
from bench.servers import CLK_TCK, REPO, Proc, _cpu, _spawn, free_port, raise_nofile
from otabox.cli.client import Client
from otabox.cli.simulate import create_devices

TOKEN = "bench-cluster-token"
PK = "fleet"
POSTGRES = REPO / "scripts" / "postgres"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


STUCK = 30.0  # seconds without progress after which a count is taken as final


def until_all(what: str, count: Any, want: int, timeout: float, every: float = 0.25) -> int:
    """Poll `count()` until it reaches `want`, or has not grown for STUCK seconds; returns the last count."""
    deadline = time.monotonic() + timeout
    best, best_at = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = int(count())
        if n >= want:
            return n
        if n > best:
            best, best_at = n, time.monotonic()
        elif time.monotonic() - best_at > STUCK:
            log(f"{what}: stuck at {n} of {want} for {STUCK:.0f} s; going on")
            return n
        time.sleep(every)
    raise TimeoutError(f"{what}: {best} of {want} within {timeout:.0f} s")


def wait(what: str, check: Any, timeout: float, every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


class Node:
    def __init__(self, work: Path, name: str, database_url: str | None, node_timeout: float | None = None) -> None:
        self.name = name
        self.http, self.mqtt = free_port(), free_port()
        data = work / name
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTABOX_")}
        env["OTABOX_ADMIN_TOKEN"] = TOKEN
        argv = [sys.executable, "-m", "otabox", "serve", "--data-dir", str(data), "--host", "127.0.0.1"]
        argv += ["--http-port", str(self.http), "--mqtt-port", str(self.mqtt), "--node-id", name]
        argv += ["--log-level", "WARNING"]
        if node_timeout:
            argv += ["--node-timeout", str(node_timeout)]
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


# ---------------------------------------------------------------- readings


def pid_tree(pid: int) -> list[int]:
    pids = [pid]
    for p in pids:  # grows while iterating
        try:
            with open(f"/proc/{p}/task/{p}/children", encoding="ascii") as fh:
                pids += [int(c) for c in fh.read().split()]
        except OSError:
            pass
    return pids


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its live descendants (PostgreSQL's postmaster and backends)."""
    return sum(_cpu(p) for p in pid_tree(pid))


def all_cpu() -> dict[int, tuple[str, float]]:
    """(command name, CPU seconds) of every process on the machine: who else used the cores."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm", encoding="utf-8", errors="replace") as fh:
                    name = fh.read().strip()
            except OSError:
                continue
            out[int(entry)] = (name, _cpu(int(entry)))
    return out


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far (/proc/stat), every core summed."""
    with open("/proc/stat", encoding="ascii") as fh:
        ticks = [int(x) for x in fh.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    total = sum(ticks[:8])  # guest time is already inside user
    return (total - idle) / CLK_TCK, total / CLK_TCK


def health(node: Node) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.http}/healthz", timeout=10) as resp:
        found: dict[str, Any] = json.loads(resp.read())
        return found


def pg_query(url: str, sql: str) -> dict[str, Any]:
    import asyncio

    import asyncpg

    async def run() -> dict[str, Any]:
        conn = await asyncpg.connect(url)
        try:
            row = await conn.fetchrow(sql)
            return dict(row) if row else {}
        finally:
            await conn.close()

    return asyncio.run(run())


PG_COUNTERS = "xact_commit, tup_inserted, tup_updated, tup_deleted, blks_hit, blks_read"


def pg_stats(url: str) -> dict[str, int]:
    """The cumulative counters of this database (pg_stat_database), and its size."""
    sql = f"SELECT {PG_COUNTERS}, pg_database_size(current_database()) AS bytes"
    sql += " FROM pg_stat_database WHERE datname = current_database()"
    return {k: int(v) for k, v in pg_query(url, sql).items()}


def sqlite_bytes(node_dir: Path) -> int:
    return sum(f.stat().st_size for f in node_dir.glob("otabox.db*") if f.is_file())


def sim_summary(proc: Proc) -> dict[str, Any]:
    """The JSON summary a simulator prints when it stops (after its warnings); {} when none."""
    text = proc.log.read_text(errors="replace") if proc.log.exists() else ""
    at = text.find("\n{")
    at = 0 if text.startswith("{") else at + 1 if at >= 0 else -1
    if at < 0:
        return {}
    try:
        found: dict[str, Any] = json.loads(text[at:])
        return found
    except ValueError:
        return {}


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def log_rates(lines: list[str]) -> dict[str, Any]:
    """Rows of a job's upgrade log by kind, and the busiest 10 s of device reports stored."""
    kinds: dict[str, int] = {}
    reports: list[float] = []  # upgrading rows: each one a progress report a device sent
    for line in lines:
        row = json.loads(line)
        key = f"{row['kind']}:{row['status']}"
        kinds[key] = kinds.get(key, 0) + 1
        if row["status"] == "upgrading":
            reports.append(epoch(row["ts"]))
    reports.sort()
    peak, lo = 0, 0
    for hi, t in enumerate(reports):
        while reports[lo] < t - 10.0:
            lo += 1
        peak = max(peak, hi - lo + 1)
    span = (reports[-1] - reports[0]) if len(reports) > 1 else 0.0
    return {
        "rowsByKind": dict(sorted(kinds.items())),
        "progressReports": len(reports),
        "progressPerSecondMean": round(len(reports) / span, 1) if span else None,
        "progressPerSecondPeak10s": round(peak / 10.0, 1),
    }


class Meter:
    """CPU seconds of every party (nodes, PostgreSQL, simulators, the rest of the machine) over one phase."""

    def __init__(self, nodes: list[Node], sims: list[Proc], pg_pid: int | None, clients: Sequence[int] = ()) -> None:
        """`clients`: pids of load generators that are not `sims` (bench.stormclient), counted with them."""
        self.nodes, self.sims, self.pg_pid, self.clients = nodes, sims, pg_pid, clients
        self.t0 = time.monotonic()
        self.start = self._read()
        self.procs = all_cpu()

    def _read(self) -> dict[str, float]:
        out = {n.name: n.proc.cpu_seconds() for n in self.nodes}
        out["postgres"] = tree_cpu(self.pg_pid) if self.pg_pid else 0.0
        out["simulators"] = sum(s.cpu_seconds() for s in self.sims) + sum(tree_cpu(pid) for pid in self.clients)
        out["machineBusy"], out["machineTotal"] = machine_cpu()
        return out

    def stop(self) -> dict[str, Any]:
        end = self._read()
        d = {k: end[k] - self.start[k] for k in end}
        wall = time.monotonic() - self.t0
        ours = sum(v for k, v in d.items() if k not in ("machineBusy", "machineTotal"))
        out: dict[str, Any] = {k: round(v, 1) for k, v in d.items() if k not in ("machineBusy", "machineTotal")}
        out["others"] = round(max(0.0, d["machineBusy"] - ours), 1)  # processes outside this run
        ours_pids = {os.getpid(), *pid_tree(self.pg_pid or os.getpid())}
        for pid in [n.proc.pid for n in self.nodes] + [s.pid for s in self.sims] + list(self.clients):
            ours_pids.update(pid_tree(pid))
        now = all_cpu()
        used = [(cpu - self.procs.get(pid, ("", 0.0))[1], f"{name}[{pid}]") for pid, (name, cpu) in now.items()]
        busiest = sorted((u for u, pid in zip(used, now, strict=True) if pid not in ours_pids), reverse=True)
        out["othersTop"] = {who: round(sec, 1) for sec, who in busiest[:3] if sec >= 0.1}
        out["wallSeconds"] = round(wall, 1)
        out["machineBusyPercent"] = round(100 * d["machineBusy"] / d["machineTotal"], 1) if d["machineTotal"] else None
        return out


def watch_rollout(api: Client, job_id: str, missing: int, t1: float, max_seconds: float) -> tuple[Any, float | None]:
    """Until the job is done (or only the `missing` devices' tasks are left): its last state, the fan-out time."""
    fanout = None
    settled_at: float | None = None
    last_pending = -1
    while True:
        state = api.get(f"/jobs/{job_id}")
        c = state["counts"]
        if fanout is None and c["pending"] <= missing:
            fanout = time.monotonic() - t1
        if state["status"] not in ("running", "scheduled"):
            break
        # Nothing in flight and only tasks nobody will take left (devices that never connected, or
        # that the database wrongly shows offline: no push goes to them): settled, once it stays so.
        idle = not c["published"] and not c["upgrading"]
        if idle and (settled_at is None or c["pending"] != last_pending):
            settled_at, last_pending = time.monotonic(), c["pending"]
        elif not idle:
            settled_at = None
        if settled_at is not None and time.monotonic() - settled_at > (5 if c["pending"] <= missing else STUCK):
            log(f"rollout settled with {c['pending']} task(s) pending")
            break
        if time.monotonic() - t1 > max_seconds:
            raise TimeoutError(f"rollout not done in {max_seconds} s: {state['counts']}")
        time.sleep(0.5)
    return state, fanout


# ---------------------------------------------------------------- one layout


def run_layout(
    layout: str, args: argparse.Namespace, work: Path, pg: dict[str, Any] | None, result: dict[str, Any]
) -> dict[str, Any]:
    """Fills `result` as it goes (a failed layout keeps what was measured before it failed)."""
    count = layout_nodes(layout)[1]
    folder, url, pg_pid = layout_database(layout, work, pg, args, result)
    nodes: list[Node] = []
    sims: list[Proc] = []
    try:
        devices = start_fleet(nodes, folder, url, count, args)
        api = nodes[0].client
        parts = [devices[i :: args.sims] for i in range(args.sims)]
        time.sleep(3)  # the import's garbage settled
        rss0 = {n.name: n.proc.rss() for n in nodes}
        meter = Meter(nodes, sims, pg_pid)
        t0 = time.monotonic()
        for i, part in enumerate(parts):
            node = nodes[i % count]
            path = folder / f"sim{i}.csv"
            with path.open("w", newline="") as fh:
                csv.writer(fh).writerows(part)
            argv = [sys.executable, "-m", "otabox", "simulate", PK, "--url", f"http://127.0.0.1:{node.http}"]
            argv += ["--token", TOKEN, "--csv", str(path), "--mqtt-port", str(node.mqtt), "--json"]
            argv += ["--duration", str(3 * args.max_seconds), "--flash-time", "0.2-1", "--reboot-time", "0.2-1"]
            argv += ["--connect-concurrency", str(args.connect_concurrency), "--http-connections", "64"]
            sims.append(_spawn(f"sim{i}", argv, folder / f"sim{i}.log", cwd=REPO))
        per_node: dict[str, int] = {}

        def connected() -> int:
            for s in sims:
                if not s.alive():
                    raise RuntimeError(f"simulator {s.name} exited:\n{s.tail()}")
            per_node.update({n.name: int(health(n)["devicesConnected"]) for n in nodes})
            return sum(per_node.values())

        # Every device, or as many as come: a count that has not grown for STUCK seconds is final
        # (devices a node lost under overload and that never came back are recorded, not waited for).
        live = until_all("storm", connected, args.devices, args.max_seconds, every=0.1)
        storm = time.monotonic() - t0
        log(f"{layout}: storm {storm:.1f} s ({live} connected)")

        def reported() -> int:
            return int(api.get(f"/products/{PK}/devices", version="1.0.0", limit=1)["total"])

        told = until_all("versions reported", reported, args.devices, args.max_seconds)
        versions = time.monotonic() - t0
        result["storm"] = {"seconds": round(storm, 2), "versionsReportedSeconds": round(versions, 2)}
        result["storm"]["connected"], result["storm"]["versionsReported"] = live, told
        result["storm"]["cpuSeconds"] = meter.stop()
        time.sleep(5)  # the storm's garbage settled before the reading of memory
        rss1 = {n.name: n.proc.rss() for n in nodes}
        result["memory"] = {
            "rssIdleMiB": {k: round(v / 2**20, 1) for k, v in rss0.items()},
            "rssConnectedMiB": {k: round(v / 2**20, 1) for k, v in rss1.items()},
            "connected": dict(per_node),
            "kibPerConnection": {
                k: round((rss1[k] - rss0[k]) / 1024 / per_node[k], 1) for k in rss1 if per_node.get(k)
            },
        }
        image = folder / "fw.bin"
        image.write_bytes(os.urandom(args.image_kb * 1024))
        fw = api.upload_firmware(PK, image, {"name": "bench", "version": "2.0.0"})
        if url:
            time.sleep(11)  # idle backends flush their statistics within 10 s (PGSTAT_IDLE_INTERVAL)
            db0 = pg_stats(url)
        # What the job engine sees: it pushes only to devices the database shows online.
        result["storm"]["onlineInDatabase"] = int(api.get(f"/products/{PK}/devices", online="true", limit=1)["total"])
        missing = args.devices - told
        meter = Meter(nodes, sims, pg_pid)
        t1 = time.monotonic()
        spec: dict[str, Any] = {"firmwareId": fw["id"], "name": "bench", "scope": {"versionNumbers": ["1.0.0"]}}
        if args.max_concurrency:
            spec["maxConcurrency"] = args.max_concurrency
        job = api.post("/jobs", spec)
        state, fanout = watch_rollout(api, job["id"], missing, t1, args.max_seconds)
        rollout = time.monotonic() - t1
        cpu = meter.stop()
        rss2 = {n.name: n.proc.rss() for n in nodes}
        hwm = {n.name: n.proc.hwm() for n in nodes}
        lines = api.get("/events", jobId=job["id"]).splitlines()  # JSON lines: text
        rows = len(lines)
        result["rollout"] = {
            "fanoutSeconds": round(fanout or rollout, 2),
            "seconds": round(rollout, 2),
            "jobStatus": state["status"],
            "counts": {k: v for k, v in state["counts"].items() if v},
            "imageKiB": args.image_kb,
            "logRows": rows,
            "logRowsPerDevice": round(rows / args.devices, 2),
            "eventsPerSecond": round(rows / rollout, 1),
            **log_rates(lines),
            "cpuSeconds": cpu,
        }
        result["memory"]["rssAfterRolloutMiB"] = {k: round(v / 2**20, 1) for k, v in rss2.items()}
        result["memory"]["rssPeakMiB"] = {k: round(v / 2**20, 1) for k, v in hwm.items()}
        result["memory"]["rssPeakTotalMiB"] = round(sum(hwm.values()) / 2**20, 1)
        if url:
            time.sleep(11)
            db1 = pg_stats(url)
            delta = {k: db1[k] - db0[k] for k in db0 if k != "bytes"}
            result["database"] = {
                "during rollout": delta,
                "perDevice": {k: round(v / args.devices, 2) for k, v in delta.items() if not k.startswith("blks")},
                "rowWritesPerSecond": round((delta["tup_inserted"] + delta["tup_updated"]) / rollout, 1),
                "commitsPerSecond": round(delta["xact_commit"] / rollout, 1),
                "sizeMiB": round(db1["bytes"] / 2**20, 1),
            }
        else:
            result["database"] = {"sizeMiB": round(sqlite_bytes(folder / "node1") / 2**20, 1)}
        log(f"{layout}: {json.dumps(result)}")
        return result
    finally:
        for s in sims:
            s.stop(30)
        result["simulators"] = [{k: v for k, v in sim_summary(s).items() if k in SIM_KEYS} for s in sims]
        for n in nodes:
            n.proc.stop(30)


def layout_database(
    layout: str, work: Path, pg: dict[str, Any] | None, args: argparse.Namespace, result: dict[str, Any]
) -> tuple[Path, str | None, int | None]:
    """The layout's folder, its fresh PostgreSQL database (None on SQLite) and PostgreSQL's pid."""
    backend, count = layout_nodes(layout)
    folder = work / layout
    folder.mkdir()
    url = new_database(pg["url"], f"bench_{layout}") if backend == "pg" and pg else None
    pg_pid = int((Path(pg["dir"]) / "data" / "postmaster.pid").read_text().split()[0]) if url and pg else None
    result.update({"layout": layout, "nodes": count, "devices": args.devices, "sims": args.sims})
    result["backend"] = "sqlite" if backend == "sqlite" else "postgresql"
    return folder, url, pg_pid


def start_fleet(
    nodes: list[Node], folder: Path, url: str | None, count: int, args: argparse.Namespace
) -> list[tuple[str, str, str]]:
    """Start `count` nodes into `nodes` (the caller stops them, also those started before a
    failure), then create the product and its `--devices` devices: (key, secret, version)."""
    for i in range(count):
        nodes.append(Node(folder, f"node{i + 1}", url, args.node_timeout))
        wait(f"node{i + 1} ready", nodes[-1].ready, 60)  # one at a time: the first makes the schema
    nodes[0].client.post("/products", {"productKey": PK, "name": "bench fleet"})
    log(f"{folder.name}: creating {args.devices} devices")
    return create_devices(nodes[0].client, PK, args.devices, "d-", "1.0.0")


def run_progress(
    layout: str, args: argparse.Namespace, work: Path, pg: dict[str, Any] | None, result: dict[str, Any]
) -> dict[str, Any]:
    """`--figure progress`: the progress figure of `python -m bench`, on the layout's nodes.

    The devices are `bench.stormclient` processes (`--sims` of them, process i connected to
    node i % nodes): they connect, report 1.0.0, get the push of one job over all of them, then
    each sends `--progress-reports` reports, each after the previous reply (a reply is sent once
    the report's event is committed), `--connect-concurrency` devices in flight per process.
    The rate is from the first report sent to the last reply, over all the processes; the events
    stored in that time are counted through the API.
    """
    count = layout_nodes(layout)[1]
    folder, url, pg_pid = layout_database(layout, work, pg, args, result)
    nodes: list[Node] = []
    try:
        devices = start_fleet(nodes, folder, url, count, args)
        api = nodes[0].client
        image = folder / "fw.bin"
        image.write_bytes(os.urandom(args.image_kb * 1024))
        fw = api.upload_firmware(PK, image, {"name": "bench", "version": "2.0.0"})
        time.sleep(3)  # the import's garbage settled
        asyncio.run(_progress_phases(nodes, api, devices, fw, args, pg_pid, url, result))
        log(f"{layout}: {json.dumps(result)}")
        return result
    finally:
        for n in nodes:
            n.proc.stop(30)


async def _progress_phases(
    nodes: list[Node],
    api: Client,
    devices: list[tuple[str, str, str]],
    fw: dict[str, Any],
    args: argparse.Namespace,
    pg_pid: int | None,
    url: str | None,
    result: dict[str, Any],
) -> None:
    spec = {
        "host": "127.0.0.1",
        "ports": [n.mqtt for n in nodes],
        "pk": PK,
        "ts": str(int(time.time() * 1000)),
        "ca": None,
        "concurrency": args.connect_concurrency * args.sims,  # split between the processes
        "timeout": args.max_seconds,
    }
    procs = await StormProcesses.start(args.sims, [(k, secret, None, None) for k, secret, _ in devices], spec)
    clients = [p.pid for p in procs.procs]
    try:
        meter = Meter(nodes, [], pg_pid, clients)
        storm = await procs.storm(args.max_seconds)
        result["storm"] = {**storm, "cpuSeconds": meter.stop()}
        log(f"storm: {storm['connected']} connected in {storm['seconds']:.1f} s")
        inform = await procs.inform("1.0.0", args.max_seconds)
        result["inform"] = inform
        log(f"informs: {inform['ok']} answered in {inform['seconds']:.1f} s")
        meter = Meter(nodes, [], pg_pid, clients)
        job = api.post("/jobs", {"firmwareId": fw["id"], "name": "bench", "scope": {"versionNumbers": ["1.0.0"]}})
        push = await procs.pushes(args.max_seconds)
        result["push"] = {**push, "jobTotal": job["total"], "cpuSeconds": meter.stop()}
        log(f"push: {push['notified']} of {push['of']} notified in {push['seconds']:.1f} s")
        if url:
            await asyncio.sleep(11)  # idle backends flush their statistics within 10 s (PGSTAT_IDLE_INTERVAL)
            db0 = await asyncio.to_thread(pg_stats, url)  # it runs a loop of its own
        meter = Meter(nodes, [], pg_pid, clients)
        wall0 = time.time()
        progress = await procs.progress(args.progress_reports, args.max_seconds)
        cpu = meter.stop()
        lines = api.get("/events", jobId=job["id"]).splitlines()  # JSON lines: text
        stored = sum(1 for line in lines if epoch(json.loads(line)["ts"]) >= wall0)
        result["progress"] = {**progress, "eventsStored": stored, "cpuSeconds": cpu}
        if url:
            await asyncio.sleep(11)
            db1 = await asyncio.to_thread(pg_stats, url)
            delta = {k: db1[k] - db0[k] for k in db0 if k != "bytes"}
            result["database"] = {
                "during progress": delta,
                "commitsPerSecond": round(delta["xact_commit"] / progress["seconds"], 1),
            }
        log(
            f"progress: {progress['ok']} of {progress['sent']} answered 200 in {progress['seconds']:.1f} s"
            f" ({progress['perSecond']}/s); {stored} events stored; codes {progress['codes']}"
        )
        api.post(f"/jobs/{job['id']}/cancel", {})
        await procs.disconnect()
    finally:
        await procs.close()


SIM_KEYS = ("devices", "elapsedSeconds", "stoppedBy", "outcomes", "reconnects", "connectFailures", "connectSeconds")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n")[0] if __doc__ else "")
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--layouts", default="sqlite1,pg1,pg3", help="comma-separated: sqlite1, pg1, pg3, ... [%(default)s]")
    p.add_argument("--image-kb", type=int, default=1024, help="firmware image size, KiB [1024]")
    p.add_argument(
        "--sims", type=int, default=0, help="simulator processes [one per 5,000 devices, a multiple of the nodes]"
    )
    p.add_argument("--connect-concurrency", type=int, default=200, help="logins in flight per simulator [200]")
    p.add_argument("--max-seconds", type=float, default=900.0, help="bound of each phase [900]")
    p.add_argument("--max-concurrency", type=int, help="the job's maxConcurrency (upgrades in flight) [none]")
    p.add_argument("--node-timeout", type=float, help="the nodes' --node-timeout, seconds [the server's, 15]")
    p.add_argument(
        "--figure",
        choices=("rollout", "progress"),
        default="rollout",
        help="rollout: `otabox simulate` devices upgrade for real; progress: devices in bench.stormclient"
        " processes send progress reports only (the progress figure of `python -m bench`) [rollout]",
    )
    p.add_argument("--progress-reports", type=int, default=5, help="--figure progress: reports per device [5]")
    p.add_argument("--json", help="results file [bench/cluster-results.json; bench/cluster-progress.json]")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, data dirs)")
    args = p.parse_args(argv)
    if args.json is None:
        name = "cluster-results.json" if args.figure == "rollout" else "cluster-progress.json"
        args.json = str(REPO / "bench" / name)
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    try:
        most = max(layout_nodes(layout)[1] for layout in layouts)
    except ValueError as exc:
        p.error(str(exc))
    if not args.sims:  # every node gets as many simulators as the others
        args.sims = -(-max(2, -(-args.devices // 5000)) // most) * most
    nofile = raise_nofile()
    work = Path(tempfile.mkdtemp(prefix="otabox-bench-cluster-"))
    log(f"work in {work}; open files limit {nofile}; {args.sims} simulators")
    pg = start_postgres() if any(x.startswith("pg") for x in layouts) else None
    out: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cores": os.cpu_count(), "openFilesLimit": nofile, "memMiB": mem_mib()},
        "otaboxCommit": commit(),
        "devices": args.devices,
        "imageKiB": args.image_kb,
        "sims": args.sims,
        "nodeTimeout": args.node_timeout,
        "maxConcurrency": args.max_concurrency,
        "figure": args.figure,
        "results": [],
    }
    failed = 0
    try:
        for layout in layouts:
            result: dict[str, Any] = {"layout": layout}
            out["results"].append(result)
            try:
                (run_layout if args.figure == "rollout" else run_progress)(layout, args, work, pg, result)
            except Exception as exc:  # the next layouts still run; the JSON tells what broke
                failed += 1
                log(f"{layout}: FAILED: {exc!r}")
                result["error"] = repr(exc)
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    finally:
        if pg:
            subprocess.run([sys.executable, str(POSTGRES), "stop", pg["dir"]], timeout=60, check=False)
        if not args.keep:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    if args.figure == "progress":
        print(f"{'layout':8} {'storm s':>8} {'push s':>8} {'reports':>8} {'stored':>8} {'reports/s':>9}")
        for r in out["results"]:
            if "progress" not in r:
                print(f"{r['layout']:8} failed: {r.get('error')}")
                continue
            pr = r["progress"]
            row = f"{r['layout']:8} {r['storm']['seconds']:8.1f} {r['push']['seconds']:8.1f} {pr['ok']:8}"
            print(f"{row} {pr['eventsStored']:8} {pr['perSecond'] or 0:9.0f}")
        return 1 if failed else 0
    print(f"{'layout':8} {'storm s':>8} {'fan-out s':>9} {'rollout s':>9} {'reports/s':>9}  node RSS MiB (peak)")
    for r in out["results"]:
        if "error" in r:
            print(f"{r['layout']:8} failed: {r['error']}")
            continue
        ro = r["rollout"]
        rss = ", ".join(f"{v:.0f}" for v in r["memory"]["rssPeakMiB"].values())
        row = f"{r['layout']:8} {r['storm']['seconds']:8.1f} {ro['fanoutSeconds']:9.1f} {ro['seconds']:9.1f}"
        print(f"{row} {ro['progressPerSecondMean'] or 0:9.0f}  {rss}")
    return 1 if failed else 0


def commit() -> str:
    """The commit of the code measured: git's, or BENCH_COMMIT for a copy made with `git archive`."""
    done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    status = ["git", "-C", str(REPO), "status", "--porcelain", "otabox"]
    dirty = subprocess.run(status, capture_output=True, check=False)
    if done.returncode == 0:
        return done.stdout.strip() + (" (otabox/ modified)" if dirty.stdout.strip() else "")
    return os.environ.get("BENCH_COMMIT", "unknown")


def mem_mib() -> int:
    with open("/proc/meminfo", encoding="ascii") as fh:
        return int(fh.readline().split()[1]) // 1024


if __name__ == "__main__":
    sys.exit(main())
