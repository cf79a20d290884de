"""`python -m bench.soak`: does otabox leak under churn? Growth per hour of RSS, open files and tasks.

A fresh otabox (`python -m otabox serve`, loopback) and N simulated devices (`otabox.sim`) that
reconnect at random while idle (`churn`), lose their link mid-download, fail downloads, flashes
and verifications, or succeed, upgraded by one push job after another (1.0.1, 1.0.2, ...) for
the whole duration, each round a fresh fleet (so every device logs in again). The server's
`/metrics` is sampled every `--every` seconds: RSS (`process_resident_memory_bytes`), open files
(`process_open_fds`) and asyncio tasks (`otabox_asyncio_tasks`). Printed: each quantity's
growth per hour (least-squares slope over the samples after the first round, when caches and
pools have filled) and, once the devices are gone, how far open files and tasks are from where
they were before the first device connected (a leak per connection or per upgrade shows there,
whatever the run's length).

What limits the figures: RSS moves with Python's allocator (freed memory is not always given
back), so only a steady slope over a long run means a leak; a 2-minute run (the test suite's)
tells apart a leak of tasks or files (exact counts) but not a slow one of memory.

    python -m bench.soak --devices 2000 --minutes 30
    python -m bench.soak --devices 200 --minutes 2 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.servers import raise_nofile, start_otabox
from otabox.cli.client import Client
from otabox.cli.simulate import assign, create_devices
from otabox.sim.fleet import Fleet, FleetConfig

TOKEN = "bench-soak-token"
PK = "soak"
MIX = {"success": 5, "churn": 3, "offline-mid-download": 1, "download-fail": 0.5, "flash-fail": 0.5}
WATCHED = {
    "rss": "process_resident_memory_bytes",
    "fds": "process_open_fds",
    "tasks": "otabox_asyncio_tasks",
}


@dataclass
class Soak:
    devices: int
    minutes: float
    every: float = 10.0
    samples: list[dict[str, float]] = field(default_factory=list)
    baseline: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    rounds: int = 0
    upgraded: int = 0
    reconnects: int = 0


def _get(client: Client, path: str) -> bytes:
    """GET a path outside /api/v1 (/metrics, /healthz) of the client's server."""
    request = urllib.request.Request(client.base.geturl() + path, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        body: bytes = resp.read()
        return body


def read_metrics(client: Client) -> dict[str, float]:
    """The watched values of one /metrics scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    text = _get(client, "/metrics").decode()
    values = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    return {key: values[name] for key, name in WATCHED.items()}


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value), per hour; 0 with fewer than two points."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    return 3600 * sum((t - mx) * (v - my) for t, v in points) / var


async def _sampler(client: Client, soak: Soak, t0: float) -> None:
    while True:
        values = await asyncio.to_thread(read_metrics, client)
        soak.samples.append({"t": time.monotonic() - t0, "round": soak.rounds, **values})
        await asyncio.sleep(soak.every)


async def _rounds(client: Client, mqtt: int, soak: Soak, work: Path) -> None:
    devices = await asyncio.to_thread(create_devices, client, PK, soak.devices, "soak-", "1.0.0")
    behaviours = assign(len(devices), MIX, seed=7)
    image = work / "fw.bin"
    deadline = time.monotonic() + 60 * soak.minutes
    version = "1.0.0"
    while time.monotonic() < deadline:
        soak.rounds += 1
        target = f"1.0.{soak.rounds}"
        image.write_bytes(os.urandom(64 * 1024))
        fw = await asyncio.to_thread(client.upload_firmware, PK, image, {"name": "soak", "version": target})
        config = FleetConfig(
            host="127.0.0.1",
            port=mqtt,
            product_key=PK,
            flash_time=(0.05, 0.3),
            reboot_time=(0.1, 0.5),
            churn_interval=(0.5, 3.0),
            seed=soak.rounds,
            duration=max(10.0, deadline - time.monotonic() + 30),
        )
        fleet = Fleet(config, [(dk, s, version, b) for (dk, s, _v), b in zip(devices, behaviours, strict=True)])
        run = asyncio.create_task(fleet.run())

        def all_on(v: str = version) -> bool:
            return bool(client.get(f"/products/{PK}/devices", limit=1, version=v)["total"] >= len(devices))

        await asyncio.to_thread(_wait, all_on, 120)
        body = {"firmwareId": fw["id"], "scope": {"versionNumbers": [version]}, "timeoutSeconds": 20}
        await asyncio.to_thread(client.post, "/jobs", body)
        summary = await run
        soak.upgraded += summary["outcomes"].get("succeeded", 0)
        soak.reconnects += summary["reconnects"] + summary["churnDisconnects"]
        # Devices that failed stay on the old version: give every device the new one as its
        # starting point of the next round (as after a retry), so each round has the whole fleet.
        version = target
        await asyncio.to_thread(_settle, client)
        if soak.rounds == 1:
            soak.samples.clear()  # the growth is measured after the first round has filled the pools


def _settle(client: Client) -> None:
    """Wait until no device is connected (the fleet has gone)."""
    _wait(lambda: json.loads(_get(client, "/healthz"))["devicesConnected"] == 0, 60)


def _settled(client: Client, baseline: dict[str, float], within: float = 20.0) -> dict[str, float]:
    """The counts once the last connections' teardown has run: back at the baseline, or what they
    are after `within` seconds (a leak stays; a busy machine only takes longer to get there)."""
    deadline = time.monotonic() + within
    while True:
        time.sleep(1)
        now = read_metrics(client)
        back = all(now[k] <= baseline[k] for k in ("tasks", "fds"))
        if back or time.monotonic() > deadline:
            return now


def _wait(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the soak's fleet did not get there in time")
        time.sleep(0.5)


def run(devices: int, minutes: float, every: float = 10.0) -> Soak:
    """One soak on a fresh server; returns the samples and the before/after counts."""
    soak = Soak(devices, minutes, every)
    with tempfile.TemporaryDirectory(prefix="otabox-soak-") as tmp:
        work = Path(tmp)
        proc, http, mqtt = start_otabox(work, TOKEN, log_level="WARNING")
        try:
            client = Client(f"http://127.0.0.1:{http}", TOKEN)
            client.post("/products", {"productKey": PK, "name": PK})
            soak.baseline = read_metrics(client)

            async def main() -> None:
                sampler = asyncio.create_task(_sampler(client, soak, time.monotonic()))
                try:
                    await _rounds(client, mqtt, soak, work)
                finally:
                    sampler.cancel()
                    await asyncio.gather(sampler, return_exceptions=True)

            asyncio.run(main())
            soak.after = _settled(client, soak.baseline)
        finally:
            proc.stop()
    return soak


def report(soak: Soak) -> dict[str, Any]:
    growth = {k: round(slope_per_hour([(s["t"], s[k]) for s in soak.samples]), 1) for k in WATCHED}
    return {
        "devices": soak.devices,
        "minutes": soak.minutes,
        "rounds": soak.rounds,
        "upgraded": soak.upgraded,
        "reconnects": soak.reconnects,
        "samples": len(soak.samples),
        "growthPerHour": growth,
        "baseline": soak.baseline,
        "afterDevicesLeft": soak.after,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--devices", type=int, default=2000)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--every", type=float, default=10.0, help="seconds between samples [10]")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    raise_nofile()
    result = report(run(args.devices, args.minutes, args.every))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    g, b, a = result["growthPerHour"], result["baseline"], result["afterDevicesLeft"]
    print(f"soak: {result['devices']} devices, {result['minutes']:g} min, {result['rounds']} rounds,")
    print(f"      {result['upgraded']} upgrades, {result['reconnects']} reconnects, {result['samples']} samples")
    print(f"{'':8} {'growth/hour':>14} {'before':>12} {'after':>12}")
    print(f"{'RSS MB':8} {g['rss'] / 1e6:>14.1f} {b['rss'] / 1e6:>12.1f} {a['rss'] / 1e6:>12.1f}")
    print(f"{'files':8} {g['fds']:>14.1f} {b['fds']:>12.0f} {a['fds']:>12.0f}")
    print(f"{'tasks':8} {g['tasks']:>14.1f} {b['tasks']:>12.0f} {a['tasks']:>12.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
