"""`otabox simulate`: rehearse a rollout against a real server with a fleet of simulated devices.

This module is imported whenever the CLI parser is built, so it stays light: the engine
(`otabox.sim.fleet`: mqttlite, aiohttp) is imported only when the command runs. Behaviour mixes,
ranges and device lists are parsed here with plain functions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import logging
import os
import random
import signal
import ssl
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
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
# Certificate requests in flight at once: enough to keep the server's signing busy, few enough
# that a 10,000-device fleet does not crowd out the API for everyone else.
CERT_CONCURRENCY = 8


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
    p.add_argument("--mqtt-port", type=int, help="broker port [from the server's /healthz, or ports.json with --tls]")
    tls = p.add_argument_group("TLS")
    tls.add_argument("--tls", action="store_true", help="connect to the server's MQTT-over-TLS port (mqtts)")
    tls.add_argument(
        "--ca", metavar="FILE", help="CA certificate (PEM) to pin [fetched from the server's /ca.pem]; implies --tls"
    )
    tls.add_argument(
        "--client-certs",
        nargs="?",
        const="",
        metavar="DIR",
        help="each device gets a certificate through the API and presents it (two-way TLS); implies --tls. "
        "With DIR, certificates are kept there (<deviceKey>.pem, 0600) and reused on later runs",
    )
    p.set_defaults(api_call=run_command)


def run_command(args: argparse.Namespace, client: Client) -> int:
    """Prepare devices through the API, run the fleet, print the summary. Returns the exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    limit = raise_open_files_limit()
    host = args.mqtt_host or client.base.hostname or "127.0.0.1"
    use_tls = args.tls or args.ca is not None or args.client_certs is not None
    try:
        # The CA first: an https API URL is checked against it from the first request on.
        tls = _tls_trust(args, client) if use_tls else None
        port = args.mqtt_port or _mqtt_port(client, use_tls, args.data_dir)
        if tls is not None:
            probe_tls(host, port, tls.shared)  # before any device is created
        devices = _devices(args, client)
        if tls is not None and args.client_certs is not None:
            _client_certs(tls, args, client, [dk for dk, _, _ in devices])
    except (ValueError, OSError) as exc:
        print(f"otabox simulate: {exc}", file=sys.stderr)
        return 2
    needed = len(devices) + args.http_connections + 64
    if limit and needed > limit:
        print(f"otabox simulate: warning: {needed} sockets may be needed, open-file limit is {limit}", file=sys.stderr)
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
        tls=tls.shared if tls else None,
    )
    rows = [(dk, s, v, b) for (dk, s, v), b in zip(devices, behaviours, strict=True)]
    fleet = Fleet(config, rows, tls.per_device if tls else None)
    summary = _run(fleet, client, args.job)
    summary["transport"] = tls.describe() if tls else {"tls": False}
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


def _mqtt_port(client: Client, tls: bool = False, data_dir: str | None = None) -> int:
    """The broker's port: plain from /healthz; with `tls` the mqtts port, from /healthz when it tells
    it, else from the ports.json of the server at the API URL (--data-dir). Raises ValueError."""
    url = urllib.parse.urlunsplit(client.base._replace(path=client.base.path + "/healthz"))
    with urllib.request.urlopen(url, timeout=10, context=client.context) as resp:
        health = json.loads(resp.read())
    if not tls:
        return int(health["mqttPort"])
    port = health.get("mqttsPort")
    if isinstance(port, int) and port > 0:
        return port
    ports = _ports_json(data_dir)
    served = {ports.get("http"), ports.get("https")}
    if isinstance(ports.get("mqtts"), int) and (client.base.port or 80) in served:
        return int(ports["mqtts"])
    raise ValueError(
        "cannot tell the server's MQTT-over-TLS port; give --mqtt-port (or --data-dir of the server), "
        "and check that it runs with --tls-self-signed or --tls-cert"
    )


def _ports_json(data_dir: str | None) -> dict[str, Any]:
    path = Path(data_dir or os.environ.get("OTABOX_DATA_DIR", "./otabox-data")) / "ports.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------- TLS


class TLSSetup:
    """What the fleet connects with: one context pinning the CA, and one per device with its certificate."""

    def __init__(self, shared: ssl.SSLContext, ca_source: str, ca_pem: str) -> None:
        self.shared = shared
        self.ca_source = ca_source
        self.ca_pem = ca_pem
        self.per_device: dict[str, ssl.SSLContext] = {}
        self.issued = 0
        self.reused = 0

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tls": True, "ca": self.ca_source, "clientCertificates": bool(self.per_device)}
        if self.per_device:
            out |= {"certificatesIssued": self.issued, "certificatesReused": self.reused}
        return out


def _tls_trust(args: argparse.Namespace, client: Client) -> TLSSetup:
    """The pinned CA: --ca, else the server's /ca.pem. Raises ValueError / OSError for people."""
    from otabox.device.tls import make_tls_context

    if args.ca is not None:
        ca_pem = Path(args.ca).read_text(encoding="utf-8")
        source = args.ca
    else:
        ca_pem = fetch_ca_pem(client)
        source = client.base.geturl() + "/ca.pem"
    try:
        shared = make_tls_context(ca_pem=ca_pem)
    except ssl.SSLError as exc:
        raise ValueError(f"{source} is not a PEM CA certificate: {exc}") from None
    if client.base.scheme == "https" and client.context is None:
        client.context = shared  # the API on HTTPS is checked against the same CA
    return TLSSetup(shared, source, ca_pem)


def _client_certs(tls: TLSSetup, args: argparse.Namespace, client: Client, keys: list[str]) -> None:
    """--client-certs: every device's certificate (issued or reused), loaded into its own context."""
    from otabox.device.tls import make_tls_context

    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        # Without DIR, a private temporary folder: once loaded, the keys live in memory only.
        folder = Path(args.client_certs or stack.enter_context(tempfile.TemporaryDirectory(prefix="otabox-sim-")))
        files, tls.issued, tls.reused = issue_certificates(client, args.product, keys, folder)
        tls.per_device = {dk: make_tls_context(ca_pem=tls.ca_pem, cert_file=path) for dk, path in files.items()}
    if not args.json:
        print(
            f"device certificates: {tls.issued} issued, {tls.reused} reused ({time.monotonic() - started:.1f}s)",
            file=sys.stderr,
        )


def fetch_ca_pem(client: Client) -> str:
    """The server's CA certificate from `/ca.pem` at the API URL's root. Raises ValueError for people."""
    url = urllib.parse.urlunsplit(client.base._replace(path=client.base.path + "/ca.pem"))
    try:
        with urllib.request.urlopen(url, timeout=10, context=client.context) as resp:
            pem: str = resp.read().decode("ascii", errors="replace")
    except urllib.error.HTTPError as exc:
        raise ValueError(f"{url}: HTTP {exc.code}; does the server run with TLS? or give --ca FILE") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLError):
            raise ValueError(
                f"{url}: {exc.reason}; give the server's CA with --ca FILE (`otabox ca show` on the server)"
            ) from None
        raise
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise ValueError(f"{url} did not answer with a PEM certificate; give --ca FILE")
    return pem


def issue_certificates(
    client: Client,
    product_key: str,
    keys: Sequence[str],
    folder: Path,
    concurrency: int = CERT_CONCURRENCY,
) -> tuple[dict[str, Path], int, int]:
    """A certificate and key per device, as one PEM file each: (files by deviceKey, issued, reused).

    Files already in `folder` (`<deviceKey>.pem`) are reused; the others are issued through
    `POST /products/{pk}/devices/{dk}/certificates` (otabox makes the key), `concurrency` requests
    at a time, and written there 0600 (the folder is made 0700). Raises otabox.cli.client.ApiError
    (e.g. a role that may not issue certificates).
    """
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # private keys
    files = {dk: folder / f"{_safe_name(dk)}.pem" for dk in keys}
    missing = [dk for dk, path in files.items() if not path.exists()]

    def issue(dk: str) -> None:
        quoted = urllib.parse.quote(dk, safe="")
        got = client.post(f"/products/{urllib.parse.quote(product_key, safe='')}/devices/{quoted}/certificates", {})
        fd = os.open(files[dk], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(got["certificate"].rstrip("\n") + "\n" + got["privateKey"].rstrip("\n") + "\n")

    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="otabox-cert") as pool:
        # list(): the first failure is raised here, after the others in flight have finished.
        list(pool.map(issue, missing))
    return files, len(missing), len(files) - len(missing)


def _safe_name(device_key: str) -> str:
    """A file name for a deviceKey (they may hold characters a file name must not)."""
    return urllib.parse.quote(device_key, safe="-_.") or "_"


def probe_tls(host: str, port: int, context: ssl.SSLContext, timeout: float = 10.0) -> None:
    """One TLS handshake with the broker before the fleet starts, so a wrong CA or port is one clear error."""
    import socket

    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as sock,
            context.wrap_socket(sock, server_hostname=host),
        ):
            pass
    except ssl.SSLCertVerificationError as exc:
        raise ValueError(
            f"TLS to {host}:{port}: certificate verify failed ({exc.verify_message}); is the CA the server's,"
            f" and {host!r} a name in its certificate (--mqtt-host)?"
        ) from None
    except ssl.SSLError as exc:
        raise ValueError(f"TLS to {host}:{port} failed: {exc}; is {port} the server's mqtts port?") from None


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
    t = s.get("transport") or {}
    if t.get("tls"):
        how = "TLS with a device certificate each" if t.get("clientCertificates") else "TLS"
        lines.append(f"transport: {how}; CA pinned from {t['ca']}")
    return "\n".join(lines)
