"""`otabox product|device|firmware ...`: the registry and firmware commands."""

from __future__ import annotations

import argparse
import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from otabox.cli.client import Client, progress_bar
from otabox.cli.output import show
from otabox.jobspec import parse_tag


def tags_of(values: Sequence[str] | None) -> dict[str, str]:
    """`--tag site=east` flags -> {"site": "east"}; exits with the parser's message on a bad one."""
    try:
        return dict(parse_tag(v) for v in values or [])
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc


def cmd_product_add(args: argparse.Namespace, c: Client) -> None:
    show(args, c.post("/products", {"productKey": args.product_key, "name": args.name or args.product_key}))


def cmd_product_list(args: argparse.Namespace, c: Client) -> None:
    show(args, c.get("/products", limit=args.limit), ["productKey", "name", "devices", "createdAt"])


def cmd_device_add(args: argparse.Namespace, c: Client) -> None:
    body: dict[str, Any] = {"deviceKey": args.device_key, "tags": tags_of(args.tag), "auth": args.auth}
    if args.secret:
        body["deviceSecret"] = args.secret
    show(args, c.post(f"/products/{args.product}/devices", body))


def cmd_device_import(args: argparse.Namespace, c: Client) -> int:
    """Exit code 1 when any row was rejected (the others are created all the same)."""
    path = Path(args.file)
    ctype = "application/json" if path.suffix == ".json" else "text/csv"
    result = c.request("POST", f"/products/{args.product}/devices:import", raw=path.read_bytes(), content_type=ctype)
    if args.secrets_out:
        # Created 0600 (and narrowed if it existed) before any secret is written to it.
        fd = os.open(args.secrets_out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["deviceKey", "deviceSecret"])
            writer.writerows([d["deviceKey"], d["deviceSecret"]] for d in result["devices"])
    failed = 1 if result["rejected"] else 0
    if args.json:
        show(args, result)
        return failed
    columns = result.get("columns", {})
    if columns.get("format") == "csv":
        read = ", ".join(f"{k} from {v!r}" for k, v in columns.get("understood", {}).items()) or "no header"
        tags = ", ".join(columns.get("tags", [])) or "none"
        print(f"columns: {read}; tags: {tags}; separator {columns.get('delimiter')!r}")
    print(f"created {result['created']}, rejected {result['rejected']}")
    for err in result["errors"]:
        print(f"  row {err['row']} ({err.get('deviceKey')}): {err['reason']}")
    if args.secrets_out:
        print(f"secrets of created devices written to {args.secrets_out}")
    return failed


def cmd_device_list(args: argparse.Namespace, c: Client) -> None:
    query: dict[str, Any] = {
        "limit": args.limit,
        "offset": args.offset,
        "version": args.version,
        "tag": [f"{k}:{v}" for k, v in tags_of(args.tag).items()] or None,
    }
    if args.online is not None:
        query["online"] = args.online
    show(
        args,
        c.get(f"/products/{args.product}/devices", **query),
        ["deviceKey", "version", "online", "lastSeen", "tags"],
    )


def cmd_device_show(args: argparse.Namespace, c: Client) -> None:
    show(args, c.get(f"/products/{args.product}/devices/{args.device_key}"))


def cmd_device_tag(args: argparse.Namespace, c: Client) -> None:
    show(args, c.request("PATCH", f"/products/{args.product}/devices/{args.device_key}", {"tags": tags_of(args.tag)}))


def cmd_device_delete(args: argparse.Namespace, c: Client) -> None:
    c.delete(f"/products/{args.product}/devices/{args.device_key}")
    show(args, {"deleted": args.device_key})


def cmd_device_rotate(args: argparse.Namespace, c: Client) -> None:
    show(args, c.post(f"/products/{args.product}/devices/{args.device_key}:rotate-secret"))


def cmd_firmware_add(args: argparse.Namespace, c: Client) -> None:
    fields = {
        "name": args.name,
        "version": args.version,
        "signMethod": args.sign_method,
        "enableVerification": "true" if args.enable_verification else "false",
    }
    if args.desc:
        fields["desc"] = args.desc
    bar = None if args.json else progress_bar("uploading")
    show(args, c.upload_firmware(args.product, Path(args.file), fields, bar))


def cmd_firmware_list(args: argparse.Namespace, c: Client) -> None:
    show(
        args,
        c.get(f"/products/{args.product}/firmware", limit=args.limit),
        ["id", "name", "version", "size", "status", "signMethod", "sign"],
    )


def cmd_firmware_show(args: argparse.Namespace, c: Client) -> None:
    show(args, c.get(f"/firmware/{args.id}"))


def cmd_firmware_delete(args: argparse.Namespace, c: Client) -> None:
    c.delete(f"/firmware/{args.id}")
    show(args, {"deleted": args.id})


def cmd_firmware_url(args: argparse.Namespace, c: Client) -> None:
    show(args, c.get(f"/firmware/{args.id}/url", deviceKey=args.device_key))


def register(command: Any, group: Any) -> None:
    products = group("product", "manage products")
    p = command(products, "add", cmd_product_add, "create a product")
    p.add_argument("product_key")
    p.add_argument("--name")
    p = command(products, "list", cmd_product_list, "list products")
    p.add_argument("--limit", type=int, default=100)

    devices = group("device", "manage devices")
    p = command(devices, "add", cmd_device_add, "register a device (its secret is shown once)")
    p.add_argument("product")
    p.add_argument("device_key")
    p.add_argument("--secret", help="device secret (generated when omitted)")
    p.add_argument("--tag", action="append", help="key=value (repeatable)")
    p.add_argument("--auth", choices=["sign", "plain"], default="sign")
    p = command(devices, "import", cmd_device_import, "bulk import from CSV or JSON")
    p.add_argument("product")
    p.add_argument("file")
    p.add_argument("--secrets-out", help="write created devices' secrets to this CSV (0600)")
    p = command(devices, "list", cmd_device_list, "list devices")
    p.add_argument("product")
    p.add_argument("--version")
    p.add_argument("--tag", action="append", help="key=value filter (repeatable)")
    p.add_argument("--online", choices=["true", "false"])
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--offset", type=int, default=0)
    p = command(devices, "show", cmd_device_show, "show one device")
    p.add_argument("product")
    p.add_argument("device_key")
    p = command(devices, "tag", cmd_device_tag, "replace a device's tags")
    p.add_argument("product")
    p.add_argument("device_key")
    p.add_argument("--tag", action="append", help="key=value (repeatable; none clears the tags)")
    p = command(devices, "delete", cmd_device_delete, "delete a device (its active task ends canceled)")
    p.add_argument("product")
    p.add_argument("device_key")
    p = command(devices, "rotate-secret", cmd_device_rotate, "give a device a new secret (shown once)")
    p.add_argument("product")
    p.add_argument("device_key")

    firmware = group("firmware", "manage firmware")
    p = command(firmware, "add", cmd_firmware_add, "upload a firmware file")
    p.add_argument("product")
    p.add_argument("file")
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--desc")
    p.add_argument("--sign-method", choices=["sha256", "md5"], default="sha256")
    p.add_argument("--enable-verification", action="store_true")
    p = command(firmware, "list", cmd_firmware_list, "list a product's firmware")
    p.add_argument("product")
    p.add_argument("--limit", type=int, default=100)
    p = command(firmware, "show", cmd_firmware_show, "show one firmware")
    p.add_argument("id")
    p = command(firmware, "delete", cmd_firmware_delete, "delete a firmware (409 while a job uses it)")
    p.add_argument("id")
    p = command(firmware, "url", cmd_firmware_url, "mint a download URL for one device")
    p.add_argument("id")
    p.add_argument("device_key")
