"""The reference runs: the same work as otabox's figures, done by mosquitto (broker) and nginx (downloads).

`bench_references` installs mosquitto and nginx if needed (Debian packages), runs each as a child
process on a free loopback port and fills the `reference` side of the rows otabox filled: the
connect storm, RSS, one QoS 1 message to each device's own topic, progress reports routed to
one subscriber, MQTT round trips, and nginx serving otabox's stored download file to the same
download load (with the round trips measured on mosquitto meanwhile).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path
from typing import Any

from bench import clients
from bench.clients import Dev
from bench.harness import MB, PK, RTT_PK, Monitor, Run, log, repeated_storm, set_rtt
from bench.servers import Proc, ensure_debian, start_mosquitto, start_nginx
from otabox import protocol


async def bench_references(run: Run) -> None:
    run.reserve = 0.0
    only = run.only
    want_mosq = bool(only & {"storm", "rss", "push", "progress", "rtt"})
    want_nginx = bool(only & {"download", "rtt"}) and "downloadFile" in run.details
    found = ensure_debian({"mosquitto": "mosquitto", "nginx": "nginx"} if want_nginx else {"mosquitto": "mosquitto"})
    mosq_bin, nginx_bin = found.get("mosquitto"), found.get("nginx")
    mosq: Proc | None = None
    nginx: Proc | None = None
    try:
        if want_mosq and mosq_bin:
            mosq, mport = start_mosquitto(mosq_bin, run.work)
            run.procs.append(mosq)
            await mosquitto_devices(run, mosq, mport)
        elif want_mosq:
            log("mosquitto not available: broker references skipped")
        if want_nginx and nginx_bin:
            dl_path = Path(run.details["downloadFile"]["path"])
            nginx, nport = start_nginx(nginx_bin, run.work, dl_path.parent.parent)
            run.procs.append(nginx)
            url = f"http://127.0.0.1:{nport}/fw/{dl_path.parent.name}/{dl_path.name}"
            await nginx_downloads(run, nginx, url, mosq, mport if mosq else 0)
        elif want_nginx:
            log("nginx not available: download reference skipped")
    finally:
        for p in (nginx, mosq):
            if p is not None:
                p.stop()


async def mosquitto_devices(run: Run, proc: Proc, port: int) -> None:
    plan, only, n = run.plan, run.only, run.plan.devices
    host = "127.0.0.1"
    ts = str(int(time.time() * 1000))
    mon = Monitor(proc)
    mon.start()
    try:
        if only & {"storm", "rss", "push", "progress"}:
            width = max(5, len(str(n)))
            # The same CONNECT packets as for otabox (mosquitto accepts them anonymously).
            devs = [Dev(f"dev-{i:0{width}d}", secrets.token_hex(16)) for i in range(1, n + 1)]
            log(f"mosquitto storm: {n} devices, {plan.storm_repeats} time(s)")
            st = await repeated_storm(run, mon, devs, host, port, ts, lambda: asyncio.sleep(1))
            run.detail("mosquittoStorm", **st)
            if st["complete"]:
                run.row("storm", "", "", "lower").reference = st["seconds"]
                run.rows["storm"].ref_name = "mosquitto"
            live = [d for d in devs if d.client.connected]
            if "rss" in only:
                r = run.row("rss", "", "MB", "lower")
                r.reference, r.ref_name = round(proc.rss() / MB, 1), "mosquitto"
            if only & {"push", "progress"}:
                await clients.subscribe_own(live, PK, plan.connect_concurrency, run.bound(plan.t_storm))
                offer = protocol.request("1", "ota.device.upgrade", _sample_offer())
                log(f"mosquitto fan-out: one QoS 1 message to each of {len(live)} own topics")
                async with mon.phase("own-topic") as ph:
                    fan = await clients.publish_each(
                        host, port, live, PK, offer, plan.connect_concurrency, run.bound(plan.t_push)
                    )
                run.detail("mosquittoOwnTopic", **fan, phase=ph)
                log(f"  {fan['notified']}/{len(live)} delivered in {fan['seconds']:.2f}s ({fan['perSecond']}/s)")
                if fan["complete"]:
                    r = run.row("own_topic", "", "msg/s", "higher")
                    r.reference, r.ref_name = fan["perSecond"], "mosquitto"
            if "progress" in only:
                k = plan.progress_reports
                log(f"mosquitto progress: {len(live)} devices x {k} QoS 1 reports to one subscriber")
                async with mon.phase("progress") as ph:
                    pr = await clients.publish_progress(
                        host, port, live, PK, k, plan.connect_concurrency, run.bound(plan.t_progress)
                    )
                run.detail("mosquittoProgress", **pr, phase=ph)
                log(f"  {pr['ok']}/{pr['sent']} routed in {pr['seconds']:.2f}s ({pr['perSecond']}/s)")
                if pr["complete"]:
                    r = run.row("progress", "", "msg/s", "higher")
                    r.reference, r.ref_name = pr["perSecond"], "mosquitto"
            await clients.disconnect_all(devs)
        if "rtt" in only:
            echo, rtt = await clients.echo_rtt(
                host, port, protocol.topic_for(RTT_PK, "rtt-1", protocol.GETVERSION + "_reply")
            )
            idle = await rtt.run(count=plan.rtt_samples, max_seconds=run.bound(60))
            run.detail("mosquittoRttIdle", **idle)
            set_rtt(run, "idle", idle, "mosquitto")
            echo.close()
        if "rss" in only:
            r = run.row("rss_peak", "", "MB", "lower")
            r.reference, r.ref_name = round(max(proc.hwm(), mon.peak) / MB, 1), "mosquitto"
        run.detail("mosquitto", peakRssMB=round(max(proc.hwm(), mon.peak) / MB, 1), phases=mon.phases)
    finally:
        await mon.stop()


def _sample_offer() -> dict[str, Any]:
    """An upgrade offer of the size otabox pushes (the fileUrl carries a download token)."""
    return {
        "version": "2.0.0",
        "sign": "0" * 64,
        "signMethod": "sha256",
        "fileUrl": "http://127.0.0.1:8080/firmware/fw-0123456789ab/bench-push-2.0.0-0123456789ab.bin?token="
        + "x" * 160,
        "fileSize": MB,
        "firmwareName": "bench-push",
        "desc": "",
        "jobId": "job-0123456789ab",
    }


async def nginx_downloads(run: Run, proc: Proc, url: str, mosq: Proc | None, mport: int) -> None:
    plan = run.plan
    mon = Monitor(proc)
    mon.start()
    echo = None
    try:
        rtt = None
        if "rtt" in run.only and mosq is not None:
            echo, rtt = await clients.echo_rtt(
                "127.0.0.1", mport, protocol.topic_for(RTT_PK, "rtt-1", "ota/device/echo")
            )
        if "download" in run.only or rtt is not None:
            log(
                f"nginx downloads: {plan.download_clients} clients x {plan.download_mb} MB"
                f" for {plan.download_seconds:.0f}s"
            )
            async with mon.phase("download") as ph:
                dl = asyncio.ensure_future(
                    clients.download_load(
                        [url],
                        plan.download_clients,
                        min(plan.download_seconds, run.bound(60)),
                        plan.download_max,
                        run.bound(120),
                    )
                )
                loaded = await rtt.run(until=dl, gap=0.01) if rtt is not None else None
                result = await dl
            ph["harnessCpuPercent"] += result.get("clientCpuPercent") or 0
            run.detail("nginxDownload", **result, phase=ph)
            log(f"  {result['downloads']} downloads, {result['MBps']} MB/s ({result['errors']} errors)")
            if "download" in run.only:
                r = run.row("download", "", "MB/s", "higher")
                r.reference, r.ref_name = result["MBps"], "nginx"
            if loaded is not None:
                run.detail("mosquittoRttLoaded", **loaded)
                set_rtt(run, "loaded", loaded, "mosquitto+nginx")
    finally:
        if echo is not None:
            echo.close()
        await mon.stop()
        run.detail("nginx", phases=mon.phases)
