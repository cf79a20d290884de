"""The figures of otabox: a fresh server loaded with simulated devices, one measurement per phase.

`bench_otabox` starts otabox, creates the products, devices and firmware through the management
API (`Api`), then runs the connect storm and informs, the RSS with N connected, the push fan-out
of one job, the progress reports, the rollout of `otabox.sim.fleet` devices, the download
throughput and the MQTT round trips (idle and during downloads), and stops the server. Each
figure fills its row of the run (bench/harness.py); bench/references.py measures the same work
on mosquitto and nginx.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import secrets
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench import clients
from bench.clients import Dev
from bench.harness import MB, PK, RTT_PK, TARGETS, Monitor, Run, log, repeated_storm, set_rtt, split_storm
from bench.servers import StartError, start_otabox
from otabox import protocol

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

    async def get_text(self, path: str) -> str:
        """A page at the server's root (e.g. /ca.pem), as text."""
        async with self.http.get(self.base + path, timeout=aiohttp.ClientTimeout(total=30)) as resp:
            if resp.status != 200:
                raise RuntimeError(f"GET {path}: HTTP {resp.status}")
            return await resp.text()

    async def healthz(self) -> dict[str, Any]:
        async with self.http.get(self.base + "/healthz", timeout=aiohttp.ClientTimeout(total=30)) as resp:
            data: dict[str, Any] = await resp.json()
            return data

    async def metrics(self) -> bytes:
        async with self.http.get(
            self.base + "/metrics", headers=self.headers, timeout=aiohttp.ClientTimeout(total=60)
        ) as resp:
            if resp.status != 200:
                raise RuntimeError(f"GET /metrics: HTTP {resp.status}")
            return await resp.read()

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
    tls_figures = only & {"tls", "mtls"}
    try:
        proc, http_port, mqtt_port = start_otabox(run.work, token, run.args.server_log_level, tls=bool(tls_figures))
    except StartError as exc:
        if not tls_figures or "--tls-self-signed" not in str(exc):
            raise
        # An otabox from before its TLS listener (benchmarking an older commit): the rest still runs.
        log("  this otabox has no --tls-self-signed: the TLS figures are skipped")
        run.detail("tls", skipped="the server has no --tls-self-signed")
        only -= tls_figures
        tls_figures = set()
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
            plain_peak = max(proc.hwm(), mon.peak)
            if tls_figures:
                await otabox_tls(run, api, mon, devs, host, proc.ports["mqtts"], ts)
            if "rollout" in only:
                await otabox_rollout(run, api, mon, keys, secret, host, mqtt_port, fw_roll)
            if only & {"download", "rtt"}:
                await otabox_downloads(run, api, mon, rtt_dev, keys)
            rtt_dev.client.close()
            peak = max(proc.hwm(), mon.peak)
            run.detail("otabox", peakRssMB=round(peak / MB, 1), phases=mon.phases)
            if "rss" in only:
                row = run.row("rss_peak", "server peak RSS over the run", "MB", "lower", TARGETS["rss"])
                row.otabox = round(peak / MB, 1)
                tls_peak = run.details.get("tls", {}).get("peakRssMB")
                if tls_figures and tls_peak and tls_peak * MB >= plain_peak:
                    row.note = (
                        f"the TLS storms' {tls_peak:.0f} MB included; before them {plain_peak / MB:.0f} MB"
                        " (rollout and downloads come after)"
                    )
    finally:
        await mon.stop()
        log("stopping otabox")
        proc.stop()


async def metrics_scrape(run: Run, api: Api, connected: int, repeats: int = 10) -> None:
    """The cost of a Prometheus scrape with every device connected, against /healthz (same server,
    same moment): the median of `repeats` of each, one after the other."""
    scrapes, healths = [], []
    size = 0
    for _ in range(repeats):
        t = time.perf_counter()
        size = len(await api.metrics())
        scrapes.append(time.perf_counter() - t)
        t = time.perf_counter()
        await api.healthz()
        healths.append(time.perf_counter() - t)
    scrape, health = statistics.median(scrapes), statistics.median(healths)
    run.detail("metrics", scrapeMs=round(scrape * 1000, 2), healthzMs=round(health * 1000, 2), bytes=size)
    ms, health_ms = scrape * 1000, health * 1000
    log(f"  GET /metrics, {connected} connected: {ms:.1f} ms ({size} bytes); /healthz {health_ms:.1f} ms")
    row = run.row("metrics", f"GET /metrics, {connected} connected", "ms", "lower")
    row.otabox = round(scrape * 1000, 2)
    row.note = f"/healthz on the same server: {health * 1000:.2f} ms ({scrape / health:.1f}x)"


def make_file(path: Path, size: int) -> Path:
    with open(path, "wb") as fh:
        left = size
        while left:
            chunk = os.urandom(min(left, MB))
            fh.write(chunk)
            left -= len(chunk)
    return path


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
        await metrics_scrape(run, api, len(live))

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
                # Steps 10, 20, ... (100 from the tenth on: --progress-reports may ask for more).
                lambda d, i: (
                    protocol.PROGRESS,
                    "ota.device.progress",
                    {"step": str(min(100, 10 + 10 * i)), "desc": "bench"},
                ),
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


async def otabox_tls(run: Run, api: Api, mon: Monitor, devs: list[Dev], host: str, port: int, ts: str) -> None:
    """The connect storm again over TLS (the CA pinned from /ca.pem), and with `mtls` once more with a
    device certificate each (issued through the API first); each against the plain storm of this run.

    The devices connect from `--tls-clients` helper processes (bench.stormclient): a client's
    handshake costs more CPU than the server's, so one harness loop would be what is measured."""
    plan, n = run.plan, len(devs)
    ca_pem = (await api.get_text("/ca.pem")).strip()
    spec = {"host": host, "port": port, "pk": PK, "ts": ts, "ca": ca_pem, "concurrency": plan.connect_concurrency}
    spec["timeout"] = run.bound(plan.t_storm)
    plain = run.rows.get("storm")
    plain_s = plain.otabox if plain is not None else None
    plain_rss = run.details.get("rss", {}).get("connectedRssMB")
    settle = lambda: wait_connected(api, 0, 60)  # noqa: E731
    peak = 0.0

    async def storms(rows: list[tuple[str, str, str | None, str | None]], key: str, label: str, phase: str) -> None:
        nonlocal peak
        procs = await clients.StormProcesses.start(run.args.tls_clients, rows, spec)
        try:
            await settle()
            st = await split_storm(run, mon, procs, settle, phase)
            rss = mon.proc.rss()
            peak = max(peak, st["phase"]["serverRssPeakMB"], rss / MB)
            detail = "stormTls" if key == "storm_tls" else "stormMtls"
            run.detail(detail, **st, clientContextSeconds=procs.context_seconds, connectedRssMB=round(rss / MB, 1))
            _ratio_row(run, key, f"connect storm over {label}, {len(rows)} devices", "s", st, plain_s)
            if st["complete"]:
                r = run.row(f"rss_{key}", f"server RSS, {st['connected']} connected over {label}", "MB", "lower")
                r.otabox, r.reference, r.ref_name = round(rss / MB, 1), plain_rss, "plain TCP, same run"
            await procs.disconnect()
        finally:
            await procs.close()

    if "tls" in run.only:
        log(f"storm over TLS: {n} devices from {run.args.tls_clients} processes, {plan.storm_repeats} time(s)")
        await storms([(d.key, d.secret, None, None) for d in devs], "storm_tls", "TLS", "storm-tls")

    if "mtls" in run.only:
        log(f"device certificates: issuing {n} through the API, 8 requests in flight")
        async with mon.phase("certificates") as ph:
            t0 = time.monotonic()
            issued = await issue_certificates(api, [d.key for d in devs], 8, run.bound(600))
            issue_s = time.monotonic() - t0
        rate = len(issued) / issue_s if issue_s > 0 else 0.0
        log(f"  {len(issued)}/{n} issued in {issue_s:.1f}s ({rate:.0f}/s)")
        run.detail("certificates", issued=len(issued), seconds=round(issue_s, 2), perSecond=round(rate, 1), phase=ph)
        r = run.row(
            "certificates", "device certificates issued (server makes the key), 8 in flight", "certs/s", "higher"
        )
        r.otabox = round(rate, 1) if len(issued) == n else None
        if len(issued) < n:
            r.note = f"only {len(issued)}/{n} within the time bound"
        rows = [(d.key, d.secret, *issued[d.key]) for d in devs if d.key in issued]
        log(f"storm over two-way TLS: {len(rows)} devices with their certificates")
        await storms(rows, "storm_mtls", "two-way TLS", "storm-mtls")
    run.detail("tls", peakRssMB=round(peak, 1))
    await settle()


def _ratio_row(run: Run, key: str, name: str, unit: str, st: dict[str, Any], plain: float | None) -> None:
    """The storm's row against the plain storm, and the server's CPU per login against the plain one's
    (what the handshakes cost the server, whatever the load generator managed)."""
    r = run.row(key, name, unit, "lower")
    r.otabox = st["seconds"] if st["complete"] else None
    r.reference, r.ref_name = plain, "plain TCP, same run"
    if not st["complete"]:
        r.note = (
            f"only {st['connected']} connected within the time bound ({st['failures']} failures: {st['firstFailure']})"
        )
    cpu = run.row(key + "_cpu", f"{name.split(',')[0]}: server CPU per login", "ms", "lower")
    cpu.otabox = _cpu_per_login(st)
    cpu.reference, cpu.ref_name = _cpu_per_login(run.details.get("storm", {})), "plain TCP, same run"


def _cpu_per_login(st: dict[str, Any]) -> float | None:
    """Server CPU milliseconds per connected device in a storm's (last) phase."""
    ph, n = st.get("phase"), st.get("connected")
    if not ph or not n:
        return None
    return round(ph["serverCpuPercent"] / 100 * ph["wallSeconds"] * 1000 / n, 3)


async def issue_certificates(api: Api, keys: list[str], concurrency: int, timeout: float) -> dict[str, tuple[str, str]]:
    """POST .../certificates {} for each device, `concurrency` at a time: (certificate, privateKey) by key."""
    out: dict[str, tuple[str, str]] = {}

    async def one(key: str) -> None:
        got = await api.call("POST", f"/products/{PK}/devices/{key}/certificates", json={})
        out[key] = (got["certificate"], got["privateKey"])

    await clients.bounded(clients.pool(keys, one, concurrency), timeout)
    return out


async def otabox_rollout(
    run: Run, api: Api, mon: Monitor, keys: list[str], secret: dict[str, str], host: str, port: int, fw: dict[str, Any]
) -> None:
    from otabox.sim.fleet import Fleet, FleetConfig

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
    log(f"rollout: {n} simulated devices (otabox.sim.fleet) connecting")
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
