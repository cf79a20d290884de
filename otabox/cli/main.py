"""The `otabox` command: `serve`, and admin commands that talk to a running server's API."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from otabox import __version__
from otabox.cli import accounts, backup, bundle, db, delta, export, jobs, registry, simulate
from otabox.cli.client import ApiError, Client, discover_url
from otabox.server import settings

Handler = Callable[[argparse.Namespace, Client], Any]


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
    from otabox.server.app import serve

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

    registry.register(command, group)
    accounts.register(command, group)
    jobs.register(command, group)
    bundle.register(sub, command, group)
    backup.register(sub)
    db.register(sub)
    delta.register(sub)
    export.register(sub, api)
    simulate.register(sub, api)

    sender = sub.add_parser("download-sender", help="(internal) the process `otabox serve` sends downloads from")
    sender.add_argument("--fd", type=int, required=True, help="the Unix socket it is handed downloads on")
    sender.add_argument("--stall-seconds", type=float, required=True, help="drop a client that takes nothing this long")
    sender.set_defaults(run=_download_sender)
    return parser


def _download_sender(args: argparse.Namespace) -> int:
    from otabox.server.http.sender import child_main  # only this child needs it

    return child_main(args.fd, args.stall_seconds)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # `otabox device list pk | head`: the reader has seen enough, which is no error. Point
        # stdout at /dev/null so the interpreter's final flush does not fail a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _main(argv: Sequence[str] | None) -> int:
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
    except BrokenPipeError:
        raise
    except OSError as exc:
        if exc.filename is not None:  # a local file (firmware, import, --secrets-out), not the network
            print(f"otabox: {exc}", file=sys.stderr)
        else:
            print(f"otabox: cannot reach the server at {client.base.geturl()}: {exc}", file=sys.stderr)
        return 1
    return int(result) if isinstance(result, int) else 0
