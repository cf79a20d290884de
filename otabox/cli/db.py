"""`otabox db copy`: move an all-in-one install into a cluster: its database into PostgreSQL
(`otabox.server.store.copy`), its keys and firmware files into the database or an S3 bucket."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable
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
    # Imported here: the store (aiosqlite, asyncpg) and the S3 SDK are loaded by this command only.
    from otabox.errors import StorageUnavailable
    from otabox.server.app import DataDirLocked, lock_data_dir
    from otabox.server.s3 import BucketUrl, StorageConfigError
    from otabox.server.store import is_database_url
    from otabox.server.store.copy import CopyError, copy_database

    db, data_dir = _source(args.source)
    if not is_database_url(args.to):
        print("otabox db copy: --to must be a postgresql:// URL", file=sys.stderr)
        return 2
    if args.storage_url and data_dir is None:
        print("otabox db copy: --storage-url needs --from to be the data dir (its firmware/ folder)", file=sys.stderr)
        return 2
    try:
        if args.storage_url:
            BucketUrl.parse(args.storage_url)
    except StorageConfigError as exc:
        print(f"otabox db copy: {exc}", file=sys.stderr)
        return 2
    if not db.is_file():
        print(f"otabox db copy: no database at {db}", file=sys.stderr)
        return 1
    lock = None
    progress = None if args.json else _progress
    files: dict[str, Any] | None = None
    try:
        if data_dir is not None:
            lock = lock_data_dir(data_dir)  # no server may write while its database moves
        copied = asyncio.run(copy_database(db, args.to, progress))
        if data_dir is not None:
            try:
                files = asyncio.run(
                    _move_files(data_dir, args.to, args.storage_url, _file_progress if progress else None)
                )
            except (CopyError, OSError, ConnectionError, StorageUnavailable, StorageConfigError) as exc:
                # The rows are in (and checked); a node started on this data dir shares what is missing.
                raise CopyError(
                    f"{exc}\nthe database is copied and checked, the keys and files are not all moved: start the"
                    " first node on this data dir (with the same --storage-url): it puts them there at start"
                ) from exc
    except (CopyError, DataDirLocked, OSError, ConnectionError, StorageUnavailable, StorageConfigError) as exc:
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
        print(json.dumps({**summary, "rows": total, "files": files, "checked": True}))
        return 0
    print(f"copied {total} rows in {len(copied)} tables; every table checked (rows and SHA-256)")
    for t in copied:
        print(f"  {t.name:22} {t.rows:>10}")
    if files is None:
        print("firmware files were not copied (--from named a database file, not a data dir): start the")
        print("PostgreSQL nodes on the old data dir, or copy again from the data dir.")
    else:
        mib = files["bytes"] / 2**20
        print(f"copied {files['count']} firmware file(s), {mib:.1f} MiB, into {files['where']}; each read back and")
        print("checked (SHA-256); the server key and CA of the data dir are the cluster's now:")
        same = " with the same --storage-url." if args.storage_url else "."
        print(f"nodes may start on new, empty data dirs{same}")
    return 0


async def _move_files(
    data_dir: Path, target_url: str, storage_url: str, progress: Callable[[int, int], None] | None
) -> dict[str, Any]:
    """The install's keys and firmware files into the cluster's shared places, each file checked.

    The keys go where a node's first start would put its own (kv `shared_keys`); the files into
    the bucket of `storage_url`, or the database's chunks.
    """
    from otabox.server.artifacts import Artifacts, DatabaseCopy, SharedCopy
    from otabox.server.cluster import share_keys
    from otabox.server.s3 import Bucket, BucketUrl
    from otabox.server.store import Store
    from otabox.server.store.copy import CopyError

    store = await Store.open(target_url)
    try:
        await share_keys(store, data_dir)
        bucket = Bucket(BucketUrl.parse(storage_url)) if storage_url else None
        if bucket is not None:
            await bucket.check()
        shared: SharedCopy = bucket or DatabaseCopy(store)
        artifacts = Artifacts(data_dir / "firmware", shared)
        digests = sorted(await store.stored_digests())
        missing = [sha for sha in digests if not artifacts.path_for(sha).is_file()]
        if missing:
            raise CopyError(
                f"{len(missing)} firmware file(s) the database refers to are not in {data_dir / 'firmware'}"
                f" (first: {missing[0]})"
            )
        size = 0
        for i, sha in enumerate(digests, 1):
            await artifacts.share(sha)
            if not await artifacts.check_shared(sha):
                raise CopyError(f"firmware file {sha} does not read back whole from {shared.where}")
            size += artifacts.path_for(sha).stat().st_size
            if progress is not None:
                progress(i, len(digests))
        return {"count": len(digests), "bytes": size, "where": shared.where, "checked": True}
    finally:
        await store.close()


def _progress(table: str, rows: int) -> None:
    print(f"\rcopying {table}: {rows} rows ", end="", file=sys.stderr, flush=True)


def _file_progress(done: int, total: int) -> None:
    print(f"\rcopying firmware files: {done}/{total} ", end="", file=sys.stderr, flush=True)


def register(sub: Any) -> None:
    db = sub.add_parser("db", help="database tools")
    actions = db.add_subparsers(dest="action", required=True)
    p = actions.add_parser(
        "copy",
        help="copy an all-in-one install's SQLite database into an empty PostgreSQL database, then check it",
    )
    p.add_argument("--from", dest="source", required=True, help="data dir, SQLite file or sqlite:///path URL")
    p.add_argument("--to", required=True, help="postgresql://user:pass@host/db (empty: its schema is made here)")
    p.add_argument(
        "--storage-url",
        default="",
        help="s3://bucket/prefix?endpoint=... to put the firmware files in (keys in AWS_*); default: the database",
    )
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")
    p.set_defaults(run=cmd_copy)
