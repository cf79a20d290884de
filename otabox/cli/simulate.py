"""`otabox simulate`: rehearse a rollout against a real server with a fleet of simulated devices.

This module is imported whenever the CLI parser is built, so it stays light: the engine
(`otabox.sim.fleet`: mqttlite, aiohttp) is imported only when the command runs. Behaviour mixes,
ranges and device lists are parsed here with plain functions.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import os
import random
import signal
import sys
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from otabox.cli.client import Client
from otabox.jobspec import parse_tag

if TYPE_CHECKING:
    from otabox.sim.fleet import Fleet

BEHAVIOURS = (
    "success",  # download, verify, flash, reboot, report the new version
    "download-fail",  # the download breaks off; reports -2
    "verify-fail",  # downloads, then reports -3
    "flash-fail",  # downloads and verifies, then reports -4
    "silent",  # takes the offer and never reports (the server times the task out)
    "decline",  # reports -5 right away
    "wrong-version",  # upgrades but boots an unexpected version
    "offline-mid-download",  # loses MQTT and HTTP mid-download, reconnects, resumes with Range, succeeds
    "churn",  # disconnects and reconnects at random while idle, then upgrades like success
    "delta",  # takes the offered delta from its version instead of the full image, then like success
    "delta-broken",  # downloads the delta, fails to apply it, falls back to the full image, succeeds
)
IMPORT_BATCH = 5000  # devices per bulk-import request (keeps each JSON body well under 1 MiB)


# ---------------------------------------------------------------- parsing


def parse_mix(text: str) -> dict[str, float]:
    """`success=90,download-fail=5,silent=5` -> weights by behaviour (any positive total).

    Raises ValueError naming the bad item: unknown behaviour, repeated, negative or non-numeric
    weight, or no positive weight at all.
    """
    mix: dict[str, float] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if name not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {name!r} (known: {', '.join(BEHAVIOURS)})")
        if name in mix:
            raise ValueError(f"behaviour {name!r} given twice")
        try:
            weight = float(value) if sep else 1.0
        except ValueError:
            raise ValueError(f"weight of {name!r} must be a number, got {value!r}") from None
        if weight < 0 or weight != weight:
            raise ValueError(f"weight of {name!r} must not be negative")
        mix[name] = weight
    if sum(mix.values()) <= 0:
        raise ValueError("the mix needs at least one behaviour with a positive weight")
    return mix


def assign(n: int, mix: dict[str, float], seed: int | None = None) -> list[str]:
    """Give each of `n` devices a behaviour: exact shares of the mix, shuffled by `seed`.

    Counts follow the largest-remainder method (90/5/5 of 1000 is exactly 900/50/50); the
    same seed always yields the same list.
    """
    total = sum(mix.values())
    quotas = {b: n * w / total for b, w in mix.items()}
    counts = {b: int(q) for b, q in quotas.items()}
    short = n - sum(counts.values())
    for b in sorted(quotas, key=lambda b: (counts[b] - quotas[b], BEHAVIOURS.index(b)))[:short]:
        counts[b] += 1
    out = [b for b in BEHAVIOURS if b in counts for _ in range(counts[b])]
    random.Random(seed).shuffle(out)
    return out


def parse_range(text: str) -> tuple[float, float]:
    """`0.5-2` -> (0.5, 2.0); `1` -> (1.0, 1.0). Size suffixes k/M/G (x1024) are allowed. Raises ValueError."""
    lo, sep, hi = text.strip().partition("-")
    low = _number(lo)
    high = _number(hi) if sep else low
    if low < 0 or high < low:
        raise ValueError(f"range {text!r} must be LOW-HIGH with 0 <= LOW <= HIGH")
    return low, high


def _number(text: str) -> float:
    text = text.strip()
    factor = 1
    if text and text[-1] in "kKmMgG":
        factor = 1024 ** ("kmg".index(text[-1].lower()) + 1)
        text = text[:-1]
    return float(text) * factor


def read_devices_csv(path: str, default_version: str) -> list[tuple[str, str, str]]:
    """Rows `deviceKey,deviceSecret[,version]` (a header row is skipped). Raises ValueError on a short row."""
    devices = []
    with open(path, newline="", encoding="utf-8") as fh:
        for i, row in enumerate(csv.reader(fh), start=1):
            if not row or not any(cell.strip() for cell in row) or (i == 1 and row[0].strip() == "deviceKey"):
                continue
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise ValueError(f"{path}:{i}: need deviceKey,deviceSecret[,version]")
            version = row[2].strip() if len(row) > 2 and row[2].strip() else default_version
            devices.append((row[0].strip(), row[1].strip(), version))
    return devices


def _argtype(parse: Any) -> Any:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return convert


# ---------------------------------------------------------------- the command


def register(sub: Any, api_parent: argparse.ArgumentParser) -> None:
    """Add `otabox simulate` to the CLI."""
    p = sub.add_parser(
        "simulate",
        parents=[api_parent],
        help="rehearse a rollout with a fleet of simulated devices",
        description="Run N simulated devices in one process against a running otabox server. They log in over "
        "MQTT, take upgrade offers (pushed, or with --request asked for), really download and check the "
        "firmware, and behave per --mix. Stops when every device has finished, after --duration, or on Ctrl-C.",
    )
    p.add_argument("product", help="productKey of the simulated devices")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--devices", "--create", type=int, metavar="N", help="create N devices through the API")
    src.add_argument("--csv", metavar="FILE", help="use existing devices: deviceKey,deviceSecret[,version] rows")
    p.add_argument("--prefix", default="sim-", help="deviceKey prefix of created devices [sim-]")
    p.add_argument("--tag", action="append", metavar="K=V", help="tag for created devices (repeatable)")
    p.add_argument("--version", default="1.0.0", help="version the devices start with [1.0.0]")
    p.add_argument("--save-csv", metavar="FILE", help="write created devices' secrets here (0600), for --csv reruns")
    p.add_argument("--mix", type=_argtype(parse_mix), default={"success": 1.0}, help="behaviour weights [success=100]")
    p.add_argument("--seed", type=int, help="seed for behaviour assignment and latencies (repeatable runs)")
    p.add_argument("--request", action="store_true", help="request mode: devices ask for offers (getversion)")
    p.add_argument("--poll", type=float, default=10.0, help="seconds between getversion polls [10]")
    p.add_argument("--flash-time", type=_argtype(parse_range), default=(0.5, 2.0), help="seconds, LOW-HIGH [0.5-2]")
    p.add_argument("--reboot-time", type=_argtype(parse_range), default=(1.0, 3.0), help="seconds, LOW-HIGH [1-3]")
    p.add_argument("--download-speed", type=_argtype(parse_range), help="bytes/s per device, e.g. 100k-1M [unlimited]")
    p.add_argument("--churn-interval", type=_argtype(parse_range), default=(2.0, 10.0), help="seconds [2-10]")
    p.add_argument("--duration", type=float, help="stop after this many seconds [run until done]")
    p.add_argument(
        "--job", help="run until this job has finished on the server (waits for retries) [until all devices finish]"
    )
    p.add_argument("--connect-concurrency", type=int, default=500, help="logins in flight at once [500]")
    p.add_argument("--http-connections", type=int, default=256, help="downloads in flight at once [256]")
    p.add_argument("--keepalive", type=int, default=60, help="MQTT keep-alive seconds [60]")
    p.add_argument("--mqtt-host", help="broker host [the API URL's host]")
    p.add_argument("--mqtt-port", type=int, help="broker port [from the server's /healthz]")
    p.set_defaults(api_call=run_command)


def run_command(args: argparse.Namespace, client: Client) -> int:
    """Prepare devices through the API, run the fleet, print the summary. Returns the exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    limit = raise_open_files_limit()
    try:
        devices = _devices(args, client)
    except (ValueError, OSError) as exc:
        print(f"otabox simulate: {exc}", file=sys.stderr)
        return 2
    needed = len(devices) + args.http_connections + 64
    if limit and needed > limit:
        print(f"otabox simulate: warning: {needed} sockets may be needed, open-file limit is {limit}", file=sys.stderr)
    host = args.mqtt_host or client.base.hostname or "127.0.0.1"
    port = args.mqtt_port or _mqtt_port(client)
    behaviours = assign(len(devices), args.mix, args.seed)
    from otabox.sim.fleet import Fleet, FleetConfig

    config = FleetConfig(
        host=host,
        port=port,
        product_key=args.product,
        request_mode=args.request,
        poll=args.poll,
        flash_time=args.flash_time,
        reboot_time=args.reboot_time,
        download_speed=args.download_speed,
        churn_interval=args.churn_interval,
        connect_concurrency=args.connect_concurrency,
        http_connections=args.http_connections,
        keepalive=args.keepalive,
        duration=args.duration,
        seed=args.seed,
        live=sys.stderr.isatty() and not args.json,
        until_stopped=bool(args.job),
    )
    fleet = Fleet(config, [(dk, s, v, b) for (dk, s, v), b in zip(devices, behaviours, strict=True)])
    summary = _run(fleet, client, args.job)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    return 130 if summary["stoppedBy"] == "interrupted" else 0


async def _watch_job(fleet: Fleet, client: Client, job_id: str) -> None:
    """End the run once the job has settled: finished, or (incremental) with every device done,
    no task active and no retry due, as the server reports it."""
    while True:
        job = await asyncio.to_thread(client.get, f"/jobs/{job_id}")
        c = job["counts"]
        if job["status"] in ("completed", "canceled", "aborted"):
            fleet.stop(f"job {job['status']}")
            return
        settled = not (c["pending"] or c["published"] or c["upgrading"] or job.get("retriesPending"))
        if settled and fleet.remaining <= 0 and job["total"] > 0:
            fleet.stop("job settled")
            return
        await asyncio.sleep(1.0)


def _run(fleet: Fleet, client: Client | None = None, job_id: str | None = None) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGINT, fleet.stop)
            loop.add_signal_handler(signal.SIGTERM, fleet.stop)
        except (NotImplementedError, RuntimeError):
            pass  # not the main thread, or no signal support: Ctrl-C then ends the process the hard way
        watcher = asyncio.create_task(_watch_job(fleet, client, job_id)) if client and job_id else None
        try:
            return await fleet.run()
        finally:
            if watcher is not None:
                watcher.cancel()

    try:
        import uvloop

        result: dict[str, Any] = uvloop.run(main())  # pragma: no cover - optional speed-up
        return result
    except ImportError:
        return asyncio.run(main())


def raise_open_files_limit() -> int:
    """Raise the soft open-file limit to the hard limit (10,000 devices need 10,000+ sockets); return it."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 0


def _devices(args: argparse.Namespace, client: Client) -> list[tuple[str, str, str]]:
    if args.csv:
        devices = read_devices_csv(args.csv, args.version)
        if not devices:
            raise ValueError(f"{args.csv} lists no devices")
        return devices
    return create_devices(client, args.product, args.devices, args.prefix, args.version, _tags(args.tag), args.save_csv)


def create_devices(
    client: Client,
    product_key: str,
    n: int,
    prefix: str,
    version: str,
    tags: dict[str, str] | None = None,
    save_csv: str | None = None,
) -> list[tuple[str, str, str]]:
    """Create `prefix0001`... through bulk import; return (deviceKey, deviceSecret, version) tuples.

    Raises ValueError when some keys already exist (choose another prefix, or --csv) and
    otabox.cli.client.ApiError for other API errors.
    """
    if n < 1:
        raise ValueError("--devices must be at least 1")
    width = max(4, len(str(n)))
    keys = [f"{prefix}{i:0{width}d}" for i in range(1, n + 1)]
    created: list[tuple[str, str, str]] = []
    for start in range(0, n, IMPORT_BATCH):
        rows = [{"deviceKey": k, "tags": tags or {}} for k in keys[start : start + IMPORT_BATCH]]
        result = client.post(f"/products/{product_key}/devices:import", rows)
        created += [(d["deviceKey"], d["deviceSecret"], version) for d in result["devices"]]
        if result["rejected"]:
            first = result["errors"][0]
            raise ValueError(
                f"{result['rejected']} devices not created ({first['deviceKey']}: {first['reason']}); "
                "use another --prefix, or --csv with their secrets"
            )
    if save_csv:
        with open(save_csv, "w", encoding="utf-8", newline="") as fh:
            os.chmod(save_csv, 0o600)
            writer = csv.writer(fh)
            writer.writerow(["deviceKey", "deviceSecret", "version"])
            writer.writerows(created)
    return created


def _tags(values: Sequence[str] | None) -> dict[str, str]:
    """Raises ValueError for an item that is not key=value."""
    return dict(parse_tag(v) for v in values or [])


def _mqtt_port(client: Client) -> int:
    url = urllib.parse.urlunsplit(client.base._replace(path=client.base.path + "/healthz"))
    with urllib.request.urlopen(url, timeout=10) as resp:
        return int(json.loads(resp.read())["mqttPort"])


def format_summary(s: dict[str, Any]) -> str:
    """The summary for people: totals, then one row per behaviour."""
    reasons = {"done": "every device finished", "duration": "--duration reached", "interrupted": "interrupted"}
    lines = [
        f"simulated {s['devices']} devices ({s['mode']} mode) for {s['elapsedSeconds']:.1f}s;"
        f" stopped: {reasons.get(s['stoppedBy'], s['stoppedBy'])}",
        "outcomes: " + (", ".join(f"{k} {v}" for k, v in s["outcomes"].items()) or "none"),
    ]
    columns = [o for o in ("succeeded", "failed", "silent", "waiting", "upgrading", "refused") if o in s["outcomes"]]
    header = ["behaviour", "assigned", *columns]
    rows = [
        [b, str(e["assigned"]), *(str(e["outcomes"].get(c, 0)) for c in columns)] for b, e in s["behaviours"].items()
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  " + "  ".join(cells))
    lines.append(
        f"downloaded {s['downloadedBytes'] / 1e6:.1f} MB; reconnects {s['reconnects']};"
        f" churn disconnects {s['churnDisconnects']}; resumed downloads {s['resumedDownloads']};"
        f" connect failures {s['connectFailures']}; deltas used {s['deltasUsed']}, fallen back {s['deltaFallbacks']}"
    )
    if s.get("connectSeconds") is not None:
        lines.append(f"all {s['devices']} devices logged in within {s['connectSeconds']:.1f}s")
    return "\n".join(lines)
