"""`python -m bench.delta_rollout`: what deltas save on a real rollout, measured in one run.

A fresh otabox (`python -m otabox serve`, loopback) gets two consecutive releases of a real
binary as versions 1.0.0 and 2.0.0 of one firmware line; N simulated devices (`otabox.sim`, the
`delta` behaviour, a share `delta-broken`) on 1.0.0 are upgraded by a push job, once with
`"delta": "off"` and once with `"delta": "auto"`, each on its own fresh server. Printed per run:
bytes served to the devices (the sum of the tasks' `bytesDownloaded`, as the export shows it),
the ratio auto/off, and for the auto run the delta's size and the server's CPU and wall time to
make it (the `otabox delta make` child's CPU, read from the server's reaped-children counters).

What limits the figures: the saving is the patch's size against the image (the pair decides
it; a broken delta costs its patch and then the full image); bytes are counted by the server
for completed responses. Wall times are on loopback with downloads as fast as the box allows,
so they say nothing about a cellular link; the CPU to make the delta is paid once per pair.

    python -m bench.delta_rollout                  # 1,000 devices, the cryptography wheel pair
    python -m bench.delta_rollout --devices 200 --old a.so --new b.so --broken 0.1 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.servers import free_port, raise_nofile, start_otabox
from otabox.cli.client import Client
from otabox.cli.simulate import assign, create_devices
from otabox.sim.fleet import Fleet, FleetConfig

TOKEN = "bench-delta-token"
PK = "bench"


def _children_cpu(pid: int) -> float:
    """CPU seconds of `pid`'s children that have exited and been waited for (cutime + cstime)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def _pair(args: argparse.Namespace) -> tuple[str, Path, Path]:
    if args.old and args.new:
        return f"{args.old} -> {args.new}", Path(args.old), Path(args.new)
    from bench.delta_algorithms import DEFAULT_CACHE, WHEEL_PAIR, fetch_pair

    pair = fetch_pair(DEFAULT_CACHE, WHEEL_PAIR)
    return pair.label, pair.old, pair.new


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")


def _tasks(client: Client, job_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    while True:
        page = client.get(f"/jobs/{job_id}/tasks", limit=1000, offset=len(items))
        items += page["items"]
        if len(items) >= page["total"] or not page["items"]:
            return items


async def _rollout(client: Client, mqtt: int, fw: dict[str, Any], n: int, broken: float, mode: str) -> dict[str, Any]:
    devices = await asyncio.to_thread(create_devices, client, PK, n, "sim-", "1.0.0")
    mix = {"delta": 1.0 - broken, "delta-broken": broken} if broken > 0 else {"delta": 1.0}
    behaviours = assign(n, mix, seed=1)
    config = FleetConfig(
        host="127.0.0.1",
        port=mqtt,
        product_key=PK,
        flash_time=(0.05, 0.2),
        reboot_time=(0.1, 0.3),
        seed=1,
        duration=600,
    )
    fleet = Fleet(config, [(dk, s, v, b) for (dk, s, v), b in zip(devices, behaviours, strict=True)])
    run = asyncio.create_task(fleet.run())

    def all_on_old() -> bool:
        page = client.get(f"/products/{PK}/devices", limit=1, version="1.0.0")
        return bool(page["total"] >= n)

    await asyncio.to_thread(_wait, all_on_old, 120, "every device reporting 1.0.0")
    started = time.monotonic()
    body = {"firmwareId": fw["id"], "scope": {"versionNumbers": ["1.0.0"]}, "delta": mode}
    job = await asyncio.to_thread(client.post, "/jobs", body)
    summary = await run
    tasks = await asyncio.to_thread(_tasks, client, job["id"])
    return {
        "mode": mode,
        "devices": n,
        "succeeded": sum(t["status"] == "succeeded" for t in tasks),
        "bytesServed": sum(t["bytesDownloaded"] or 0 for t in tasks),
        "seconds": round(time.monotonic() - started, 1),
        "deltasUsed": summary["deltasUsed"],
        "deltaFallbacks": summary["deltaFallbacks"],
    }


def one_run(old: Path, new: Path, n: int, broken: float, mode: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"otabox-delta-{mode}-") as tmp:
        proc, http, mqtt = start_otabox(Path(tmp), TOKEN, log_level="WARNING")
        try:
            client = Client(f"http://127.0.0.1:{http}", TOKEN)
            client.post("/products", {"productKey": PK, "name": PK})
            cpu_before = _children_cpu(proc.pid)
            client.upload_firmware(PK, old, {"name": "main", "version": "1.0.0"})
            fw = client.upload_firmware(PK, new, {"name": "main", "version": "2.0.0"})
            out: dict[str, Any] = {"fullSize": fw["size"]}
            if mode == "auto":
                made = _wait(lambda: _ready(client, fw["id"]), 300, "the delta")
                out |= {
                    "deltaSize": made["fileSize"],
                    "deltaStatus": made["status"],
                    "deltaError": made["error"],
                    "makeSeconds": made["seconds"],
                    "makeCpuSeconds": round(_children_cpu(proc.pid) - cpu_before, 2),
                }
            out |= asyncio.run(_rollout(client, mqtt, fw, n, broken, mode))
            return out
        finally:
            proc.stop()


def _ready(client: Client, firmware_id: str) -> dict[str, Any] | None:
    items = client.get(f"/firmware/{firmware_id}/deltas")["items"]
    return next((d for d in items if d["status"] in ("ready", "failed")), None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.delta_rollout", description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--broken", type=float, default=0.05, help="share of devices whose delta fails [0.05]")
    p.add_argument("--old", help="the older image [the cryptography 46.0.4 wheel's _rust.abi3.so]")
    p.add_argument("--new", help="the newer image [the same of 46.0.5]")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    raise_nofile()
    assert free_port()  # loopback is usable
    label, old, new = _pair(args)
    print(f"pair: {label} ({old.stat().st_size} -> {new.stat().st_size} bytes)", file=sys.stderr)
    runs = [one_run(old, new, args.devices, args.broken, mode) for mode in ("off", "auto")]
    off, auto = runs
    ratio = auto["bytesServed"] / off["bytesServed"] if off["bytesServed"] else float("nan")
    result = {"pair": label, "runs": runs, "bytesRatioAutoToOff": round(ratio, 4)}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    head = ("delta", "devices", "ok", "bytes served", "per device", "used", "fell back", "s")
    print("{:<6} {:>7} {:>5} {:>14} {:>11} {:>5} {:>9} {:>6}".format(*head))
    for r in runs:
        per = r["bytesServed"] / r["devices"] if r["devices"] else 0
        print(
            f"{r['mode']:<6} {r['devices']:>7} {r['succeeded']:>5} {r['bytesServed']:>14,} {per:>11,.0f}"
            f" {r['deltasUsed']:>5} {r['deltaFallbacks']:>9} {r['seconds']:>6}"
        )
    print(f"bytes served, auto / off: {ratio:.3f}")
    print(
        f"delta: {auto.get('deltaSize', 0):,} of {auto['fullSize']:,} bytes ({auto.get('deltaStatus')});"
        f" made in {auto.get('makeSeconds')} s wall, {auto.get('makeCpuSeconds')} s CPU"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
