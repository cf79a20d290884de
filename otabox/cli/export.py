"""`otabox export`: the upgrade log plus a snapshot of jobs, firmware and devices (`otabox.export`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any

from otabox.cli.client import Client, progress_bar
from otabox.export.schema import FORMATS
from otabox.models import parse_iso


def cmd_export(args: argparse.Namespace, client: Client) -> int:
    # The writer pulls in the store (aiosqlite): only this command pays for it.
    from otabox.export.writer import export_api, export_data_dir, format_of, snapshot_path

    path = Path(args.output)
    try:
        fmt = format_of(path, args.format)
        if args.url:
            counts = export_api(client, path, fmt, args.job, args.product, args.since)
        else:
            since = parse_iso(args.since) if args.since else None
            bar = None if args.json else progress_bar("exporting")
            counts = asyncio.run(
                export_data_dir(
                    Path(args.data_dir or os.environ.get("OTABOX_DATA_DIR") or "./otabox-data"),
                    path,
                    fmt,
                    args.job,
                    args.product,
                    since,
                    bar,
                )
            )
    except (ValueError, LookupError, OSError, sqlite3.Error) as exc:
        print(f"otabox export: {exc}", file=sys.stderr)
        return 1
    files = {"events": str(path), **{t: str(snapshot_path(path, t)) for t in ("jobs", "firmware", "devices")}}
    if args.json:
        print(json.dumps({"rows": counts, "files": files}))
    else:
        for table, name in files.items():
            print(f"{counts[table]:>8} {table:<9} -> {name}")
    return 0


def register(sub: Any, api: argparse.ArgumentParser) -> None:
    p = sub.add_parser("export", parents=[api], help="export the upgrade log and a snapshot for analysis")
    p.add_argument("-o", "--output", required=True, help="events file: .csv, .jsonl or .parquet")
    p.add_argument("--format", choices=FORMATS, help="override the format implied by the file name")
    p.add_argument("--job", help="only this job's events (and the job's product)")
    p.add_argument("--product", help="only this product")
    p.add_argument("--since", help="only events at or after this ISO 8601 time")
    p.set_defaults(api_call=cmd_export)
