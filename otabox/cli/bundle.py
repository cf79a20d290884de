"""`otabox keygen`, `otabox bundle create|import` and `otabox publisher add|list|remove`: signed
offline bundles. keygen and bundle create work on the vendor's machine without a server."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from otabox.cli.client import Client, progress_bar
from otabox.cli.output import show

if TYPE_CHECKING:
    from otabox.bundle import Source


def _fail(message: str) -> int:
    print(f"otabox: {message}", file=sys.stderr)
    return 1


def cmd_keygen(args: argparse.Namespace) -> int:
    from otabox import bundle  # cryptography: loaded by the commands that sign, not by every start

    try:
        private, public = bundle.keygen(Path(args.file))
    except (FileExistsError, OSError) as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps({"privateKey": str(private), "publicKey": str(public)}))
    else:
        print(f"private key {private} (keep it secret, 0600); public key {public} (give it to the sites)")
    return 0


def _sources(args: argparse.Namespace) -> list[Source]:
    from otabox import bundle

    sources = [bundle.Source(Path(args.firmware), args.product, args.name, args.version, args.desc or "")]
    for item in args.add or []:
        parts = item.split(":", 3)
        if len(parts) != 4:
            raise bundle.BundleError(f"--add takes PRODUCT:NAME:VERSION:FILE, got {item!r}")
        pk, name, version, file = parts
        sources.append(bundle.Source(Path(file), pk, name, version))
    return sources


def cmd_create(args: argparse.Namespace) -> int:
    from otabox import bundle

    try:
        key = bundle.load_private(Path(args.key))
        manifest = bundle.create(Path(args.output), key, _sources(args))
    except (bundle.BundleError, OSError) as exc:
        return _fail(str(exc))
    entries = [manifest, *manifest.get("more", [])]
    if args.json:
        print(json.dumps({"bundle": args.output, "manifest": manifest}))
    else:
        for e in entries:
            print(f"{e['productKey']} {e['name']} {e['version']}: {e['size']} bytes, sha256 {e['sha256'][:16]}…")
        print(f"signed bundle written to {args.output}")
    return 0


def cmd_import(args: argparse.Namespace, c: Client) -> int:
    bar = None if args.json else progress_bar("uploading")
    result = c.upload_file("/bundles", Path(args.file), {}, bar)
    if args.json:
        show(args, result)
    else:
        for fw in result["firmware"]:
            print(f"stored {fw['productKey']} {fw['name']} {fw['version']} as {fw['id']} (publisher {fw['publisher']})")
    return 0


def cmd_publisher_add(args: argparse.Namespace, c: Client) -> None:
    show(args, c.post("/publishers", {"name": args.name, "publicKey": Path(args.file).read_text()}))


def cmd_publisher_list(args: argparse.Namespace, c: Client) -> None:
    show(args, c.get("/publishers"), ["name", "publicKey", "createdAt"])


def cmd_publisher_remove(args: argparse.Namespace, c: Client) -> None:
    c.delete(f"/publishers/{args.name}")
    show(args, {"removed": args.name})


def register(sub: Any, command: Any, group: Any) -> None:
    p = sub.add_parser("keygen", help="make an Ed25519 publisher key pair for signing bundles")
    p.add_argument("file", help="private key file; the public key goes to FILE.pub")
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")
    p.set_defaults(run=cmd_keygen)

    bundles = group("bundle", "signed offline firmware bundles")
    p = bundles.add_parser("create", help="write a signed bundle (no server needed)")
    p.add_argument("firmware", help="the firmware file")
    p.add_argument("--product", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--desc")
    p.add_argument("--key", required=True, help="publisher private key (otabox keygen)")
    p.add_argument("-o", "--output", required=True, help="bundle file to write (.otb)")
    p.add_argument("--add", action="append", metavar="PRODUCT:NAME:VERSION:FILE", help="another firmware")
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")
    p.set_defaults(run=cmd_create)
    p = command(bundles, "import", cmd_import, "store a bundle's firmware on the server (trusted publishers only)")
    p.add_argument("file")

    publishers = group("publisher", "publishers whose bundles this server trusts")
    p = command(publishers, "add", cmd_publisher_add, "trust a publisher's public key")
    p.add_argument("name")
    p.add_argument("file", help="the publisher's public key (FILE.pub from otabox keygen)")
    command(publishers, "list", cmd_publisher_list, "list trusted publishers")
    p = command(publishers, "remove", cmd_publisher_remove, "stop trusting a publisher (its firmware stays)")
    p.add_argument("name")
