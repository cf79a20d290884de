"""otabox benchmark: start a fresh otabox, load it with simulated devices, compare with mosquitto and nginx.

    python -m bench [--devices N | --quick] [--only storm,rss,push,progress,rollout,download,rtt]
                    [--skip-reference] [--json PATH] [--profile DIR] [--max-minutes M] [--keep]
                    [--progress-reports K]

The entry point: parses the arguments, sets up the run (open-file limit, work dir, time budget,
SIGTERM as Ctrl-C), runs otabox's figures (bench/figures.py) and then the references
(bench/references.py), stops every process it started, and writes and prints the results
(bench/report.py). Everything runs on 127.0.0.1; otabox, mosquitto and nginx run as child
processes, each figure has a time bound. Usage and results: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.figures import bench_otabox
from bench.harness import FIGURES, TARGET_N, Plan, Run, log
from bench.references import bench_references
from bench.servers import REPO, raise_nofile


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--devices", type=int, default=None, help="simulated devices N [10000; --quick: 1000]")
    p.add_argument("--quick", action="store_true", help="smoke run: N=1000, smaller workloads (<1 min)")
    p.add_argument(
        "--json", default=str(REPO / "bench" / "results.json"), help="write results here [bench/results.json]"
    )
    p.add_argument("--skip-reference", action="store_true", help="do not run mosquitto and nginx")
    p.add_argument("--only", default=",".join(FIGURES), help=f"comma-separated figures [{','.join(FIGURES)}]")
    p.add_argument(
        "--tls-clients", type=int, default=2, metavar="K", help="processes the TLS storms' devices connect from [2]"
    )
    p.add_argument(
        "--progress-reports",
        type=int,
        default=5,
        metavar="K",
        help="progress reports per device in the progress figure [5]; e.g. --only progress --progress-reports 20",
    )
    p.add_argument("--profile", metavar="DIR", help="record the server with py-spy per phase into DIR (raw + .top)")
    p.add_argument("--server-log-level", default="INFO", help="otabox --log-level [INFO, its default]")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (data dir, logs)")
    p.add_argument(
        "--max-minutes", type=float, help="time budget of the whole run; figures are cut to fit [20; --quick: 4]"
    )
    args = p.parse_args(argv)
    only = {f.strip() for f in args.only.split(",") if f.strip()}
    unknown = only - set(FIGURES)
    if unknown:
        p.error(f"unknown figure(s) {sorted(unknown)}; choose from {','.join(FIGURES)}")
    args.only_set = only
    if args.devices is None:
        args.devices = 1000 if args.quick else TARGET_N
    if args.max_minutes is None:
        args.max_minutes = 4.0 if args.quick else 20.0
    if args.devices < 1:
        p.error("--devices must be at least 1")
    if args.progress_reports < 1:
        p.error("--progress-reports must be at least 1")
    return args


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


async def amain(run: Run) -> None:
    await bench_otabox(run)
    if not run.args.skip_reference:
        await bench_references(run)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    nofile = raise_nofile()
    plan = Plan.make(args.devices, args.quick)
    plan.progress_reports = args.progress_reports
    if nofile < plan.devices + 500:
        print(f"bench: warning: open-file limit {nofile} is low for {plan.devices} devices", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="otabox-bench-"))
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    run = Run(args, plan, work, args.only_set)
    started = time.monotonic()
    run.deadline = started + 60 * args.max_minutes
    run.reserve = min(180.0, 15 * args.max_minutes)  # the references need ~1 minute at N=10,000
    # SIGTERM ends the run like Ctrl-C: the finally below stops every child.
    signal.signal(signal.SIGTERM, _interrupt)
    log(f"otabox benchmark: N={plan.devices}, figures {','.join(f for f in FIGURES if f in run.only)}; work dir {work}")
    code = 0
    try:
        asyncio.run(amain(run))
    except KeyboardInterrupt:
        log("interrupted")
        code = 130
    finally:
        for proc in run.procs:
            proc.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = report.write_json(run, started, args.json)
    report.print_summary(run, result)
    print(f"\nJSON: {args.json}" + (f"; work dir kept: {work}" if args.keep else ""))
    return code


if __name__ == "__main__":
    sys.exit(main())
