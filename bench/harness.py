"""What the steps of one benchmark run share: workload sizes, the results rows, the run's state, server monitoring.

`Plan` holds the workload sizes and time bounds, `Row` one line of the results table, `Run` the
state every step reads and fills in (arguments, rows, details, child processes, time budget);
`Monitor` samples a server process's RSS and CPU per phase (and records it with py-spy under
--profile). `repeated_storm` and `set_rtt` are the steps that otabox and mosquitto go through the
same way. Everything else imports from here; this module imports no other bench module but
`servers` and `clients`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import resource
import signal
import ssl
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import clients
from bench.clients import Dev
from bench.servers import REPO, Proc, start_profiler

FIGURES = ("storm", "rss", "push", "progress", "tls", "mtls", "rollout", "download", "rtt")
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


async def repeated_storm(
    run: Run,
    mon: Monitor,
    devs: list[Dev],
    host: str,
    port: int,
    ts: str,
    settle: Callable[[], Awaitable[Any]],
    tls: ssl.SSLContext | None = None,
    phase: str = "storm",
) -> dict[str, Any]:
    """The storm `plan.storm_repeats` times (all disconnect in between); the median time of complete runs.

    The last run leaves the devices connected and is the one whose load (and profile) is recorded as
    `phase` ("storm"; the earlier ones "storm-1", ...). With `tls`, every login is a TLS handshake first.
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
        async with mon.phase(phase if last else f"{phase}-{i + 1}") as ph:
            st = await clients.storm(
                devs, host, port, PK, ts, plan.connect_concurrency, run.bound(plan.t_storm), tls=tls
            )
        st["phase"] = ph
        log(f"  {st['connected']}/{n} connected in {st['seconds']:.2f}s ({st['failures']} failures)")
        if not st["complete"]:
            return st  # a storm that did not finish is the figure: no median hides it
        times.append(st["seconds"])
    st["runs"] = times
    st["seconds"] = statistics.median(times)
    return st


async def split_storm(
    run: Run, mon: Monitor, procs: clients.StormProcesses, settle: Callable[[], Awaitable[Any]], phase: str
) -> dict[str, Any]:
    """`repeated_storm` with the devices in helper processes (bench.stormclient); their CPU counts as
    the load generator's. The last storm leaves the devices connected."""
    plan = run.plan
    times: list[float] = []
    st: dict[str, Any] = {}
    for i in range(plan.storm_repeats):
        if i and times[-1] > 60:
            break
        if i:
            await procs.disconnect()
            await settle()
        last = i == plan.storm_repeats - 1
        async with mon.phase(phase if last else f"{phase}-{i + 1}") as ph:
            st = await procs.storm(run.bound(plan.t_storm))
        ph["harnessCpuPercent"] += round(100 * st["clientCpuSeconds"] / ph["wallSeconds"])
        st["phase"] = ph
        log(
            f"  {st['connected']} connected in {st['seconds']:.2f}s"
            f" ({st['failures']} failures; from {st['processes']} processes)"
        )
        if not st["complete"]:
            return st
        times.append(st["seconds"])
    st["runs"] = times
    st["seconds"] = statistics.median(times)
    return st


def set_rtt(run: Run, kind: str, result: dict[str, Any], side: str) -> None:
    label = "idle" if kind == "idle" else "during downloads"
    for pct in ("p50", "p99"):
        r = run.row(f"rtt_{kind}_{pct}", f"MQTT round trip {pct}, {label}", "ms", "lower")
        value = result.get(f"{pct}ms")
        if side == "otabox":
            r.otabox = value
        else:
            r.reference, r.ref_name = value, side
