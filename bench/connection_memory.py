"""`python -m bench.connection_memory`: what one idle connected device costs the server, in bytes.

A fresh otabox (the `otabox serve` entry point, loopback, in a child process) and N devices
(in this process, `otabox.device.mqtt` clients) that each log in the EnOS way (secure mode 2,
HMAC-SHA256 signature), SUBSCRIBE to two of their own topics, report their version (inform,
answered by the server) and then stay connected and idle, keep-alive 60 s. The child measures
itself before the first device connects and once every device is served and quiet:

- RSS per connection: (VmRSS after - VmRSS before) / N, after a full `gc.collect()`, in a run
  without tracemalloc (tracemalloc's own bookkeeping would count).
- Python heap per connection (a second run, under tracemalloc): the traced bytes' growth / N,
  and the top allocation sites (file:line) by bytes per connection.
- Objects per connection: the growth of `gc.get_objects()` per type / N (containers only:
  str and bytes are not tracked by the collector, tracemalloc sees them).

The floor (`--floor`, on by default): the same measures for a child that is no MQTT server
at all, holding N connections with bare asyncio, once as streams (StreamReader/StreamWriter
plus one task reading each, as asyncio.start_server serves them) and once as a bare Protocol
(transport and protocol object, no task). Its clients only connect.

    python -m bench.connection_memory --devices 2000
    python -m bench.connection_memory --devices 2000 --json > memory.json

What limits the figures: RSS moves in whole pages and with Python's allocator (pymalloc arenas,
glibc's free lists), so only thousands of devices give a stable figure per connection; both
runs see the same connect transients (256 KiB socket reads shrunk to what arrived).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import urllib.request
from pathlib import Path
from typing import Any

TOKEN = "bench-memory-token"
PK = "memprod"
KEEPALIVE = 60
SUBSCRIPTIONS = ("ota/device/upgrade", "ota/device/getversion_reply")
TOP = 25
FRAMES = 12  # traced per allocation, so that asyncio's allocations are charged to their callers
# Frames skipped when charging an allocation to a caller: the machinery, not who asked for it.
MACHINERY = ("/asyncio/", "/collections/", "_weakrefset.py", "/logging/", "/contextlib.py", "/typing.py", "/abc.py")

# ---------------------------------------------------------------- the measuring side (child)


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _type_counts() -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for obj in gc.get_objects():
        t = type(obj)
        counts[f"{t.__module__}.{t.__qualname__}"] += 1
    return counts


class Probe:
    """The child's measurements: `base` before the devices come, `diff` once they are all idle.

    With `trace`, tracemalloc starts at `base` (start-up under it would take minutes): what it
    sees is exactly what was allocated since, and is still alive.
    """

    def __init__(self, trace: bool) -> None:
        self.trace = trace
        self.base: dict[str, Any] = {}

    def _sample(self) -> dict[str, Any]:
        gc.collect()
        sample: dict[str, Any] = {"rss": _status_kb("VmRSS"), "anon": _status_kb("RssAnon"), "types": _type_counts()}
        if tracemalloc.is_tracing():
            sample["snapshot"] = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)]
            )
            sample["traced"] = tracemalloc.get_traced_memory()[0]
        return sample

    def command(self, line: str) -> dict[str, Any]:
        word, _, arg = line.strip().partition(" ")
        if word == "base":
            if self.trace:
                tracemalloc.start(FRAMES)
            self.base = self._sample()
            return {"rss": self.base["rss"]}
        if word == "diff":
            return self.diff(int(arg))
        raise ValueError(f"unknown command {word!r}")

    def diff(self, n: int) -> dict[str, Any]:
        now, base = self._sample(), self.base
        out: dict[str, Any] = {
            "connections": n,
            "rssBefore": base["rss"],
            "rssAfter": now["rss"],
            "rssPerConnection": round((now["rss"] - base["rss"]) / n),
            "anonPerConnection": round((now["anon"] - base["anon"]) / n),
        }
        grown = now["types"] - base["types"]
        out["objectsPerConnection"] = {t: round(c / n, 2) for t, c in grown.most_common(TOP) if c >= n / 10}
        if "snapshot" in now and "snapshot" in base:
            out["tracedPerConnection"] = round((now["traced"] - base["traced"]) / n)
            stats = now["snapshot"].compare_to(base["snapshot"], "lineno")
            sites = []
            for stat in sorted(stats, key=lambda s: s.size_diff, reverse=True)[:TOP]:
                frame = stat.traceback[0]
                sites.append(
                    {
                        "site": f"{_short(frame.filename)}:{frame.lineno}",
                        "bytes": round(stat.size_diff / n),
                        "blocks": round(stat.count_diff / n, 2),
                    }
                )
            out["topSites"] = sites
            callers: collections.Counter[str] = collections.Counter()
            for stat in now["snapshot"].compare_to(base["snapshot"], "traceback"):
                callers[_caller(stat.traceback)] += stat.size_diff
            out["topCallers"] = [{"site": site, "bytes": round(b / n)} for site, b in callers.most_common(TOP)]
        return out


def _caller(traceback: tracemalloc.Traceback) -> str:
    """The innermost frame outside asyncio and the standard containers: who made the allocation."""
    frames = list(reversed(traceback))  # tracemalloc orders them oldest first
    for frame in frames:
        if not any(m in frame.filename for m in MACHINERY):
            return f"{_short(frame.filename)}:{frame.lineno}"
    return f"{_short(frames[-1].filename)}:{frames[-1].lineno}" if frames else "?"


def _short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in path:
            tail = path.split(marker, 1)[1]
            return tail.split("/", 1)[1] if marker == "/lib/python3" else tail
    return path


def _control(path: str, probe: Probe) -> None:
    """Serve the parent's commands (one line in, one JSON line out) from a thread of the child."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    while True:
        conn, _ = server.accept()
        with conn, conn.makefile("rw") as fh:
            for line in fh:
                try:
                    reply = probe.command(line)
                except Exception as exc:  # reported to the parent, which fails the run
                    reply = {"error": repr(exc)}
                fh.write(json.dumps(reply) + "\n")
                fh.flush()


def child_main(kind: str, ctl: str, trace: bool, rest: list[str]) -> int:
    probe = Probe(trace)
    threading.Thread(target=_control, args=(ctl, probe), daemon=True).start()
    if kind == "otabox":
        from otabox.cli.main import main

        return main(rest)
    return asyncio.run(_floor_server(kind, rest[0]))


async def _floor_server(kind: str, port_file: str) -> int:
    """Hold every connection until killed: streams (one task each) or a bare Protocol."""
    held: list[Any] = []

    async def serve_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(4096):
            pass

    class Bare(asyncio.Protocol):
        __slots__ = ("transport",)

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            held.append(self)

    if kind == "streams":
        server = await asyncio.start_server(serve_stream, "127.0.0.1", 0, backlog=4096)
    else:
        server = await asyncio.get_running_loop().create_server(Bare, "127.0.0.1", 0, backlog=4096)
    Path(port_file).write_text(str(server.sockets[0].getsockname()[1]))
    await asyncio.Event().wait()
    return 0


# ---------------------------------------------------------------- the driving side (parent)


class Child:
    def __init__(self, kind: str, work: Path, trace: bool, extra: list[str], env: dict[str, str]) -> None:
        self.ctl = str(work / f"{kind}-{int(trace)}.sock")
        argv = [sys.executable, "-m", "bench.connection_memory", "--child", kind, "--ctl", self.ctl]
        argv += ["--trace"] if trace else []
        self.log = work / f"{kind}-{int(trace)}.log"
        with open(self.log, "wb") as fh:
            self.popen = subprocess.Popen(
                [*argv, "--", *extra], stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=env
            )

    def ask(self, command: str) -> dict[str, Any]:
        deadline = time.monotonic() + 30
        while not os.path.exists(self.ctl):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"child did not start; log {self.log}:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(600)
            s.connect(self.ctl)
            s.sendall(command.encode() + b"\n")
            reply: dict[str, Any] = json.loads(s.makefile().readline())
        if "error" in reply:
            raise RuntimeError(f"child: {reply['error']}")
        return reply

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _otabox_run(devices: int, trace: bool, work: Path) -> dict[str, Any]:
    from otabox.cli.client import Client
    from otabox.cli.simulate import create_devices

    data = work / f"data-{int(trace)}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTABOX_")}
    env["OTABOX_ADMIN_TOKEN"] = TOKEN
    serve = ["serve", "--data-dir", str(data), "--host", "127.0.0.1", "--http-port", "0", "--mqtt-port", "0"]
    child = Child("otabox", work, trace, [*serve, "--log-level", "WARNING"], env)
    try:
        ports_file = data / "ports.json"
        _wait(lambda: ports_file.exists() or child.popen.poll() is not None, 120, "the server's ports.json")
        if child.popen.poll() is not None:
            raise RuntimeError(f"otabox exited: {child.log.read_text()[-2000:]}")
        ports = json.loads(ports_file.read_text())
        http, mqtt = int(ports["http"]), int(ports["mqtt"])
        client = Client(f"http://127.0.0.1:{http}", TOKEN)
        _wait(lambda: _healthz(http) is not None, 30, "the server's /healthz")
        client.post("/products", {"productKey": PK, "name": PK})
        creds = create_devices(client, PK, devices, "mem-", "1.0.0")
        # A device that came and went first: pools, caches and lazily built classes are warm.
        asyncio.run(_devices(mqtt, creds[:1], hold=False))
        time.sleep(1)
        base = child.ask("base")
        t0 = time.monotonic()

        async def hold() -> dict[str, Any]:
            clients = await _devices(mqtt, creds, hold=True)
            connected = time.monotonic() - t0

            def served() -> bool:
                health = _healthz(http) or {}
                informed = client.get(f"/products/{PK}/devices", limit=1, version="1.0.0")["total"]
                return health.get("devicesConnected") == devices and informed >= devices

            await asyncio.to_thread(_wait, served, 120, "every device online with its version")
            await asyncio.sleep(2)  # the last informs' replies and store writes settle
            result = await asyncio.to_thread(child.ask, f"diff {devices}")
            result["connectSeconds"] = round(connected, 2)
            for c in clients:
                c.close()
            return result

        result = asyncio.run(hold())
        result["rssBaseline"] = base["rss"]
        return result
    finally:
        child.stop()


def _healthz(http: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/healthz", timeout=5) as resp:
            body: dict[str, Any] = json.loads(resp.read())
            return body
    except (OSError, ValueError):
        return None


async def _devices(port: int, creds: list[tuple[str, str, str]], hold: bool) -> list[Any]:
    """Log every device in, subscribe, inform; return the connected clients (closed unless `hold`)."""
    from otabox import protocol
    from otabox.device.mqtt import MQTTLiteClient

    ts = str(int(time.time() * 1000))
    todo = iter(creds)
    clients: list[Any] = []

    async def one(dk: str, secret: str, version: str) -> None:
        c = MQTTLiteClient()
        password = protocol.sign(protocol.login_params(dk, PK, ts), secret, "hmacsha256")
        cid = protocol.client_id_for(dk, "hmacsha256", ts)
        await c.connect("127.0.0.1", port, cid, f"{dk}&{PK}", password, keepalive=KEEPALIVE)
        for i, suffix in enumerate(SUBSCRIPTIONS):
            await c.subscribe(protocol.topic_for(PK, dk, suffix), qos=1 - i)
        body = protocol.request("1", "ota.device.inform", {"version": version})
        await c.publish(protocol.topic_for(PK, dk, protocol.INFORM), body)
        clients.append(c)

    async def worker() -> None:
        for dk, secret, version in todo:
            await one(dk, secret, version)

    await asyncio.gather(*(worker() for _ in range(100)))
    if not hold:
        for c in clients:
            c.close()
        await asyncio.sleep(0.5)
    return clients


def _floor_run(kind: str, devices: int, trace: bool, work: Path) -> dict[str, Any]:
    port_file = work / f"{kind}-{int(trace)}.port"
    child = Child(kind, work, trace, [str(port_file)], dict(os.environ))
    try:
        _wait(port_file.exists, 30, f"the {kind} floor server")
        port = int(port_file.read_text())
        socks = [socket.create_connection(("127.0.0.1", port))]  # warm-up, as for otabox
        time.sleep(0.5)
        child.ask("base")
        for _ in range(devices):
            socks.append(socket.create_connection(("127.0.0.1", port)))
        time.sleep(2)
        result = child.ask(f"diff {devices}")
        for s in socks:
            s.close()
        return result
    finally:
        child.stop()


def run(devices: int, floor: bool = True, trace: bool = True) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="otabox-mem-") as tmp:
        work = Path(tmp)
        out: dict[str, Any] = {"devices": devices, "subscriptions": len(SUBSCRIPTIONS), "keepalive": KEEPALIVE}
        out["otabox"] = _otabox_run(devices, False, work)
        if trace:
            out["otaboxTraced"] = _otabox_run(devices, True, work)
        if floor:
            for kind in ("streams", "protocol"):
                out[kind] = _floor_run(kind, devices, False, work)
                if trace:
                    out[kind + "Traced"] = _floor_run(kind, devices, True, work)
    return out


def print_report(r: dict[str, Any]) -> None:
    n = r["devices"]
    print(f"per idle connection, {n} devices (EnOS login, {r['subscriptions']} SUBSCRIBEs, inform, keep-alive)")
    rows = [("otabox", "otabox"), ("asyncio streams + task", "streams"), ("asyncio Protocol", "protocol")]
    print(f"{'':26} {'RSS B':>8} {'anon B':>8} {'traced B':>9}")
    for label, key in rows:
        if key not in r:
            continue
        traced = r.get(key + "Traced", {}).get("tracedPerConnection", "")
        print(f"{label:26} {r[key]['rssPerConnection']:>8} {r[key]['anonPerConnection']:>8} {traced!s:>9}")
    t = r.get("otaboxTraced")
    if t:
        print(f"\notabox: top allocation sites (bytes and blocks per connection, of {t['tracedPerConnection']} B)")
        for site in t["topSites"]:
            print(f"  {site['bytes']:>7} B {site['blocks']:>6.2f}  {site['site']}")
        print("\notabox: the same bytes charged to the first caller outside asyncio/collections/logging")
        for site in t["topCallers"]:
            print(f"  {site['bytes']:>7} B  {site['site']}")
    print("\notabox: objects per connection (gc-tracked containers)")
    for name, count in r["otabox"]["objectsPerConnection"].items():
        print(f"  {count:>6.2f}  {name}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.connection_memory", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--devices", type=int, default=2000)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--no-floor", action="store_true", help="skip the bare-asyncio floor runs")
    p.add_argument("--no-trace", action="store_true", help="skip the tracemalloc runs (RSS and objects only)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--ctl", help=argparse.SUPPRESS)
    p.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_main(args.child, args.ctl, args.trace, args.rest)
    from bench.servers import raise_nofile

    raise_nofile()
    result = run(args.devices, floor=not args.no_floor, trace=not args.no_trace)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
