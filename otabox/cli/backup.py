"""`otabox backup` and `otabox restore`: one archive with the database, firmware, keys and digests."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from otabox.cli.client import ApiError, Client, data_dir, discover_url, progress_bar


def cmd_backup(args: argparse.Namespace) -> int:
    out = Path(args.file)
    bar = None if args.json else progress_bar("backing up")
    url = args.url or os.environ.get("OTABOX_URL")
    try:
        if url:
            token = args.token or os.environ.get("OTABOX_TOKEN") or os.environ.get("OTABOX_ADMIN_TOKEN")
            size = Client(url or discover_url(args.data_dir), token).download("POST", "/backup", out, bar)
            summary: dict[str, Any] = {"file": str(out), "bytes": size, "from": url}
        else:
            # The writer needs sqlite3 and the data dir only: no server, no network.
            from otabox.server import backup

            signing = Path(args.signing_key) if args.signing_key else None
            manifest = backup.write_file(data_dir(args.data_dir), out, signing_key=signing, progress=bar)
            summary = {"file": str(out), "bytes": out.stat().st_size, "members": len(manifest["files"])}
    except ApiError as exc:
        print(f"otabox backup: {exc.status} {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"otabox backup: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary) if args.json else f"backup written to {out} ({summary['bytes']} bytes)")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from otabox.server import backup

    target = data_dir(args.data_dir)
    try:
        manifest = backup.restore(
            Path(args.file), target, force=args.force, progress=None if args.json else progress_bar("restoring")
        )
    except (backup.BackupError, OSError) as exc:
        print(f"otabox restore: {exc}", file=sys.stderr)
        return 1
    note = ""
    if (target / "signing.pem").exists():
        note = f"; the firmware signing key is {target / 'signing.pem'}: start with --signing-key pointing at it"
    if args.json:
        print(json.dumps({"dataDir": str(target), "members": len(manifest["files"]), "created": manifest["created"]}))
    else:
        print(f"restored {len(manifest['files'])} files of the backup of {manifest['created']} into {target}{note}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("backup", help="write a consistent backup (database, firmware, keys) into one archive")
    p.add_argument("file", help="archive to write (.tar, or .tar.gz / .tgz for gzip)")
    p.add_argument("--data-dir", help="data dir to back up [OTABOX_DATA_DIR, ./otabox-data]")
    p.add_argument("--signing-key", help="the server's firmware signing key file, to include it")
    p.add_argument("--url", help="ask a running server instead (POST /api/v1/backup) [OTABOX_URL]")
    p.add_argument("--token", help="admin token for --url [OTABOX_TOKEN]")
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")
    p.set_defaults(run=cmd_backup)
    p = sub.add_parser("restore", help="restore a backup into a data dir (checks every digest first)")
    p.add_argument("file")
    p.add_argument("--data-dir", help="folder to restore into [OTABOX_DATA_DIR, ./otabox-data]")
    p.add_argument("--force", action="store_true", help="replace a non-empty data dir")
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")
    p.set_defaults(run=cmd_restore)
