"""A share of a TLS connect storm's devices in a process of its own: `python -m bench.stormclient` (harness-driven).

A TLS login costs the client more CPU than the server (the handshake: ~1.3 ms here, against
~0.16 ms for a plain TCP connect), so one harness loop cannot keep otabox busy: the TLS storms
run their devices in `--tls-clients` of these processes. Each reads one JSON line on stdin
(`host, port, pk, ts, ca, concurrency, timeout, devices: [[key, secret, cert, key] ...]`), builds
its TLS contexts (one shared, or one per device with a certificate), prints `{"ready": ...}`, and
then obeys one command per line: `go` (connect every device; prints when the first connect
started and the last CONNACK arrived, as wall-clock times, and the CPU it used), `disconnect`
(prints `{"disconnected": n}`), `quit` or end of input. Every answer is one JSON line on stdout.
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
from otabox.device.mqtt import small_tls_buffers
from otabox.device.tls import make_tls_context


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 30)  # the first line carries every device (and its key)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    spec = json.loads(await reader.readline())
    small_tls_buffers()
    c0 = _cpu()
    shared = make_tls_context(ca_pem=spec["ca"])
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
        elif line == b"disconnect":
            await clients.disconnect_all(devs)
            _say({"disconnected": len(devs)})
        elif line == b"quit":
            break
    for dev in devs:
        dev.client.close()


if __name__ == "__main__":
    asyncio.run(main())
