"""A share of a storm's devices in a process of its own: `python -m bench.stormclient` (harness-driven).

A TLS login costs the client more CPU than the server (the handshake: ~1.3 ms here, against
~0.16 ms for a plain TCP connect), so one harness loop cannot keep otabox busy: the TLS storms
run their devices in `--tls-clients` of these processes; `bench.cluster --figure progress` runs
the devices of 50,000 in them for the same reason. Each reads one JSON line on stdin
(`host, port, pk, ts, ca, concurrency, timeout, devices: [[key, secret, cert, key] ...]`; `ca`
null for plain MQTT), builds its TLS contexts (one shared, or one per device with a
certificate), prints `{"ready": ...}`, and then obeys one command per line:

- `go`: connect every device; prints when the first connect started and the last CONNACK
  arrived, as wall-clock times, and the CPU it used;
- `inform VERSION`: every connected device reports VERSION and waits for the reply;
- `pushes SECONDS`: wait up to SECONDS until every connected device has had a push;
- `progress K`: every pushed device sends K progress reports, each after the previous reply
  (steps 10, 20, ...), `concurrency` devices at a time;
- `disconnect` (prints `{"disconnected": n}`), `quit` or end of input.

Every answer is one JSON line on stdout; the timed ones carry `first` and `last` (wall clock).
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from typing import Any

from bench import clients
from bench.clients import Dev
from otabox import protocol
from otabox.device.mqtt import small_tls_buffers
from otabox.device.tls import make_tls_context


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _inform(version: str) -> Any:
    return lambda _dev, _i: (protocol.INFORM, "ota.device.inform", {"version": version})


def _progress(_dev: Dev, i: int) -> tuple[str, str, dict[str, Any]]:
    # Steps 10, 20, ... (100 from the tenth on), as `python -m bench` sends them.
    return protocol.PROGRESS, "ota.device.progress", {"step": str(min(100, 10 + 10 * i)), "desc": "bench"}


async def _timed(devs: list[Dev], make: Any, per_device: int, spec: dict[str, Any]) -> dict[str, Any]:
    """`clients.calls` with wall-clock ends and this process's CPU, for the harness to add up."""
    c0 = _cpu()
    first = time.time()
    done = await clients.calls(devs, make, spec["pk"], per_device, spec["concurrency"], spec["timeout"])
    return {**done, "devices": len(devs), "first": first, "last": first + done["seconds"], "cpuSeconds": _cpu() - c0}


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 30)  # the first line carries every device (and its key)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    spec = json.loads(await reader.readline())
    small_tls_buffers()
    c0 = _cpu()
    shared = make_tls_context(ca_pem=spec["ca"]) if spec["ca"] else None
    devs = []
    for key, secret, cert, private in spec["devices"]:
        dev = Dev(key, secret)
        if cert:
            dev.tls = make_tls_context(ca_pem=spec["ca"], cert_pem=cert, key_pem=private)
        devs.append(dev)
    _say({"ready": len(devs), "contextSeconds": round(_cpu() - c0, 2)})
    while line := (await reader.readline()).strip():
        if line == b"go":
            c0 = _cpu()
            first = time.time()
            st = await clients.storm(
                devs, spec["host"], spec["port"], spec["pk"], spec["ts"], spec["concurrency"], spec["timeout"], shared
            )
            last = max((d.connected_at for d in devs if d.client.connected), default=time.monotonic())
            st["first"], st["last"] = first, time.time() - (time.monotonic() - last)
            st["cpuSeconds"] = round(_cpu() - c0, 3)
            obj = next((d.client.get_extra_info("ssl_object") for d in devs if d.client.connected), None)
            st["tlsVersion"] = f"{obj.version()} {obj.cipher()[0]}" if obj is not None and obj.cipher() else None
            _say(st)
        elif line.startswith(b"inform "):
            live = [d for d in devs if d.client.connected]
            _say(await _timed(live, _inform(line.split()[1].decode()), 1, spec))
        elif line.startswith(b"pushes "):
            live = [d for d in devs if d.client.connected]
            first = time.time()
            got = await clients.wait_pushes(live, time.monotonic(), float(line.split()[1]))
            _say({**got, "first": first, "last": first + got["seconds"]})
        elif line.startswith(b"progress "):
            pushed = [d for d in devs if d.pushed_at and d.client.connected]
            _say(await _timed(pushed, _progress, int(line.split()[1]), spec))
        elif line == b"disconnect":
            await clients.disconnect_all(devs)
            _say({"disconnected": len(devs)})
        elif line == b"quit":
            break
    for dev in devs:
        dev.client.close()


if __name__ == "__main__":
    asyncio.run(main())
