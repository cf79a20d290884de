"""`otabox delta make|apply`: binary deltas between two images, on this machine, without a server.

The server runs `delta make` as a child process (its time and memory bounded); device makers
use both to try the patches their devices will get.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def cmd_make(args: argparse.Namespace) -> int:
    from otabox import delta

    if args.max_memory:
        import resource

        # The server's bound on a runaway patch: past this, allocation fails (MemoryError).
        resource.setrlimit(resource.RLIMIT_AS, (args.max_memory, args.max_memory))
    started = time.monotonic()
    try:
        size = delta.make(Path(args.old), Path(args.new), Path(args.out), args.algorithm)
    except (delta.DeltaError, OSError, MemoryError) as exc:
        print(f"otabox: {exc}", file=sys.stderr)
        return 1
    seconds = time.monotonic() - started
    full = Path(args.new).stat().st_size
    if args.json:
        print(json.dumps({"algorithm": args.algorithm, "size": size, "fullSize": full, "seconds": round(seconds, 3)}))
    else:
        share = 100 * size / full if full else 0
        print(f"{args.out}: {size} bytes ({share:.1f} % of {full}), {args.algorithm}, {seconds:.1f} s")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from otabox import delta

    try:
        delta.apply(Path(args.old), Path(args.patch), Path(args.out), args.algorithm)
    except (delta.DeltaError, OSError) as exc:
        print(f"otabox: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"out": args.out, "size": Path(args.out).stat().st_size}))
    else:
        print(f"{args.out}: {Path(args.out).stat().st_size} bytes rebuilt")
    return 0


def register(sub: Any) -> None:
    from otabox.delta import ALGORITHM, FORMATS

    group = sub.add_parser("delta", help="make or apply a binary delta between two firmware images")
    actions = group.add_subparsers(dest="action", required=True)
    make = actions.add_parser("make", help="write the patch that rebuilds NEW from OLD")
    make.add_argument("old")
    make.add_argument("new")
    make.add_argument("out")
    make.add_argument("--algorithm", choices=FORMATS, default=ALGORITHM)
    make.add_argument("--max-memory", type=int, default=0, help="address space limit in bytes (0 = none)")
    make.add_argument("--json", action="store_true", help="machine-readable JSON output")
    make.set_defaults(run=cmd_make)
    apply = actions.add_parser("apply", help="rebuild the new image from OLD and PATCH")
    apply.add_argument("old")
    apply.add_argument("patch")
    apply.add_argument("out")
    apply.add_argument("--algorithm", choices=FORMATS, default=ALGORITHM)
    apply.add_argument("--json", action="store_true", help="machine-readable JSON output")
    apply.set_defaults(run=cmd_apply)
