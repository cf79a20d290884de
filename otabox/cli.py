"""Command line: `otabox serve` and admin commands that talk to a running server's API."""

from __future__ import annotations

import argparse
import asyncio
import csv
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from otabox import __version__, settings
from otabox.client import ApiError, Client, discover_url, progress_bar

Handler = Callable[[argparse.Namespace, Client], Any]


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """Render rows as an aligned text table for people."""

    def cell(v: Any) -> str:
        if isinstance(v, dict):
            return ",".join(f"{k}={x}" for k, x in v.items())
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "no"
        return str(v)

    grid = [[c for c in columns]] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in grid) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in grid]
    return "\n".join(lines)


def _show(args: argparse.Namespace, data: Any, columns: Sequence[str] | None = None) -> None:
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return
    if isinstance(data, dict) and "items" in data and columns:
        print(_table(data["items"], columns))
        print(f"({len(data['items'])} of {data['total']})")
    elif isinstance(data, list) and columns:
        print(_table(data, columns))
    elif isinstance(data, dict):
        width = max((len(k) for k in data), default=0)
        for k, v in data.items():
            print(f"{k.ljust(width)}  {json.dumps(v) if isinstance(v, dict | list) else v}")
    else:
        print(data)


def parse_tags(values: Sequence[str] | None) -> dict[str, str]:
    """`["site=east", ...]` -> `{"site": "east"}`. Raises ValueError for an item without `=`."""
    tags = {}
    for item in values or []:
        k, sep, v = item.partition("=")
        if not sep:
            raise ValueError(f"tag must be key=value, got {item!r}")
        tags[k] = v
    return tags


def _tags(values: Sequence[str] | None) -> dict[str, str]:
    try:
        return parse_tags(values)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc


# ---------------------------------------------------------------- commands


def cmd_product_add(args: argparse.Namespace, c: Client) -> None:
    _show(args, c.post("/products", {"productKey": args.product_key, "name": args.name or args.product_key}))


def cmd_product_list(args: argparse.Namespace, c: Client) -> None:
    _show(args, c.get("/products", limit=args.limit), ["productKey", "name", "devices", "createdAt"])


def cmd_device_add(args: argparse.Namespace, c: Client) -> None:
    body: dict[str, Any] = {"deviceKey": args.device_key, "tags": _tags(args.tag), "auth": args.auth}
    if args.secret:
        body["deviceSecret"] = args.secret
    _show(args, c.post(f"/products/{args.product}/devices", body))


def cmd_device_import(args: argparse.Namespace, c: Client) -> None:
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
    if args.json:
        _show(args, result)
        return
    print(f"created {result['created']}, rejected {result['rejected']}")
    for err in result["errors"]:
        print(f"  row {err['row']} ({err.get('deviceKey')}): {err['reason']}")
    if args.secrets_out:
        print(f"secrets of created devices written to {args.secrets_out}")


def cmd_device_list(args: argparse.Namespace, c: Client) -> None:
    query: dict[str, Any] = {
        "limit": args.limit,
        "offset": args.offset,
        "version": args.version,
        "tag": [f"{k}:{v}" for k, v in _tags(args.tag).items()] or None,
    }
    if args.online is not None:
        query["online"] = args.online
    _show(
        args,
        c.get(f"/products/{args.product}/devices", **query),
        ["deviceKey", "version", "online", "lastSeen", "tags"],
    )


def cmd_device_show(args: argparse.Namespace, c: Client) -> None:
    _show(args, c.get(f"/products/{args.product}/devices/{args.device_key}"))


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
    _show(args, c.upload_firmware(args.product, Path(args.file), fields, bar))


def cmd_firmware_list(args: argparse.Namespace, c: Client) -> None:
    _show(
        args,
        c.get(f"/products/{args.product}/firmware", limit=args.limit),
        ["id", "name", "version", "size", "status", "signMethod", "sign"],
    )


def cmd_firmware_show(args: argparse.Namespace, c: Client) -> None:
    _show(args, c.get(f"/firmware/{args.id}"))


def cmd_firmware_delete(args: argparse.Namespace, c: Client) -> None:
    c.delete(f"/firmware/{args.id}")
    _show(args, {"deleted": args.id})


def cmd_firmware_url(args: argparse.Namespace, c: Client) -> None:
    _show(args, c.get(f"/firmware/{args.id}/url", deviceKey=args.device_key))


# ---------------------------------------------------------------- parser


def _serve(args: argparse.Namespace) -> int:
    try:
        conf = settings.load(args)
    except settings.SettingsError as exc:
        print(f"otabox: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, conf.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # amqtt and its state machine library narrate every transition at INFO.
    for noisy in ("transitions", "amqtt"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    from otabox.app import serve

    try:
        import uvloop

        runner: Callable[..., int] = uvloop.run  # pragma: no cover - optional speed-up
    except ImportError:
        runner = asyncio.run
    return runner(serve(conf))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="otabox", description="Self-contained firmware OTA upgrade server.")
    parser.add_argument("--version", action="version", version=f"otabox {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server (MQTT broker, HTTP API, scheduler)")
    settings.add_arguments(serve)
    serve.set_defaults(run=_serve)

    api = argparse.ArgumentParser(add_help=False)
    api.add_argument("--url", help="server base URL [env OTABOX_URL; default from <data-dir>/ports.json]")
    api.add_argument("--token", help="admin token [env OTABOX_TOKEN or OTABOX_ADMIN_TOKEN]")
    api.add_argument("--data-dir", help="data dir whose ports.json names the server [./otabox-data]")
    api.add_argument("--json", action="store_true", help="machine-readable JSON output")

    def group(name: str, help_text: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
        p = sub.add_parser(name, help=help_text)
        return p.add_subparsers(dest="action", required=True)

    def command(g: Any, name: str, fn: Handler, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = g.add_parser(name, parents=[api], help=help_text)
        p.set_defaults(api_call=fn)
        return p

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

    for name in EXTENSIONS:
        module = importlib.import_module(name)
        module.register(sub, api, command, group)
    return parser


# Modules that add subcommands: each has register(sub, api_parent, command, group).
EXTENSIONS: list[str] = ["otabox.cli_jobs", "otabox.export"]
EXTENSIONS.append("otabox.simulate")  # fleet simulator (engine imported only when it runs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "run"):
        return int(args.run(args))
    token = args.token or os.environ.get("OTABOX_TOKEN") or os.environ.get("OTABOX_ADMIN_TOKEN")
    client = Client(args.url or discover_url(args.data_dir), token)
    try:
        result = args.api_call(args, client)
    except ApiError as exc:
        if args.json:
            print(json.dumps({"error": {"status": exc.status, "code": exc.code, "message": exc.message}}))
        print(f"otabox: {exc.status} {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.filename is not None:  # a local file (firmware, import, --secrets-out), not the network
            print(f"otabox: {exc}", file=sys.stderr)
        else:
            print(f"otabox: cannot reach the server at {client.base.geturl()}: {exc}", file=sys.stderr)
        return 1
    return int(result) if isinstance(result, int) else 0
