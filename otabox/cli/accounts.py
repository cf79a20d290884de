"""`otabox user add|list|set-role|remove`, `otabox token create|list|revoke` and `otabox audit`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from otabox.cli.client import Client
from otabox.cli.output import show

ROLES = ("viewer", "operator", "admin")


def cmd_user_add(args: argparse.Namespace, c: Client) -> None:
    body: dict[str, Any] = {"username": args.username, "role": args.role}
    if args.password:
        body["password"] = args.password
    made = c.post("/users", body)
    show(args, made)
    if "password" in made and not args.json:
        print("(the password is shown this once)", file=sys.stderr)


def cmd_user_list(args: argparse.Namespace, c: Client) -> None:
    show(args, c.get("/users"), ["username", "role", "createdAt"])


def cmd_user_set_role(args: argparse.Namespace, c: Client) -> None:
    show(args, c.request("PATCH", f"/users/{args.username}", body={"role": args.role}))


def cmd_user_remove(args: argparse.Namespace, c: Client) -> None:
    c.delete(f"/users/{args.username}")
    show(args, {"removed": args.username})


def cmd_token_create(args: argparse.Namespace, c: Client) -> None:
    body: dict[str, Any] = {"name": args.name}
    if args.expires:
        body["expiresInSeconds"] = args.expires
    made = c.post("/tokens", body)
    show(args, made)
    if not args.json:
        print("(the token is shown this once; use it as OTABOX_TOKEN)", file=sys.stderr)


def cmd_token_list(args: argparse.Namespace, c: Client) -> None:
    show(args, c.get("/tokens"), ["id", "name", "username", "createdAt", "expiresAt", "revokedAt", "lastUsedAt"])


def cmd_token_revoke(args: argparse.Namespace, c: Client) -> None:
    c.delete(f"/tokens/{args.id}")
    show(args, {"revoked": args.id})


def cmd_audit(args: argparse.Namespace, c: Client) -> None:
    query = {k: v for k, v in {"since": args.since, "actor": args.actor, "action": args.action}.items() if v}
    text = c.request("GET", "/audit", query={**query, "format": "csv" if args.csv else "jsonl"})
    sys.stdout.write(text.decode() if isinstance(text, bytes) else str(text))


def register(command: Any, group: Any) -> None:
    users = group("user", "users and their roles (admin)")
    p = command(users, "add", cmd_user_add, "add a user (a password is made up unless given)")
    p.add_argument("username")
    p.add_argument("--role", choices=ROLES, required=True)
    p.add_argument("--password", help="at least 10 characters [made up and shown once]")
    command(users, "list", cmd_user_list, "list users")
    p = command(users, "set-role", cmd_user_set_role, "change a user's role")
    p.add_argument("username")
    p.add_argument("role", choices=ROLES)
    p = command(users, "remove", cmd_user_remove, "remove a user (their tokens stop working)")
    p.add_argument("username")

    tokens = group("token", "personal API tokens (your own; an admin sees all)")
    p = command(tokens, "create", cmd_token_create, "make a token acting as you (shown once)")
    p.add_argument("name")
    p.add_argument("--expires", type=float, metavar="SECONDS", help="lifetime in seconds [no expiry]")
    command(tokens, "list", cmd_token_list, "list tokens")
    p = command(tokens, "revoke", cmd_token_revoke, "revoke a token at once")
    p.add_argument("id")

    p = command(group("audit", "the audit log (admin)"), "show", cmd_audit, "print the audit log")
    p.add_argument("--since", help="ISO time")
    p.add_argument("--actor")
    p.add_argument("--action", help="e.g. job.pause, auth.failed")
    p.add_argument("--csv", action="store_true", help="CSV instead of JSON Lines")
