"""otabox benchmark: start a fresh otabox, load it with simulated devices, compare with mosquitto and nginx.

    python -m bench [--devices N | --quick] [--only storm,rss,push,progress,rollout,download,rtt]
                    [--skip-reference] [--json PATH] [--profile DIR] [--max-minutes M] [--keep]

Everything runs on 127.0.0.1. otabox, mosquitto and nginx run as child processes (so the load
generator, this process, has its own core and file descriptors); each figure has a time bound
and the run stops every process it started, also on Ctrl-C. Usage and results: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench import clients
from bench.clients import Dev
from bench.servers import (
    REPO,
    Proc,
    ensure_debian,
    raise_nofile,
    start_mosquitto,
    start_nginx,
    start_otabox,
    start_profiler,
)
from otabox import protocol

FIGURES = ("storm", "rss", "push", "progress", "rollout", "download", "rtt")
PK = "bench"  # the product of the load devices
RTT_PK = "benchrtt"  # the round-trip device lives in its own product, outside every job's scope
MB = 1024 * 1024

# Targets of the issue, for 10,000 devices on a 2-core machine.
TARGETS = {"storm": 10.0, "rss": 600.0, "push": 10_000.0, "rollout": 300.0}
TARGET_N = 10_000


@dataclass
class Plan:
    """Workload sizes and time bounds (seconds) of one run."""

    devices: int
    quick: bool
    connect_concurrency: int = 1000
    progress_reports: int = 5
    download_clients: int = 20
    download_mb: int = 50
    download_seconds: float = 15.0
    download_max: int = 2000
    rtt_samples: int = 300
    storm_repeats: int = 3
    t_storm: float = 90.0
    t_inform: float = 90.0
    t_push: float = 240.0
    t_progress: float = 120.0
    t_rollout: float = 480.0

    @classmethod
    def make(cls, devices: int, quick: bool) -> Plan:
        p = cls(devices=devices, quick=quick)
        if quick:
            p.download_mb, p.download_seconds, p.download_max, p.rtt_samples = 10, 5.0, 500, 100
            p.storm_repeats = 1
        # Time bounds scale with N (floor for small runs): a slow server ends figures, not the run.
        scale = max(0.25, devices / TARGET_N)
        p.t_storm, p.t_inform, p.t_push = (max(30.0, t * scale) for t in (p.t_storm, p.t_inform, p.t_push))
        p.t_progress = max(30.0, p.t_progress * scale)
        p.t_rollout = max(90.0, p.t_rollout * scale)
        return p


@dataclass
class Row:
    """One line of the results table."""

    key: str
    name: str
    unit: str
    better: str  # "lower" or "higher"
    otabox: float | None = None
    reference: float | None = None
    ref_name: str = ""
    target: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.otabox is None or not self.reference:
            return None
        return self.otabox / self.reference

    def met(self, n: int) -> bool | None:
        if self.target is None or self.otabox is None or n < TARGET_N:
            return None
        return self.otabox <= self.target if self.better == "lower" else self.otabox >= self.target

    def as_json(self, n: int) -> dict[str, Any]:
        ratio = self.ratio
        return {
            "key": self.key,
            "figure": self.name,
            "unit": self.unit,
            "better": self.better,
            "otabox": self.otabox,
            "reference": self.reference,
            "referenceName": self.ref_name or None,
            "ratio": round(ratio, 3) if ratio is not None else None,
            "target": self.target,
            "met": self.met(n),
            "note": self.note,
        }


def git(*argv: str) -> str:
    try:
        return subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def source_state() -> dict[str, Any]:
    """The commit and the uncommitted changes under otabox/ (the server code a run measures)."""
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted": git("status", "--short", "otabox").splitlines(),
    }


@dataclass
class Run:
    """State shared by the steps of one run."""

    args: argparse.Namespace
    plan: Plan
    work: Path
    only: set[str]
    rows: dict[str, Row] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=source_state)  # taken when the run starts
    deadline: float = 0.0  # monotonic end of the whole run's time budget
    reserve: float = 0.0  # seconds of the budget kept for the references while otabox runs

    def bound(self, timeout: float) -> float:
        """A figure's time bound, cut to what the run's budget has left (at least 5 s)."""
        return max(5.0, min(timeout, self.deadline - self.reserve - time.monotonic()))

    def row(self, key: str, name: str, unit: str, better: str, target: float | None = None) -> Row:
        if key not in self.rows:
            self.rows[key] = Row(key, name, unit, better, target=target)
        return self.rows[key]

    def detail(self, section: str, **values: Any) -> None:
        self.details.setdefault(section, {}).update(values)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full (all sockets)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenOverflows", 0))
    return 0


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Monitor:
    """Samples a server's RSS in the background; `phase()` records wall time, CPU of both sides and RSS peak."""

    def __init__(self, proc: Proc, profile_dir: Path | None = None) -> None:
        self.proc = proc
        self.profile_dir = profile_dir
        self.peak = 0
        self.phases: dict[str, dict[str, Any]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._sample())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.proc.rss())
            await asyncio.sleep(0.2)

    @contextlib.asynccontextmanager
    async def phase(self, name: str) -> AsyncIterator[dict[str, Any]]:
        info: dict[str, Any] = {}
        self.peak = self.proc.rss()
        t0, s0, h0, o0 = time.monotonic(), self.proc.cpu_seconds(), _self_cpu(), listen_overflows()
        spy = None
        if self.profile_dir is not None:
            spy = start_profiler(self.proc, self.profile_dir / f"{self.proc.name}-{name}.txt", 3600)
        try:
            yield info
        finally:
            wall = max(1e-6, time.monotonic() - t0)
            info.update(
                wallSeconds=round(wall, 2),
                serverCpuPercent=round(100 * (self.proc.cpu_seconds() - s0) / wall),
                harnessCpuPercent=round(100 * (_self_cpu() - h0) / wall),
                serverRssPeakMB=round(max(self.peak, self.proc.rss()) / MB, 1),
                listenOverflows=listen_overflows() - o0,
            )
            self.phases[name] = info
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                try:
                    spy.wait(30)
                except subprocess.TimeoutExpired:
                    spy.kill()
                assert self.profile_dir is not None
                summarize_profile(self.profile_dir / f"{self.proc.name}-{name}.txt")


def summarize_profile(raw: Path, top: int = 25) -> None:
    """Write <raw>.top: the functions with the most samples on CPU, self and inclusive."""
    if not raw.exists():
        return
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += int(n)
        own[frames[-1]] += int(n)
        for f in set(frames):
            incl[f] += int(n)
    if not total:
        return
    out = [f"{total} samples on CPU", "", "self:"]
    out += [f"{100 * c / total:5.1f}%  {f}" for f, c in own.most_common(top)]
    out += ["", "inclusive:"]
    out += [f"{100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(top * 2)]
    raw.with_suffix(".top").write_text("\n".join(out) + "\n")


# ---------------------------------------------------------------- the management API


class Api:
    def __init__(self, http: aiohttp.ClientSession, base: str, token: str) -> None:
        self.http = http
        self.base = base
        self.headers = {"Authorization": f"Bearer {token}"}

    async def call(self, method: str, path: str, *, timeout: float = 300, **kw: Any) -> Any:
        async with self.http.request(
            method,
            self.base + "/api/v1" + path,
            headers=self.headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
            **kw,
        ) as resp:
            body = await resp.read()
            if resp.status >= 300:
                raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {body[:300]!r}")
            return json.loads(body) if body else None

    async def healthz(self) -> dict[str, Any]:
        async with self.http.get(self.base + "/healthz", timeout=aiohttp.ClientTimeout(total=30)) as resp:
            data: dict[str, Any] = await resp.json()
            return data

    async def import_devices(self, pk: str, keys: list[str]) -> dict[str, str]:
        secrets_by_key: dict[str, str] = {}
        for i in range(0, len(keys), 5000):
            result = await self.call(
                "POST", f"/products/{pk}/devices:import", json=[{"deviceKey": k} for k in keys[i : i + 5000]]
            )
            if result["rejected"]:
                raise RuntimeError(f"device import rejected {result['rejected']}: {result['errors'][:3]}")
            secrets_by_key.update((d["deviceKey"], d["deviceSecret"]) for d in result["devices"])
        return secrets_by_key

    async def upload(self, pk: str, name: str, version: str, path: Path) -> dict[str, Any]:
        with open(path, "rb") as fh:
            form = aiohttp.FormData()
            form.add_field("name", name)
            form.add_field("version", version)
            form.add_field("file", fh, filename=path.name, content_type="application/octet-stream")
            fw: dict[str, Any] = await self.call("POST", f"/products/{pk}/firmware", data=form)
            return fw

    async def create_job(self, firmware_id: str, name: str) -> dict[str, Any]:
        # No maxConcurrency, no rate: the whole scope is pushed as fast as the server can.
        body = {"firmwareId": firmware_id, "type": "upgrade", "name": name, "mode": "push", "timeoutSeconds": 3600}
        job: dict[str, Any] = await self.call("POST", "/jobs", json=body)
        return job

    async def events(self, job_id: str | None = None, since: float | None = None) -> int:
        q = []
        if job_id:
            q.append(f"jobId={job_id}")
        if since is not None:
            q.append("since=" + datetime.datetime.fromtimestamp(since, datetime.UTC).isoformat().replace("+00:00", "Z"))
        return await clients.count_lines(self.http, self.base + "/api/v1/events?" + "&".join(q), self.headers)


# ---------------------------------------------------------------- otabox figures


async def bench_otabox(run: Run) -> None:
    plan, only = run.plan, run.only
    token = "bench-" + secrets.token_hex(12)
    log("starting otabox")
    proc, http_port, mqtt_port = start_otabox(run.work, token, run.args.server_log_level)
    run.procs.append(proc)
    profile = Path(run.args.profile) if run.args.profile else None
    mon = Monitor(proc, profile)
    mon.start()
    run.detail("otabox", pid=proc.pid, startRssMB=round(proc.rss() / MB, 1), log=str(proc.log))
    host = "127.0.0.1"
    ts = str(int(time.time() * 1000))
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
            api = Api(http, f"http://{host}:{http_port}", token)
            n = plan.devices
            width = max(5, len(str(n)))
            keys = [f"dev-{i:0{width}d}" for i in range(1, n + 1)]
            log(f"creating {n} devices and {3 if 'download' in only else 2} firmware")
            t = time.monotonic()
            await api.call("POST", "/products", json={"productKey": PK, "name": "benchmark devices"})
            await api.call("POST", "/products", json={"productKey": RTT_PK, "name": "benchmark round trips"})
            secret = await api.import_devices(PK, keys)
            rtt_secret = await api.import_devices(RTT_PK, ["rtt-1"])
            run.detail("setup", importSeconds=round(time.monotonic() - t, 2))
            fw_push = await api.upload(PK, "bench-push", "2.0.0", make_file(run.work / "push.bin", 1 * MB))
            fw_roll = await api.upload(PK, "bench-rollout", "3.0.0", make_file(run.work / "rollout.bin", 1 * MB))
            rtt_dev = Dev("rtt-1", rtt_secret["rtt-1"])
            await rtt_dev.connect(host, mqtt_port, RTT_PK, ts)
            await rtt_dev.call(RTT_PK, protocol.INFORM, "ota.device.inform", {"version": "0.0.1"})

            devs = [Dev(k, secret[k]) for k in keys]
            if only & {"storm", "rss", "push", "progress"}:
                await otabox_devices(run, api, mon, devs, host, mqtt_port, ts, fw_push)
            if "rollout" in only:
                await otabox_rollout(run, api, mon, keys, secret, host, mqtt_port, fw_roll)
            if only & {"download", "rtt"}:
                await otabox_downloads(run, api, mon, rtt_dev, keys)
            rtt_dev.client.close()
            peak = max(proc.hwm(), mon.peak)
            run.detail("otabox", peakRssMB=round(peak / MB, 1), phases=mon.phases)
            if "rss" in only:
                run.row("rss_peak", "server peak RSS over the run", "MB", "lower", TARGETS["rss"]).otabox = round(
                    peak / MB, 1
                )
    finally:
        await mon.stop()
        log("stopping otabox")
        proc.stop()


def make_file(path: Path, size: int) -> Path:
    with open(path, "wb") as fh:
        left = size
        while left:
            chunk = os.urandom(min(left, MB))
            fh.write(chunk)
            left -= len(chunk)
    return path


async def repeated_storm(
    run: Run, mon: Monitor, devs: list[Dev], host: str, port: int, ts: str, settle: Callable[[], Awaitable[Any]]
) -> dict[str, Any]:
    """The storm `plan.storm_repeats` times (all disconnect in between); the median time of complete runs.

    The last run leaves the devices connected and is the one whose load (and profile) is recorded as "storm".
    """
    plan, n = run.plan, len(devs)
    times: list[float] = []
    st: dict[str, Any] = {}
    for i in range(plan.storm_repeats):
        if i and times[-1] > 30:
            break  # one slow storm says enough; the budget is better spent on the other figures
        if i:
            await clients.disconnect_all(devs)
            await settle()
        last = i == plan.storm_repeats - 1
        async with mon.phase("storm" if last else f"storm-{i + 1}") as ph:
            st = await clients.storm(devs, host, port, PK, ts, plan.connect_concurrency, run.bound(plan.t_storm))
        st["phase"] = ph
        log(f"  {st['connected']}/{n} connected in {st['seconds']:.2f}s ({st['failures']} failures)")
        if not st["complete"]:
            return st  # a storm that did not finish is the figure: no median hides it
        times.append(st["seconds"])
    st["runs"] = times
    st["seconds"] = statistics.median(times)
    return st


async def otabox_devices(
    run: Run, api: Api, mon: Monitor, devs: list[Dev], host: str, port: int, ts: str, fw: dict[str, Any]
) -> None:
    plan, n = run.plan, run.plan.devices
    log(f"storm: connecting {n} devices, {plan.connect_concurrency} in flight, {plan.storm_repeats} time(s)")
    st = await repeated_storm(run, mon, devs, host, port, ts, lambda: wait_connected(api, 0, 60))
    run.detail("storm", **st)
    row = run.row("storm", f"connect storm, {n} devices", "s", "lower", TARGETS["storm"])
    row.otabox = st["seconds"] if st["complete"] else None
    row.note = "" if st["complete"] else f"only {st['connected']}/{n} within the time bound"
    live = [d for d in devs if d.client.connected]

    async with mon.phase("inform") as ph:
        inf = await clients.calls(
            live,
            lambda d, i: (protocol.INFORM, "ota.device.inform", {"version": "1.0.0"}),
            PK,
            1,
            plan.connect_concurrency,
            run.bound(plan.t_inform),
        )
    run.detail("inform", **inf, phase=ph)
    log(f"  informs answered: {inf['ok']}/{len(live)} in {inf['seconds']:.2f}s ({inf['perSecond']}/s)")
    row = run.row("storm_inform", "connect + inform answered", "s", "lower")
    row.otabox = round(st["seconds"] + inf["seconds"], 3) if inf["complete"] and st["complete"] else None
    if not inf["complete"]:
        row.note = f"{inf['ok']}/{len(live)} informs answered ({inf['codes']})"
    rss = mon.proc.rss()
    run.detail("rss", connectedRssMB=round(rss / MB, 1), connected=len(live))
    if "rss" in run.only:
        run.row("rss", f"server RSS, {len(live)} connected", "MB", "lower", TARGETS["rss"]).otabox = round(rss / MB, 1)

    if not run.only & {"push", "progress"}:
        await clients.disconnect_all(devs)
        return
    log(f"push: one job for {len(live)} connected devices")
    async with mon.phase("push") as ph:
        t0 = time.monotonic()
        job = await api.create_job(fw["id"], "bench push")
        created = time.monotonic() - t0
        push = await clients.wait_pushes(live, t0, t_push := run.bound(plan.t_push))
    run.detail("push", **push, jobCreateSeconds=round(created, 3), jobTotal=job["total"], phase=ph)
    log(f"  {push['notified']}/{len(live)} notified in {push['seconds']:.2f}s (job created in {created:.2f}s)")
    rate = push["perSecond"] if push["complete"] else None
    note = "" if push["complete"] else f"only {push['notified']}/{len(live)} within {t_push:.0f}s"
    r = run.row("own_topic", "server → device own topic", "msg/s", "higher")
    r.otabox, r.note = rate, note + ("; " if note else "") + "otabox: job push (store write + QoS 1 publish per device)"
    r = run.row("push", f"push fan-out of one job, {len(live)} devices", "devices/min", "higher", TARGETS["push"])
    r.otabox, r.note = (round(rate * 60) if rate else None), note

    if "progress" in run.only:
        pushed = [d for d in live if d.pushed_at]
        k = plan.progress_reports
        log(f"progress: {len(pushed)} devices x {k} reports, each after the previous reply")
        wall0 = time.time()
        async with mon.phase("progress") as ph:
            pr = await clients.calls(
                pushed,
                lambda d, i: (protocol.PROGRESS, "ota.device.progress", {"step": str(10 * (i + 1)), "desc": "bench"}),
                PK,
                k,
                plan.connect_concurrency,
                t_progress := run.bound(plan.t_progress),
            )
        stored = await api.events(job["id"], since=wall0 - 0.001)
        run.detail("progress", **pr, eventsStored=stored, phase=ph)
        log(
            f"  {pr['ok']}/{len(pushed) * k} answered 200 in {pr['seconds']:.2f}s ({pr['perSecond']}/s);"
            f" {stored} events stored"
        )
        r = run.row("progress", "device → server progress, stored", "msg/s", "higher")
        r.otabox = pr["perSecond"] if pr["ok"] else None
        notes = []
        if not pr["complete"]:
            notes.append(f"{pr['ok']}/{len(pushed) * k} within {t_progress:.0f}s ({pr['codes']})")
        if stored < pr["ok"]:
            notes.append(f"only {stored} events stored for {pr['ok']} replies")
        r.note = "; ".join(notes)
    log("  canceling the push job, disconnecting")
    await api.call("POST", f"/jobs/{job['id']}/cancel")
    await clients.disconnect_all(devs)


async def otabox_rollout(
    run: Run, api: Api, mon: Monitor, keys: list[str], secret: dict[str, str], host: str, port: int, fw: dict[str, Any]
) -> None:
    from otabox.fleet import Fleet, FleetConfig

    plan, n = run.plan, run.plan.devices
    await wait_connected(api, 0, 60)
    config = FleetConfig(
        host=host,
        port=port,
        product_key=PK,
        flash_time=(0.2, 0.5),
        reboot_time=(0.5, 1.0),
        connect_concurrency=plan.connect_concurrency,
        http_connections=256,
        keepalive=300,
        duration=run.bound(plan.t_rollout + 180),
        seed=1,
    )
    fleet = Fleet(config, [(k, secret[k], "1.0.0", "success") for k in keys])
    log(f"rollout: {n} simulated devices (otabox.fleet) connecting")
    fleet_task = asyncio.create_task(fleet.run())
    try:
        if not await wait_connected(api, n, run.bound(180), fleet_task):
            log("  not every device connected; the rollout starts anyway")
        log(f"rollout: job of {n} devices, 1 MB image")
        async with mon.phase("rollout") as ph:
            wall0, t0 = time.time(), time.monotonic()
            job = await api.create_job(fw["id"], "bench rollout")
            created = time.monotonic() - t0
            status = job
            t_rollout = run.bound(plan.t_rollout)
            while time.monotonic() - t0 < t_rollout:
                status = await api.call("GET", f"/jobs/{job['id']}")
                if status["status"] not in ("running", "scheduled"):
                    break
                await asyncio.sleep(1.0)
            finished = status.get("finishedAt")
        counts = status.get("counts", {})
        done = status["status"] == "completed"
        active = sum(counts.get(s, 0) for s in ("pending", "published", "upgrading"))
        if done and active:
            # A completed snapshot job has no active task by definition: the server contradicts itself.
            await asyncio.sleep(2)
            again = await api.call("GET", f"/jobs/{job['id']}")
            run.detail("rollout", inconsistent={"countsAtCompletion": counts, "countsTwoSecondsLater": again["counts"]})
            log(f"  SERVER INCONSISTENCY: job completed with {active} active tasks; 2 s later: {again['counts']}")
        wall = _epoch(finished) - wall0 if done and finished else time.monotonic() - t0
        events = await api.events(job["id"])
        run.detail(
            "rollout",
            status=status["status"],
            counts=counts,
            seconds=round(wall, 2),
            jobCreateSeconds=round(created, 3),
            events=events,
            eventsPerSecond=round(events / wall, 1),
            fleet={
                "connectSeconds": fleet.connect_seconds,
                "downloadedMB": round(fleet.downloaded / MB),
                "reconnects": fleet.reconnects,
            },
            phase=ph,
        )
        log(f"  {status['status']} after {wall:.1f}s: {counts}; {events} events")
        r = run.row("rollout", f"rollout of {n} devices, 1 MB image: wall time", "s", "lower", TARGETS["rollout"])
        r.otabox = round(wall, 1) if done else None
        if not done:
            r.note = f"{status['status']} after {t_rollout:.0f}s: {counts.get('succeeded', 0)}/{n} succeeded"
        elif active:
            r.note = f"server marked the job completed with {active} tasks still active ({counts})"
        r = run.row("rollout_events", "rollout: events stored per second", "events/s", "higher")
        r.otabox = round(events / wall, 1)
    finally:
        fleet.stop("done")
        await clients.bounded(fleet_task, 60)
        await wait_connected(api, 0, 30)


def _epoch(iso_text: str) -> float:
    return datetime.datetime.fromisoformat(iso_text.replace("Z", "+00:00")).timestamp()


async def wait_connected(api: Api, want: int, timeout: float, task: asyncio.Task[Any] | None = None) -> bool:
    """Wait until the server counts `want` connected devices (0: until all are gone) besides the rtt device."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if task is not None and task.done():
            return False
        n = (await api.healthz())["devicesConnected"] - 1  # the round-trip device stays connected
        if (want and n >= want) or (not want and n <= 0):
            return True
        await asyncio.sleep(0.25)
    return False


async def otabox_downloads(run: Run, api: Api, mon: Monitor, rtt_dev: Dev, keys: list[str]) -> None:
    plan = run.plan
    rtt = clients.otabox_rtt(rtt_dev, RTT_PK)
    if "rtt" in run.only:
        async with mon.phase("rtt-idle") as ph:
            idle = await rtt.run(count=plan.rtt_samples, max_seconds=run.bound(60))
        run.detail("rttIdle", **idle, phase=ph)
        set_rtt(run, "idle", idle, "otabox")
    if "download" not in run.only:
        return
    size = plan.download_mb * MB
    fw = await api.upload(PK, "bench-download", "9.0.0", make_file(run.work / "download.bin", size))
    run.details["downloadFile"] = {
        "path": str(run.work / "otabox-data" / "firmware" / fw["sha256"][:2] / fw["sha256"]),
        "bytes": size,
    }
    urls = [
        (await api.call("GET", f"/firmware/{fw['id']}/url?deviceKey={k}"))["fileUrl"]
        for k in keys[: plan.download_clients]
    ]
    log(f"downloads: {plan.download_clients} clients x {plan.download_mb} MB for {plan.download_seconds:.0f}s")
    async with mon.phase("download") as ph:
        dl = asyncio.ensure_future(
            clients.download_load(
                urls,
                plan.download_clients,
                min(plan.download_seconds, run.bound(60)),
                plan.download_max,
                run.bound(120),
            )
        )
        loaded = await rtt.run(until=dl, gap=0.01) if "rtt" in run.only else None
        result = await dl
    ph["harnessCpuPercent"] += result.get("clientCpuPercent") or 0  # the download client is its own process
    run.detail("download", **result, phase=ph)
    log(f"  {result['downloads']} downloads, {result['MBps']} MB/s ({result['errors']} errors)")
    r = run.row(
        "download",
        f"download throughput, {plan.download_clients} clients, {plan.download_mb} MB file",
        "MB/s",
        "higher",
    )
    r.otabox = result["MBps"]
    if loaded is not None:
        run.detail("rttLoaded", **loaded)
        set_rtt(run, "loaded", loaded, "otabox")


def set_rtt(run: Run, kind: str, result: dict[str, Any], side: str) -> None:
    label = "idle" if kind == "idle" else "during downloads"
    for pct in ("p50", "p99"):
        r = run.row(f"rtt_{kind}_{pct}", f"MQTT round trip {pct}, {label}", "ms", "lower")
        value = result.get(f"{pct}ms")
        if side == "otabox":
            r.otabox = value
        else:
            r.reference, r.ref_name = value, side


# ---------------------------------------------------------------- references


async def bench_references(run: Run) -> None:
    run.reserve = 0.0
    only = run.only
    want_mosq = bool(only & {"storm", "rss", "push", "progress", "rtt"})
    want_nginx = bool(only & {"download", "rtt"}) and "downloadFile" in run.details
    found = ensure_debian({"mosquitto": "mosquitto", "nginx": "nginx"} if want_nginx else {"mosquitto": "mosquitto"})
    mosq_bin, nginx_bin = found.get("mosquitto"), found.get("nginx")
    mosq: Proc | None = None
    nginx: Proc | None = None
    try:
        if want_mosq and mosq_bin:
            mosq, mport = start_mosquitto(mosq_bin, run.work)
            run.procs.append(mosq)
            await mosquitto_devices(run, mosq, mport)
        elif want_mosq:
            log("mosquitto not available: broker references skipped")
        if want_nginx and nginx_bin:
            dl_path = Path(run.details["downloadFile"]["path"])
            nginx, nport = start_nginx(nginx_bin, run.work, dl_path.parent.parent)
            run.procs.append(nginx)
            url = f"http://127.0.0.1:{nport}/fw/{dl_path.parent.name}/{dl_path.name}"
            await nginx_downloads(run, nginx, url, mosq, mport if mosq else 0)
        elif want_nginx:
            log("nginx not available: download reference skipped")
    finally:
        for p in (nginx, mosq):
            if p is not None:
                p.stop()


async def mosquitto_devices(run: Run, proc: Proc, port: int) -> None:
    plan, only, n = run.plan, run.only, run.plan.devices
    host = "127.0.0.1"
    ts = str(int(time.time() * 1000))
    mon = Monitor(proc)
    mon.start()
    try:
        if only & {"storm", "rss", "push", "progress"}:
            width = max(5, len(str(n)))
            # The same CONNECT packets as for otabox (mosquitto accepts them anonymously).
            devs = [Dev(f"dev-{i:0{width}d}", secrets.token_hex(16)) for i in range(1, n + 1)]
            log(f"mosquitto storm: {n} devices, {plan.storm_repeats} time(s)")
            st = await repeated_storm(run, mon, devs, host, port, ts, lambda: asyncio.sleep(1))
            run.detail("mosquittoStorm", **st)
            if st["complete"]:
                run.row("storm", "", "", "lower").reference = st["seconds"]
                run.rows["storm"].ref_name = "mosquitto"
            live = [d for d in devs if d.client.connected]
            if "rss" in only:
                r = run.row("rss", "", "MB", "lower")
                r.reference, r.ref_name = round(proc.rss() / MB, 1), "mosquitto"
            if only & {"push", "progress"}:
                await clients.subscribe_own(live, PK, plan.connect_concurrency, run.bound(plan.t_storm))
                offer = protocol.request("1", "ota.device.upgrade", _sample_offer())
                log(f"mosquitto fan-out: one QoS 1 message to each of {len(live)} own topics")
                async with mon.phase("own-topic") as ph:
                    fan = await clients.publish_each(
                        host, port, live, PK, offer, plan.connect_concurrency, run.bound(plan.t_push)
                    )
                run.detail("mosquittoOwnTopic", **fan, phase=ph)
                log(f"  {fan['notified']}/{len(live)} delivered in {fan['seconds']:.2f}s ({fan['perSecond']}/s)")
                if fan["complete"]:
                    r = run.row("own_topic", "", "msg/s", "higher")
                    r.reference, r.ref_name = fan["perSecond"], "mosquitto"
            if "progress" in only:
                k = plan.progress_reports
                log(f"mosquitto progress: {len(live)} devices x {k} QoS 1 reports to one subscriber")
                async with mon.phase("progress") as ph:
                    pr = await clients.publish_progress(
                        host, port, live, PK, k, plan.connect_concurrency, run.bound(plan.t_progress)
                    )
                run.detail("mosquittoProgress", **pr, phase=ph)
                log(f"  {pr['ok']}/{pr['sent']} routed in {pr['seconds']:.2f}s ({pr['perSecond']}/s)")
                if pr["complete"]:
                    r = run.row("progress", "", "msg/s", "higher")
                    r.reference, r.ref_name = pr["perSecond"], "mosquitto"
            await clients.disconnect_all(devs)
        if "rtt" in only:
            echo, rtt = await clients.echo_rtt(
                host, port, protocol.topic_for(RTT_PK, "rtt-1", protocol.GETVERSION + "_reply")
            )
            idle = await rtt.run(count=plan.rtt_samples, max_seconds=run.bound(60))
            run.detail("mosquittoRttIdle", **idle)
            set_rtt(run, "idle", idle, "mosquitto")
            echo.close()
        if "rss" in only:
            r = run.row("rss_peak", "", "MB", "lower")
            r.reference, r.ref_name = round(max(proc.hwm(), mon.peak) / MB, 1), "mosquitto"
        run.detail("mosquitto", peakRssMB=round(max(proc.hwm(), mon.peak) / MB, 1), phases=mon.phases)
    finally:
        await mon.stop()


def _sample_offer() -> dict[str, Any]:
    """An upgrade offer of the size otabox pushes (the fileUrl carries a download token)."""
    return {
        "version": "2.0.0",
        "sign": "0" * 64,
        "signMethod": "sha256",
        "fileUrl": "http://127.0.0.1:8080/firmware/fw-0123456789ab/bench-push-2.0.0-0123456789ab.bin?token="
        + "x" * 160,
        "fileSize": MB,
        "firmwareName": "bench-push",
        "desc": "",
        "jobId": "job-0123456789ab",
    }


async def nginx_downloads(run: Run, proc: Proc, url: str, mosq: Proc | None, mport: int) -> None:
    plan = run.plan
    mon = Monitor(proc)
    mon.start()
    echo = None
    try:
        rtt = None
        if "rtt" in run.only and mosq is not None:
            echo, rtt = await clients.echo_rtt(
                "127.0.0.1", mport, protocol.topic_for(RTT_PK, "rtt-1", "ota/device/echo")
            )
        if "download" in run.only or rtt is not None:
            log(
                f"nginx downloads: {plan.download_clients} clients x {plan.download_mb} MB"
                f" for {plan.download_seconds:.0f}s"
            )
            async with mon.phase("download") as ph:
                dl = asyncio.ensure_future(
                    clients.download_load(
                        [url],
                        plan.download_clients,
                        min(plan.download_seconds, run.bound(60)),
                        plan.download_max,
                        run.bound(120),
                    )
                )
                loaded = await rtt.run(until=dl, gap=0.01) if rtt is not None else None
                result = await dl
            ph["harnessCpuPercent"] += result.get("clientCpuPercent") or 0
            run.detail("nginxDownload", **result, phase=ph)
            log(f"  {result['downloads']} downloads, {result['MBps']} MB/s ({result['errors']} errors)")
            if "download" in run.only:
                r = run.row("download", "", "MB/s", "higher")
                r.reference, r.ref_name = result["MBps"], "nginx"
            if loaded is not None:
                run.detail("mosquittoRttLoaded", **loaded)
                set_rtt(run, "loaded", loaded, "mosquitto+nginx")
    finally:
        if echo is not None:
            echo.close()
        await mon.stop()
        run.detail("nginx", phases=mon.phases)


# ---------------------------------------------------------------- output


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit in ("s", "ms"):
        return f"{value:,.2f} {unit}"
    if unit == "MB" or unit == "MB/s":
        return f"{value:,.0f} {unit}"
    return f"{value:,.0f} {unit}"


def table(run: Run) -> str:
    n = run.plan.devices
    head = ["figure", "otabox", "reference", "ratio", "target", "met?"]
    lines = []
    for r in run.rows.values():
        if not r.name:
            continue
        ref = f"{fmt(r.reference, r.unit)} ({r.ref_name})" if r.reference is not None else "—"
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "—"
        target = "—"
        if r.target is not None:
            target = ("≤ " if r.better == "lower" else "≥ ") + fmt(r.target, r.unit)
        met = r.met(n)
        arrow = "↓" if r.better == "lower" else "↑"
        lines.append(
            [
                f"{r.name} {arrow}",
                fmt(r.otabox, r.unit),
                ref,
                ratio,
                target,
                "—" if met is None else ("yes" if met else "NO"),
            ]
        )
    widths = [max(len(row[i]) for row in [head, *lines]) for i in range(len(head))]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |"]
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in lines]
    notes = [f"- {r.name}: {r.note}" for r in run.rows.values() if r.note and r.name]
    if notes:
        out += ["", "notes:", *notes]
    loads = load_notes(run)
    if loads:
        out += ["", "load during each figure (CPU % of one core; listen-queue overflows):", *loads]
    out += ["", "ratio = otabox ÷ reference (↓ lower is better, ↑ higher is better); targets are for 10,000 devices."]
    return "\n".join(out)


PHASES = (  # figure -> (otabox phase, reference section, reference phase)
    ("storm", "storm", "mosquitto", "storm"),
    ("inform", "inform", "", ""),
    ("push / own topic", "push", "mosquitto", "own-topic"),
    ("progress", "progress", "mosquitto", "progress"),
    ("rollout", "rollout", "", ""),
    ("download", "download", "nginx", "download"),
)


def _load(name: str, ph: dict[str, Any] | None) -> str:
    if not ph:
        return ""
    text = f"{name} {ph['serverCpuPercent']}%, load generator {ph['harnessCpuPercent']}%"
    if ph.get("listenOverflows"):
        text += f", {ph['listenOverflows']} overflows"
    if ph["harnessCpuPercent"] >= 90:
        text += " (bound by the load generator)"
    return text


def load_notes(run: Run) -> list[str]:
    out = []
    ota = run.details.get("otabox", {}).get("phases", {})
    for label, phase, ref, ref_phase in PHASES:
        parts = [_load("otabox", ota.get(phase))]
        if ref:
            parts.append(_load(ref, run.details.get(ref, {}).get("phases", {}).get(ref_phase)))
        parts = [p for p in parts if p]
        if parts:
            out.append(f"- {label}: " + "; ".join(parts))
    return out


def meta(run: Run, started: float) -> dict[str, Any]:
    mem = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1]) * 1024
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "durationSeconds": round(time.monotonic() - started, 1),
        "devices": run.plan.devices,
        "quick": run.plan.quick,
        "figures": sorted(run.only),
        "commit": run.source["commit"],
        "uncommitted": run.source["uncommitted"],
        "sourceAtEnd": None if source_state() == run.source else source_state(),
        "cpus": os.cpu_count(),
        "memoryGB": round(mem / 1024**3, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "plan": run.plan.__dict__,
    }


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--devices", type=int, default=None, help="simulated devices N [10000; --quick: 1000]")
    p.add_argument("--quick", action="store_true", help="smoke run: N=1000, smaller workloads (<1 min)")
    p.add_argument(
        "--json", default=str(REPO / "bench" / "results.json"), help="write results here [bench/results.json]"
    )
    p.add_argument("--skip-reference", action="store_true", help="do not run mosquitto and nginx")
    p.add_argument("--only", default=",".join(FIGURES), help=f"comma-separated figures [{','.join(FIGURES)}]")
    p.add_argument("--profile", metavar="DIR", help="record the server with py-spy per phase into DIR (raw + .top)")
    p.add_argument("--server-log-level", default="INFO", help="otabox --log-level [INFO, its default]")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (data dir, logs)")
    p.add_argument(
        "--max-minutes", type=float, help="time budget of the whole run; figures are cut to fit [20; --quick: 4]"
    )
    args = p.parse_args(argv)
    only = {f.strip() for f in args.only.split(",") if f.strip()}
    unknown = only - set(FIGURES)
    if unknown:
        p.error(f"unknown figure(s) {sorted(unknown)}; choose from {','.join(FIGURES)}")
    args.only_set = only
    if args.devices is None:
        args.devices = 1000 if args.quick else TARGET_N
    if args.max_minutes is None:
        args.max_minutes = 4.0 if args.quick else 20.0
    if args.devices < 1:
        p.error("--devices must be at least 1")
    return args


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


async def amain(run: Run) -> None:
    await bench_otabox(run)
    if not run.args.skip_reference:
        await bench_references(run)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    nofile = raise_nofile()
    plan = Plan.make(args.devices, args.quick)
    if nofile < plan.devices + 500:
        print(f"bench: warning: open-file limit {nofile} is low for {plan.devices} devices", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="otabox-bench-"))
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    run = Run(args, plan, work, args.only_set)
    started = time.monotonic()
    run.deadline = started + 60 * args.max_minutes
    run.reserve = min(180.0, 15 * args.max_minutes)  # the references need ~1 minute at N=10,000
    # SIGTERM ends the run like Ctrl-C: the finally below stops every child.
    signal.signal(signal.SIGTERM, _interrupt)
    log(f"otabox benchmark: N={plan.devices}, figures {','.join(f for f in FIGURES if f in run.only)}; work dir {work}")
    code = 0
    try:
        asyncio.run(amain(run))
    except KeyboardInterrupt:
        log("interrupted")
        code = 130
    finally:
        for proc in run.procs:
            proc.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result: dict[str, Any] = {
        "meta": meta(run, started),
        "figures": [r.as_json(plan.devices) for r in run.rows.values() if r.name],
    }
    result["details"] = run.details
    Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print()
    m = result["meta"]
    print(
        f"otabox benchmark, N={plan.devices}, {m['date']}, {m['cpus']} CPUs, commit {m['commit']}"
        + (" (+ uncommitted changes in otabox/)" if m["uncommitted"] else "")
        + (f"; the source changed during the run (now {m['sourceAtEnd']['commit']})" if m["sourceAtEnd"] else "")
    )
    print(table(run))
    print(f"\nJSON: {args.json}" + (f"; work dir kept: {work}" if args.keep else ""))
    return code


if __name__ == "__main__":
    sys.exit(main())
