"""`otabox db copy`: move an all-in-one install's database into PostgreSQL (`otabox.server.store.copy`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any


def _source(text: str) -> tuple[Path, Path | None]:
    """(the SQLite file, its data dir or None) from a data dir, a file path or a sqlite:/// URL."""
    if text.startswith("sqlite:///"):
        text = text.removeprefix("sqlite://")
    path = Path(text)
    if path.is_dir():
        return path / "otabox.db", path
    return path, None


def cmd_copy(args: argparse.Namespace) -> int:
    # Imported here: the store (aiosqlite, asyncpg) is loaded by this command only.
    from otabox.server.app import DataDirLocked, lock_data_dir
    from otabox.server.store import is_database_url
    from otabox.server.store.copy import CopyError, copy_database

    db, data_dir = _source(args.source)
    if not is_database_url(args.to):
        print("otabox db copy: --to must be a postgresql:// URL", file=sys.stderr)
        return 2
    if not db.is_file():
        print(f"otabox db copy: no database at {db}", file=sys.stderr)
        return 1
    lock = None
    progress = None if args.json else _progress
    try:
        if data_dir is not None:
            lock = lock_data_dir(data_dir)  # no server may write while its database moves
        copied = asyncio.run(copy_database(db, args.to, progress))
    except (CopyError, DataDirLocked, OSError, ConnectionError) as exc:
        print(f"{'' if progress is None else chr(10)}otabox db copy: {exc}", file=sys.stderr)
        return 1
    finally:
        if lock is not None:
            os.close(lock)
    if progress is not None:
        print(file=sys.stderr)  # end the progress line
    total = sum(t.rows for t in copied)
    if args.json:
        summary: dict[str, Any] = {"tables": {t.name: {"rows": t.rows, "sha256": t.sha256} for t in copied}}
        print(json.dumps({**summary, "rows": total, "checked": True}))
    else:
        print(f"copied {total} rows in {len(copied)} tables; every table checked (rows and SHA-256) ")
        for t in copied:
            print(f"  {t.name:22} {t.rows:>10}")
        where = data_dir if data_dir is not None else db.parent
        print(f"firmware files are not in the database: start the PostgreSQL server with the data dir {where}")
        print("(its firmware/ folder and keys) or a copy of it.")
    return 0


def _progress(table: str, rows: int) -> None:
    print(f"\rcopying {table}: {rows} rows ", end="", file=sys.stderr, flush=True)


def register(sub: Any) -> None:
    db = sub.add_parser("db", help="database tools")
    actions = db.add_subparsers(dest="action", required=True)
    p = actions.add_parser(
        "copy",
        help="copy an all-in-one install's SQLite database into an empty PostgreSQL database, then check it",
    )
    p.add_argument("--from", dest="source", required=True, help="data dir, SQLite file or sqlite:///path URL")
    p.add_argument("--to", required=True, help="postgresql://user:pass@host/db (empty: its schema is made here)")
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")
    p.set_defaults(run=cmd_copy)
