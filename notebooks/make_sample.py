"""Regenerate the notebooks' sample export from a real, simulated rollout.

    python notebooks/make_sample.py [--devices 200] [--out notebooks/data/sample.csv] [--seed 7]

Starts an otabox server in this process (a temporary data dir, free ports, a fast scheduler),
creates a product and N devices through the bulk-import API, uploads firmware 2.0.0 and 2.1.0,
and plays two push jobs with the simulator's fleet (`otabox.sim.fleet`, the engine of
`otabox simulate`):

1. 1.0.0 -> 2.0.0 on every device: waves of 10 % (successRatio 0.8) and 100 %, one retry,
   a short timeout so silent devices time out, a mix of every failure kind.
   An operator pauses it once and resumes it (the log's job rows show who).
2. 2.0.0 -> 2.1.0 on the devices job 1 upgraded, with a smaller mix and no waves.
3. 1.0.0 -> 2.1.0 on the devices job 1 left behind, mostly failing: its abort rule trips, the
   pending rest is canceled.

Each job runs until the API reports it finished (a wave below its bar is resumed, as an
operator would). Then `otabox.export.writer` writes OUT and its snapshot files
(`<stem>.jobs|firmware|devices.<ext>`), and the script checks that the counts derived from
the exported events equal the API's counts per job. `main()` returns what it printed as a
dict (tests/test_notebooks.py uses it to make a fresh export).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from otabox import analysis
from otabox.server.app import App
from otabox.cli.client import Client
from otabox.export.writer import export_data_dir, format_of, snapshot_path
from otabox.sim.fleet import Fleet, FleetConfig
from otabox.server.settings import Settings
from otabox.cli.simulate import assign, create_devices, format_summary, parse_mix

DEFAULT_OUT = Path(__file__).resolve().parent / "data" / "sample.csv"
TOKEN = "sample-admin-token"
PRODUCT = "thermo"
START_VERSION = "1.0.0"
MIX_1 = (
    "success=80,download-fail=5,verify-fail=3,flash-fail=2,silent=4,decline=2,wrong-version=2,offline-mid-download=2"
)
MIX_2 = "success=88,download-fail=3,verify-fail=3,flash-fail=2,silent=4"
MIX_3 = "download-fail=70,success=30"  # job 3's abort rule trips on these
OPERATOR_PAUSE_S = 0.5
FIRMWARE = (("2.0.0", 192 * 1024, "md5"), ("2.1.0", 224 * 1024, "sha256"))
TIMEOUT_S = 3.0  # silent devices time out after this; the simulated devices need well under a second
JOB_DEADLINE_S = 180.0  # give up (and fail loudly) when a job has not finished by then
TERMINAL_JOB = {"completed", "canceled", "aborted"}
Say = Callable[[str], None]


class Api:
    """Just enough of the management API, over aiohttp (the server runs in this event loop)."""

    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http, self.base = http, base + "/api/v1"

    async def call(self, method: str, path: str, **kw: Any) -> Any:
        async with self.http.request(method, self.base + path, **kw) as resp:
            data = await resp.json(content_type=None)
            if resp.status >= 400:
                raise RuntimeError(f"{method} {path}: {resp.status} {data}")
            return data

    async def items(self, path: str, **query: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            page = await self.call("GET", path, params={**query, "limit": 1000, "offset": len(out)})
            out += page["items"]
            if not page["items"] or len(out) >= page["total"]:
                return out


def firmware_bytes(size: int, seed: int, version: str) -> bytes:
    return random.Random(f"{seed}/{version}").randbytes(size)


async def upload_firmware(api: Api, version: str, content: bytes, sign_method: str) -> dict[str, Any]:
    form = aiohttp.FormData()
    form.add_field("name", f"main-fw-{version}")
    form.add_field("version", version)
    form.add_field("signMethod", sign_method)
    form.add_field("desc", f"thermostat firmware {version}")
    form.add_field("file", content, filename=f"thermo-{version}.bin", content_type="application/octet-stream")
    fw: dict[str, Any] = await api.call("POST", f"/products/{PRODUCT}/firmware", data=form)
    return fw


async def wait_online(api: Api, n: int, version: str) -> None:
    """Until the server sees all `n` devices online on `version` (they logged in and reported it)."""
    deadline = time.monotonic() + 60
    while True:
        page = await api.call(
            "GET", f"/products/{PRODUCT}/devices", params={"online": "true", "version": version, "limit": 1}
        )
        if page["total"] >= n:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {page['total']} of {n} devices came online on {version}")
        await asyncio.sleep(0.1)


async def wait_finished(api: Api, job_id: str, say: Say, operator_pause: bool = False) -> dict[str, Any]:
    """Poll the job until it is completed, canceled or aborted; resume it when a wave misses its bar.

    With `operator_pause`, pause it once while it runs and resume it a moment later, as an operator
    looking at something would: the log then has the operator's rows for the notebooks to show.
    """
    deadline = time.monotonic() + JOB_DEADLINE_S
    while True:
        job: dict[str, Any] = await api.call("GET", f"/jobs/{job_id}")
        if job["status"] in TERMINAL_JOB:
            return job
        if operator_pause and job["status"] == "running" and job["counts"]["succeeded"] >= 5:
            operator_pause = False
            say(f"  {job_id}: pausing it for a moment, as an operator would")
            await api.call("POST", f"/jobs/{job_id}/pause")
            await asyncio.sleep(OPERATOR_PAUSE_S)
            await api.call("POST", f"/jobs/{job_id}/resume")
        if job["status"] == "paused" and "wave" in (job.get("statusReason") or ""):
            say(f"  {job_id} paused: {job['statusReason']}; resuming it, as an operator would")
            await api.call("POST", f"/jobs/{job_id}/resume")
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} did not finish in {JOB_DEADLINE_S:.0f}s: {job}")
        await asyncio.sleep(0.1)


async def run_job(
    api: Api,
    fleet_config: FleetConfig,
    devices: list[tuple[str, str, str, str]],
    body: dict[str, Any],
    say: Say,
    operator_pause: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Bring the fleet online, create the job, wait for the API to call it finished; return (job, fleet summary)."""
    fleet = Fleet(fleet_config, devices)
    # The fleet ends by itself once every device reached a final outcome, but the server may still
    # have retries due then (a failed device gets the job's retry later) and timeouts to run out.
    # Keep it running until the job itself has finished: one extra "unfinished" count, released by stop().
    fleet.remaining += 1
    run = asyncio.create_task(fleet.run())
    try:
        await wait_online(api, len(devices), devices[0][2])
        job = await api.call("POST", "/jobs", json=body)
        say(f"{job['id']} {body['name']!r}: {job['total']} tasks")
        job = await wait_finished(api, job["id"], say, operator_pause)
    finally:
        fleet.stop("job finished")
        summary = await run
    return job, summary


def job_body(name: str, firmware_id: str, from_version: str, n: int, **extra: Any) -> dict[str, Any]:
    return {
        "firmwareId": firmware_id,
        "type": "upgrade",
        "name": name,
        "scope": {"versionNumbers": [from_version]},
        "policy": "snapshot",
        "mode": "push",
        "maxConcurrency": max(10, n // 4),
        "timeoutSeconds": TIMEOUT_S,
        **extra,
    }


async def rollout(out: Path, n: int, seed: int, data_dir: Path, say: Say) -> dict[str, Any]:
    settings = Settings(
        data_dir=str(data_dir), host="127.0.0.1", http_port=0, mqtt_port=0, scheduler_interval=0.2, log_level="WARNING"
    )
    app = App(settings, env={"OTABOX_ADMIN_TOKEN": TOKEN})
    await app.start()
    try:
        base = f"http://127.0.0.1:{app.http_port}"
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            api = Api(http, base)
            await api.call("POST", "/products", json={"productKey": PRODUCT, "name": "Thermostat"})
            # The same bulk import `otabox simulate` uses (a blocking client, so off the server's loop).
            created = await asyncio.to_thread(
                create_devices, Client(base, TOKEN), PRODUCT, n, "sim-", START_VERSION, {"site": "lab"}
            )
            secrets = {dk: secret for dk, secret, _ in created}
            firmware = [await upload_firmware(api, v, firmware_bytes(size, seed, v), m) for v, size, m in FIRMWARE]
            fleet_config = FleetConfig(
                host="127.0.0.1",
                port=app.mqtt_port,
                product_key=PRODUCT,
                flash_time=(0.05, 0.3),
                reboot_time=(0.05, 0.3),
                seed=seed,
            )
            jobs: list[dict[str, Any]] = []

            # Job 1: every device, 1.0.0 -> 2.0.0, staged.
            behaviours = assign(n, parse_mix(MIX_1), seed)
            devices = [(dk, s, v, b) for (dk, s, v), b in zip(created, behaviours, strict=True)]
            body = job_body(
                f"roll out {firmware[0]['version']}",
                firmware[0]["id"],
                START_VERSION,
                n,
                retry={"count": 1, "intervalSeconds": 0.5},
                abort={"failureRatio": 0.5, "minFinished": 20},
                waves=[{"percent": 10, "successRatio": 0.8}, {"percent": 100}],
            )
            job, summary = await run_job(api, fleet_config, devices, body, say, operator_pause=True)
            jobs.append({"job": job, "mix": MIX_1, "simulator": summary})
            first_job = job

            # Job 2: the devices job 1 upgraded, 2.0.0 -> 2.1.0.
            upgraded = sorted(t["deviceKey"] for t in await api.items(f"/jobs/{job['id']}/tasks", status="succeeded"))
            behaviours = assign(len(upgraded), parse_mix(MIX_2), seed + 1)
            version = firmware[0]["version"]
            devices = [(dk, secrets[dk], version, b) for dk, b in zip(upgraded, behaviours, strict=True)]
            body = job_body(f"roll out {firmware[1]['version']}", firmware[1]["id"], version, len(upgraded))
            job, summary = await run_job(api, fleet_config, devices, body, say)
            jobs.append({"job": job, "mix": MIX_2, "simulator": summary})

            # Job 3: the devices still on 1.0.0 straight to 2.1.0, with a strict abort rule that trips.
            failed = {t["deviceKey"] for t in await api.items(f"/jobs/{first_job['id']}/tasks")}
            behind = sorted(
                d["deviceKey"] for d in await api.items(f"/products/{PRODUCT}/devices", version=START_VERSION)
            )
            behind = [dk for dk in behind if dk in failed]
            if behind:
                behaviours = assign(len(behind), parse_mix(MIX_3), seed + 2)
                devices = [(dk, secrets[dk], START_VERSION, b) for dk, b in zip(behind, behaviours, strict=True)]
                body = job_body(
                    f"stragglers to {firmware[1]['version']}",
                    firmware[1]["id"],
                    START_VERSION,
                    len(behind),
                    maxConcurrency=3,
                    abort={"failureRatio": 0.3, "minFinished": 4},
                )
                job, summary = await run_job(api, fleet_config, devices, body, say)
                jobs.append({"job": job, "mix": MIX_3, "simulator": summary})
            # What the API says at the end, right before the export: the numbers the notebooks must show.
            final = {j["id"]: j for j in await api.items("/jobs")}
            for entry in jobs:
                entry["job"] = final[entry["job"]["id"]]

        files = await export_data_dir(app.data_dir, out, format_of(out, None), None, None, None)
    finally:
        await app.stop()
    return {"export": str(out), "rows": files, "seed": seed, "devices": n, "jobs": jobs}


def check_export(result: dict[str, Any]) -> None:
    """The counts derived from the exported events must equal the API's counts per job."""
    events = analysis.load(result["export"]).events
    for entry in result["jobs"]:
        job = entry["job"]
        derived = analysis.status_counts(events, job["id"]).iloc[0]
        got = {s: int(derived[s]) for s in analysis.TASK_STATUSES}
        if got != job["counts"] or int(derived["tasks"]) != job["total"]:
            raise RuntimeError(f"export of {job['id']} does not match the API: events say {got}, API {job['counts']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the rollout, write the export, print a summary; return the summary as a dict."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=200, help="simulated devices [200]")
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="events file, .csv or .jsonl [notebooks/data/sample.csv]"
    )
    p.add_argument("--seed", type=int, default=7, help="seed for behaviours, timings and firmware bytes [7]")
    p.add_argument("--data-dir", type=Path, help="keep the server's data in this new or empty folder [a temporary dir]")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    args = p.parse_args(argv)
    if args.devices < 20:
        p.error("--devices must be at least 20 (waves of 10 % need a few devices each)")

    def say(text: str) -> None:
        if not args.quiet:
            print(text, flush=True)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="otabox-sample-") as tmp:
        data_dir = args.data_dir.resolve() if args.data_dir else Path(tmp) / "data"
        result = asyncio.run(rollout(out, args.devices, args.seed, data_dir, say))
    check_export(result)
    result["elapsedSeconds"] = round(time.monotonic() - started, 1)
    for entry in result["jobs"]:
        job = entry["job"]
        counts = " ".join(f"{s}={c}" for s, c in job["counts"].items() if c)
        say(f"\n{job['id']} {job['name']!r} {job['status']}: total={job['total']} {counts}")
        say(f"  mix {entry['mix']}")
        say("  " + format_summary(entry["simulator"]).replace("\n", "\n  "))
    files = {"events": out, **{t: snapshot_path(out, t) for t in ("jobs", "firmware", "devices")}}
    say("\nwrote " + ", ".join(f"{f} ({result['rows'][t]} rows)" for t, f in files.items()))
    say(f"in {result['elapsedSeconds']}s; the API counts above equal the counts derived from the exported events")
    return result


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as exc:
        print(f"make_sample: {exc}", file=sys.stderr)
        sys.exit(1)
