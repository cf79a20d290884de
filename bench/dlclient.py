"""Download load generator, run as its own process: `python -m bench.dlclient URL --clients 20 --seconds 15`.

Each client keeps one HTTP/1.1 keep-alive connection and GETs whole files in a loop; bodies are
received into one reused buffer (asyncio BufferedProtocol: no per-chunk objects, no parsing
beyond the header), so the client costs little more than the kernel's copy and the server is
what is measured. Downloads started before the deadline run to their end. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
import urllib.parse
from typing import Any

BUFFER = 1 << 20


class Getter(asyncio.BufferedProtocol):
    """One connection: send a GET, count the body's bytes, resolve `done` with the status."""

    def __init__(self, buf: bytearray) -> None:
        self.buf = memoryview(buf)
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.left = -1  # body bytes still expected; -1 while reading the header
        self.status = 0
        self.got = 0
        self.done: asyncio.Future[int] | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get(self, request: bytes) -> asyncio.Future[int]:
        assert self.transport is not None
        self.head, self.left, self.status = b"", -1, 0
        self.done = asyncio.get_running_loop().create_future()
        if self.lost is not None:
            self.done.set_exception(ConnectionError("connection lost"))
        else:
            self.transport.write(request)
        return self.done

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        if self.left < 0:
            self.head += bytes(self.buf[:nbytes])
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status = int(self.head[9:12])
            length = 0
            for line in self.head[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = len(self.head) - end - 4
            self.left = length - body
            self.got += body
        else:
            self.left -= nbytes
            self.got += nbytes
        if self.left <= 0 and self.done is not None and not self.done.done():
            self.done.set_result(self.status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionError("closed by peer")
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError(f"connection lost: {self.lost!r}"))


async def load(urls: list[str], clients: int, seconds: float, max_count: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + seconds
    started = 0
    count = 0
    total = 0
    errors: list[str] = []

    async def client(i: int) -> None:
        nonlocal started, count, total
        url = urllib.parse.urlsplit(urls[i % len(urls)])
        path = url.path + ("?" + url.query if url.query else "")
        request = f"GET {path} HTTP/1.1\r\nHost: {url.netloc}\r\nUser-Agent: otabox-bench\r\n\r\n".encode()
        proto: Getter | None = None
        buf = bytearray(BUFFER)
        while time.monotonic() < deadline and started < max_count:
            started += 1
            try:
                if proto is None or proto.lost is not None:
                    _, proto = await loop.create_connection(
                        lambda: Getter(buf), url.hostname or "127.0.0.1", url.port or 80
                    )
                before = proto.got
                async with asyncio.timeout(120):
                    status = await proto.get(request)
                total += proto.got - before
                if status != 200:
                    errors.append(f"HTTP {status}")
                    proto = None
                    await asyncio.sleep(0.1)
                else:
                    count += 1
            except (OSError, ValueError, TimeoutError) as exc:
                errors.append(repr(exc))
                proto = None
                await asyncio.sleep(0.1)
        if proto is not None and proto.transport is not None:
            proto.transport.close()

    t0 = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.monotonic() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "clients": clients,
        "downloads": count,
        "bytes": total,
        "seconds": round(elapsed, 3),
        "MBps": round(total / elapsed / 1e6, 1) if elapsed > 0 else None,
        "errors": len(errors),
        "firstError": errors[0] if errors else None,
        "clientCpuPercent": round(100 * (ru.ru_utime + ru.ru_stime) / elapsed) if elapsed > 0 else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dlclient", description=__doc__)
    p.add_argument("urls", nargs="+", help="http:// URLs; client i uses urls[i % len(urls)]")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--max", type=int, default=2000, help="at most this many downloads in all")
    args = p.parse_args(argv)
    result = asyncio.run(load(args.urls, args.clients, args.seconds, args.max))
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
