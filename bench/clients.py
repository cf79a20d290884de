"""Load-generator side of the benchmark: lightweight MQTT devices, worker pools, HTTP download load.

Everything here runs in the harness's one event loop; the servers under test run in their own
processes. Devices are `otabox.device.mqtt` connections (the simulator's client) sending exactly
the CONNECT a real EnOS device sends, whether the broker is otabox or mosquitto.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from otabox import protocol
from otabox.device.mqtt import MQTTLiteClient, MQTTLiteError

UPGRADE_SUFFIX = "/" + protocol.UPGRADE
REPO = Path(__file__).resolve().parent.parent


class Dev:
    """One benchmark device: an mqttlite connection that records pushes and awaits replies."""

    __slots__ = ("client", "connected_at", "ids", "key", "pushed_at", "secret", "tls", "waiter")

    def __init__(self, key: str, secret: str) -> None:
        self.key = key
        self.secret = secret
        self.tls: ssl.SSLContext | None = None  # its own TLS context (a device certificate), if it has one
        self.client = MQTTLiteClient(self.on_message)
        self.connected_at = 0.0
        self.pushed_at = 0.0  # monotonic time of the first message on its own upgrade topic
        self.ids = 0
        self.waiter: tuple[str, str, asyncio.Future[dict[str, Any]]] | None = None  # (reply suffix, id, future)

    def on_message(self, topic: str, payload: bytes) -> None:
        if topic.endswith(UPGRADE_SUFFIX):
            if not self.pushed_at:
                self.pushed_at = time.monotonic()
            return
        w = self.waiter
        if w is not None and topic.endswith(w[0]) and not w[2].done():
            try:
                data = json.loads(payload)
            except ValueError:
                return
            if isinstance(data, dict) and str(data.get("id")) == w[1]:
                w[2].set_result(data)

    async def connect(
        self, host: str, port: int, pk: str, ts: str, timeout: float = 30.0, tls: ssl.SSLContext | None = None
    ) -> None:
        """Log in as an EnOS device (secure mode 2, hmacsha256), over TLS with `tls` (or its own
        context when it has one); raises on refusal or failure."""
        password = protocol.sign(protocol.login_params(self.key, pk, ts), self.secret, "hmacsha256")
        await self.client.connect(
            host,
            port,
            protocol.client_id_for(self.key, "hmacsha256", ts),
            f"{self.key}&{pk}",
            password,
            keepalive=300,
            timeout=timeout,
            tls=self.tls or tls,
        )
        self.connected_at = time.monotonic()

    async def call(
        self, pk: str, suffix: str, method: str, params: dict[str, Any], timeout: float = 60.0
    ) -> dict[str, Any] | None:
        """Publish a request (QoS 1) and wait for its reply on suffix + `_reply`; None when none came."""
        self.ids += 1
        msg_id = str(self.ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiter = (suffix + "_reply", msg_id, fut)
        try:
            await self.client.publish(
                protocol.topic_for(pk, self.key, suffix), protocol.request(msg_id, method, params), 1
            )
            async with asyncio.timeout(timeout):
                return await fut
        except (MQTTLiteError, TimeoutError):
            return None
        finally:
            self.waiter = None


async def pool(items: Iterable[Any], worker: Callable[[Any], Awaitable[None]], concurrency: int) -> None:
    """Run `worker(item)` for every item with at most `concurrency` in flight (no task per item)."""
    it = iter(items)

    async def run() -> None:
        for item in it:
            await worker(item)

    await asyncio.gather(*(run() for _ in range(max(1, concurrency))))


async def bounded(aw: Awaitable[Any], timeout: float) -> bool:
    """Await with a deadline; False when it ran out (the work is cancelled)."""
    try:
        async with asyncio.timeout(timeout):
            await aw
        return True
    except TimeoutError:
        return False


async def storm(
    devs: Sequence[Dev],
    host: str,
    port: int,
    pk: str,
    ts: str,
    concurrency: int,
    timeout: float,
    tls: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    """Connect every device, `concurrency` logins in flight; time from the first connect to the last CONNACK.

    With `tls` (or a device's own context) each login is a full TLS handshake first: no session
    resumption, as a fleet that lost its server (or a freshly started one) would connect."""
    failures: list[str] = []

    async def one(dev: Dev) -> None:
        try:
            await dev.connect(host, port, pk, ts, tls=tls)
        except (OSError, TimeoutError, MQTTLiteError) as exc:
            failures.append(f"{type(exc).__name__}: {exc}")

    t0 = time.monotonic()
    complete = await bounded(pool(devs, one, concurrency), timeout)
    done = [d.connected_at for d in devs if d.client.connected]
    last = max(done) if done else time.monotonic()
    return {
        "connected": len(done),
        "failures": len(failures),
        "firstFailure": failures[0] if failures else None,
        "seconds": round(last - t0, 3),
        "complete": complete and len(done) == len(devs),
    }


async def calls(
    devs: Sequence[Dev],
    make: Callable[[Dev, int], tuple[str, str, dict[str, Any]]],
    pk: str,
    per_device: int,
    concurrency: int,
    timeout: float,
) -> dict[str, Any]:
    """Each device sends `per_device` requests in turn, each after the previous one's reply; count the replies."""
    codes: dict[str, int] = {}
    ok = 0
    last = 0.0

    async def one(dev: Dev) -> None:
        nonlocal ok, last
        for i in range(per_device):
            suffix, method, params = make(dev, i)
            reply = await dev.call(pk, suffix, method, params)
            code = str(reply.get("code")) if reply is not None else "none"
            codes[code] = codes.get(code, 0) + 1
            if code == "200":
                ok += 1
                last = time.monotonic()
            elif reply is None:
                return  # this device's connection is in trouble: stop loading it

    t0 = time.monotonic()
    complete = await bounded(pool(devs, one, concurrency), timeout)
    elapsed = (last or time.monotonic()) - t0
    return {
        "sent": sum(codes.values()),
        "ok": ok,
        "codes": codes,
        "seconds": round(elapsed, 3),
        "perSecond": round(ok / elapsed, 1) if elapsed > 0 else None,
        "complete": complete and ok == len(devs) * per_device,
    }


async def disconnect_all(devs: Iterable[Dev]) -> None:
    async def one(dev: Dev) -> None:
        try:
            await dev.client.disconnect()
        except (OSError, MQTTLiteError):
            dev.client.close()

    await bounded(pool(devs, one, 1000), 60)
    for dev in devs:
        dev.client.close()


async def wait_pushes(devs: Sequence[Dev], t0: float, timeout: float) -> dict[str, Any]:
    """Wait until every device got a message on its upgrade topic; notified count and rate since t0."""
    deadline = t0 + timeout
    # Polling is fine here: each device stamps its own arrival time, the poll only decides when to stop.
    while time.monotonic() < deadline and any(not d.pushed_at for d in devs):  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    got = [d.pushed_at for d in devs if d.pushed_at]
    last = max(got) if got else time.monotonic()
    elapsed = last - t0
    got.sort()
    return {
        "notified": len(got),
        "of": len(devs),
        "seconds": round(elapsed, 3),
        "perSecond": round(len(got) / elapsed, 1) if elapsed > 0 else None,
        "firstAfter": round(got[0] - t0, 3) if got else None,
        "medianAfter": round(got[len(got) // 2] - t0, 3) if got else None,
        "complete": len(got) == len(devs),
    }


# ---------------------------------------------------------------- round trips


def percentile(values: Sequence[float], pct: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(pct / 100 * (len(s) - 1))))]


class RoundTrips:
    """Times request -> reply of one MQTT client: `sample()` returns seconds, or None when lost."""

    def __init__(self, sample: Callable[[], Awaitable[float | None]]) -> None:
        self.sample = sample

    async def run(
        self,
        count: int | None = None,
        until: asyncio.Future[Any] | None = None,
        gap: float = 0.005,
        max_seconds: float = 300.0,
    ) -> dict[str, Any]:
        """`count` samples, or as many as fit until `until` is done; never longer than `max_seconds`."""
        rtts: list[float] = []
        lost = 0
        end = time.monotonic() + max_seconds
        while (
            (count is None or len(rtts) + lost < count)
            and (until is None or not until.done())
            and time.monotonic() < end
        ):
            rtt = await self.sample()
            if rtt is None:
                lost += 1
            else:
                rtts.append(rtt)
            await asyncio.sleep(gap)
        return {
            "samples": len(rtts),
            "lost": lost,
            "p50ms": round(1000 * (percentile(rtts, 50) or 0), 2) if rtts else None,
            "p99ms": round(1000 * (percentile(rtts, 99) or 0), 2) if rtts else None,
            "maxms": round(1000 * max(rtts), 2) if rtts else None,
        }


def otabox_rtt(dev: Dev, pk: str) -> RoundTrips:
    """getversion -> getversion_reply through otabox (a store read and a reply on the device's topic)."""

    async def sample() -> float | None:
        t = time.perf_counter()
        reply = await dev.call(pk, protocol.GETVERSION, "ota.device.getversion", {}, timeout=10)
        return time.perf_counter() - t if reply is not None else None

    return RoundTrips(sample)


async def echo_rtt(host: str, port: int, topic: str) -> tuple[MQTTLiteClient, RoundTrips]:
    """A client subscribed to `topic` publishing to it (QoS 1): a plain broker's round trip."""
    arrived: list[asyncio.Future[None]] = []

    def on_message(_topic: str, _payload: bytes) -> None:
        if arrived and not arrived[0].done():
            arrived[0].set_result(None)

    client = MQTTLiteClient(on_message)
    await client.connect(host, port, "bench-echo", keepalive=300)
    await client.subscribe(topic, 1)
    payload = protocol.request("1", "ota.device.getversion", {})

    async def sample() -> float | None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        arrived[:] = [fut]
        t = time.perf_counter()
        try:
            await client.publish(topic, payload, 1)
            async with asyncio.timeout(10):
                await fut
        except (MQTTLiteError, TimeoutError):
            return None
        return time.perf_counter() - t

    return client, RoundTrips(sample)


# ---------------------------------------------------------------- downloads


async def download_load(
    urls: Sequence[str], clients: int, seconds: float, max_count: int, timeout: float
) -> dict[str, Any]:
    """`clients` concurrent downloaders (bench.dlclient, its own process) fetching whole files in a loop
    until `seconds` or `max_count`; downloads started before the deadline run to their end."""
    argv = [sys.executable, "-m", "bench.dlclient", *urls, "--clients", str(clients)]
    argv += ["--seconds", str(seconds), "--max", str(max_count)]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(REPO)
    )
    try:
        async with asyncio.timeout(seconds + timeout):
            out, err = await proc.communicate()
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"download client failed ({proc.returncode}): {err.decode(errors='replace')[-500:]}")
    result: dict[str, Any] = json.loads(out)
    result["complete"] = result["errors"] == 0
    return result


async def count_lines(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> int:
    """Lines of a streamed response (the JSONL upgrade log)."""
    n = 0
    async with http.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=300)) as resp:
        resp.raise_for_status()
        async for chunk in resp.content.iter_chunked(1 << 16):
            n += chunk.count(b"\n")
    return n


# ---------------------------------------------------------------- plain-broker workloads (the mosquitto reference)


async def subscribe_own(devs: Sequence[Dev], pk: str, concurrency: int, timeout: float) -> bool:
    """Each device subscribes (QoS 1) to its own upgrade topic, as a plain broker needs."""

    async def one(dev: Dev) -> None:
        try:
            await dev.client.subscribe(protocol.topic_for(pk, dev.key, protocol.UPGRADE), 1)
        except MQTTLiteError:
            pass

    return await bounded(pool(devs, one, concurrency), timeout)


async def publish_each(
    host: str, port: int, devs: Sequence[Dev], pk: str, payload: bytes, concurrency: int, timeout: float
) -> dict[str, Any]:
    """One publisher sends one QoS 1 message to each device's own upgrade topic; wait for every delivery."""
    pub = MQTTLiteClient()
    await pub.connect(host, port, "bench-publisher", keepalive=300)
    try:

        async def one(dev: Dev) -> None:
            try:
                await pub.publish(protocol.topic_for(pk, dev.key, protocol.UPGRADE), payload, 1)
            except MQTTLiteError:
                pass

        t0 = time.monotonic()
        sending = asyncio.ensure_future(pool(devs, one, concurrency))
        result = await wait_pushes(devs, t0, timeout)
        await bounded(sending, 10)
        return result
    finally:
        pub.close()


async def publish_progress(
    host: str, port: int, devs: Sequence[Dev], pk: str, per_device: int, concurrency: int, timeout: float
) -> dict[str, Any]:
    """Devices publish `per_device` QoS 1 progress reports each (one after the other's PUBACK); one
    subscriber (the would-be backend, QoS 0) counts what the broker routes to it."""
    want = len(devs) * per_device
    got = 0
    last = 0.0
    all_in = asyncio.get_running_loop().create_future()

    def on_message(_topic: str, _payload: bytes) -> None:
        nonlocal got, last
        got += 1
        last = time.monotonic()
        if got >= want and not all_in.done():
            all_in.set_result(None)

    collector = MQTTLiteClient(on_message)
    await collector.connect(host, port, "bench-collector", keepalive=300)
    await collector.subscribe(f"/sys/{pk}/+/{protocol.PROGRESS}", 0)
    try:

        async def one(dev: Dev) -> None:
            topic = protocol.topic_for(pk, dev.key, protocol.PROGRESS)
            for i in range(per_device):
                body = protocol.request(str(i + 1), "ota.device.progress", {"step": str(10 * (i + 1)), "desc": "bench"})
                try:
                    await dev.client.publish(topic, body, 1)
                except MQTTLiteError:
                    return

        t0 = time.monotonic()
        complete = await bounded(pool(devs, one, concurrency), timeout)
        complete = complete and await bounded(all_in, max(1.0, timeout - (time.monotonic() - t0)))
        elapsed = (last or time.monotonic()) - t0
        return {
            "sent": want,
            "ok": got,
            "seconds": round(elapsed, 3),
            "perSecond": round(got / elapsed, 1) if elapsed > 0 else None,
            "complete": complete,
        }
    finally:
        collector.close()


# ---------------------------------------------------------------- TLS storms in helper processes


class StormProcesses:
    """The devices of a TLS storm split over `bench.stormclient` processes, each connecting its share.

    `storm()` connects them all at once (one `go` to every process) and times the first connect
    to the last CONNACK across processes; the devices stay connected until `disconnect()`.
    """

    def __init__(self, procs: list[asyncio.subprocess.Process]) -> None:
        self.procs = procs
        self.context_seconds = 0.0

    @classmethod
    async def start(
        cls,
        processes: int,
        devices: Sequence[tuple[str, str, str | None, str | None]],
        spec: dict[str, Any],
        timeout: float = 300.0,
    ) -> StormProcesses:
        """`devices`: (key, secret, certificate PEM or None, private key PEM or None); `spec`: host, port,
        pk, ts, ca (None: plain MQTT), concurrency (split between the processes), timeout; `ports`
        instead of `port` sends process i to ports[i % len(ports)] (one node each). Returns once
        all are ready."""
        k = max(1, min(processes, len(devices)))
        procs = []
        try:
            for i in range(k):
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "bench.stormclient",
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=str(REPO),
                )  # fmt: skip
                procs.append(proc)
                share = dict(spec, devices=[list(d) for d in devices[i::k]])
                if "ports" in spec:
                    share["port"] = spec["ports"][i % len(spec["ports"])]
                share["concurrency"] = max(1, spec["concurrency"] // k)
                assert proc.stdin is not None
                proc.stdin.write(json.dumps(share).encode() + b"\n")
            self = cls(procs)
            async with asyncio.timeout(timeout):
                ready = await asyncio.gather(*(self._answer(p) for p in procs))
            self.context_seconds = max(r["contextSeconds"] for r in ready)
            return self
        except BaseException:
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
            raise

    @staticmethod
    async def _answer(proc: asyncio.subprocess.Process) -> dict[str, Any]:
        assert proc.stdout is not None
        line = await proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench.stormclient {proc.pid} ended ({await proc.wait()})")
        data: dict[str, Any] = json.loads(line)
        return data

    async def _all(self, command: bytes, timeout: float) -> list[dict[str, Any]]:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(command + b"\n")
        async with asyncio.timeout(timeout):
            return await asyncio.gather(*(self._answer(p) for p in self.procs))

    async def storm(self, timeout: float) -> dict[str, Any]:
        """Like `storm` above (connected, failures, seconds, complete), plus the processes' CPU seconds."""
        parts = await self._all(b"go", timeout + 30)
        t0, last = min(p["first"] for p in parts), max(p["last"] for p in parts)
        return {
            "connected": sum(p["connected"] for p in parts),
            "failures": sum(p["failures"] for p in parts),
            "firstFailure": next((p["firstFailure"] for p in parts if p["firstFailure"]), None),
            "seconds": round(last - t0, 3),
            "complete": all(p["complete"] for p in parts),
            "processes": len(parts),
            "clientCpuSeconds": round(sum(p["cpuSeconds"] for p in parts), 2),
            "tlsVersion": next((p["tlsVersion"] for p in parts if p["tlsVersion"]), None),
        }

    async def inform(self, version: str, timeout: float) -> dict[str, Any]:
        """Every connected device reports `version` (see `calls`), over all the processes."""
        return self._span(await self._all(f"inform {version}".encode(), timeout + 30))

    async def pushes(self, timeout: float) -> dict[str, Any]:
        """Wait until every connected device has had a push (see `wait_pushes`): notified, of, seconds."""
        parts = await self._all(f"pushes {timeout}".encode(), timeout + 30)
        notified = sum(p["notified"] for p in parts)
        seconds = max(p["last"] for p in parts) - min(p["first"] for p in parts)
        return {
            "notified": notified,
            "of": sum(p["of"] for p in parts),
            "seconds": round(seconds, 3),
            "perSecond": round(notified / seconds, 1) if seconds > 0 else None,
            "complete": all(p["complete"] for p in parts),
        }

    async def progress(self, per_device: int, timeout: float) -> dict[str, Any]:
        """Every pushed device sends `per_device` progress reports, each after the previous reply."""
        return self._span(await self._all(f"progress {per_device}".encode(), timeout + 30))

    @staticmethod
    def _span(parts: list[dict[str, Any]]) -> dict[str, Any]:
        """The processes' `calls` results as one: from the first request sent to the last reply."""
        ok = sum(p["ok"] for p in parts)
        seconds = max(p["last"] for p in parts) - min(p["first"] for p in parts)
        codes: dict[str, int] = {}
        for p in parts:
            for code, n in p["codes"].items():
                codes[code] = codes.get(code, 0) + n
        return {
            "devices": sum(p["devices"] for p in parts),
            "sent": sum(p["sent"] for p in parts),
            "ok": ok,
            "codes": codes,
            "seconds": round(seconds, 3),
            "perSecond": round(ok / seconds, 1) if seconds > 0 else None,
            "complete": all(p["complete"] for p in parts),
            "clientCpuSeconds": round(sum(p["cpuSeconds"] for p in parts), 2),
        }

    async def disconnect(self) -> None:
        await self._all(b"disconnect", 90)

    async def close(self) -> None:
        for proc in self.procs:
            if proc.returncode is None and proc.stdin is not None:
                proc.stdin.write(b"quit\n")
                proc.stdin.close()
        for proc in self.procs:
            try:
                async with asyncio.timeout(30):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
