"""`otabox job ...` commands: create, list, show, pause, resume, cancel, tasks, watch."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from otabox import jobspec
from otabox.cli.client import Client
from otabox.cli.output import show as _show
from otabox.models import JOB_DONE, JOB_STATES, TASK_STATES


def body_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """A POST /jobs body from flags (or a JSON file, flags overriding it); the flags are the job-spec table's."""
    base: dict[str, Any] = {}
    if args.file:
        with open(args.file, encoding="utf-8") as fh:
            base = json.load(fh)
    try:
        return jobspec.body_from_args(args, base)
    except ValueError as exc:
        raise SystemExit(f"otabox job create: {exc}") from exc


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _counts_line(job: dict[str, Any]) -> str:
    c = job["counts"]
    parts = [f"{s} {c[s]}" for s in TASK_STATES if c.get(s)]
    wave = f" wave {job['currentWave']}/{len(job['waves'])}" if job.get("waves") else ""
    reason = f" ({job['statusReason']})" if job.get("statusReason") else ""
    waiting = job.get("waiting") or {}
    why = ""
    if waiting:
        why = f"; waiting: {waiting['reason']}" + (f" until {waiting['until']}" if waiting.get("until") else "")
    counts = ", ".join(parts) or "no tasks"
    return f"{job['id']} {job['status']}{reason}{wave}: {counts} [total {job['total']}]{why}"


def cmd_create(args: argparse.Namespace, c: Client) -> None:
    job = c.post("/jobs", body_from_args(args))
    if args.json:
        _show(args, job)
        return
    print(f"created {_counts_line(job)}")
    for warning in job.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)


def cmd_list(args: argparse.Namespace, c: Client) -> None:
    data = c.get("/jobs", status=args.status, limit=args.limit)
    for job in data["items"]:
        job["progress"] = f"{job['counts']['succeeded']}/{job['total']}"
    _show(args, data, ["id", "name", "type", "mode", "status", "progress", "currentWave", "createdAt"])


def cmd_show(args: argparse.Namespace, c: Client) -> None:
    job = c.get(f"/jobs/{args.id}")
    if args.json:
        _show(args, job)
        return
    _show(args, {k: v for k, v in job.items() if k != "counts"})
    print(_counts_line(job))


def cmd_action(args: argparse.Namespace, c: Client) -> None:
    job = c.post(f"/jobs/{args.id}/{args.action}")
    if args.json:
        _show(args, job)
    else:
        print(_counts_line(job))


def cmd_tasks(args: argparse.Namespace, c: Client) -> None:
    if args.retry or args.cancel:
        action = "retry" if args.retry else "cancel"
        keys = _csv(args.retry or args.cancel)
        _show(args, c.post(f"/jobs/{args.id}/tasks:{action}", {"deviceKeys": keys}))
        return
    data = c.get(f"/jobs/{args.id}/tasks", status=args.status, limit=args.limit, offset=args.offset)
    _show(
        args,
        data,
        ["deviceKey", "status", "progress", "step", "desc", "fromVersion", "toVersion", "attempt", "updatedAt"],
    )


def cmd_watch(args: argparse.Namespace, c: Client) -> int:
    """Counts per state, updated in place until the job finishes (JSON lines with --json)."""
    tty = sys.stdout.isatty() and not args.json
    while True:
        job = c.get(f"/jobs/{args.id}")
        if args.json:
            print(json.dumps({"ts": time.time(), "status": job["status"], "counts": job["counts"]}), flush=True)
        elif tty:
            sys.stdout.write("\r\x1b[2K" + _counts_line(job))
            sys.stdout.flush()
        else:
            print(_counts_line(job), flush=True)
        if job["status"] in JOB_DONE or args.once:
            if tty:
                sys.stdout.write("\n")
            return 0
        time.sleep(args.interval)


def register(command: Any, group: Any) -> None:
    jobs = group("job", "batch upgrade and verification jobs")
    p = command(jobs, "create", cmd_create, "create a job (flags or --file job.json)")
    p.add_argument("--file", help="JSON body as in POST /api/v1/jobs (flags override it)")
    jobspec.add_arguments(p)
    p = command(jobs, "list", cmd_list, "list jobs")
    p.add_argument("--status", choices=list(JOB_STATES))
    p.add_argument("--limit", type=int, default=100)
    p = command(jobs, "show", cmd_show, "show a job with its counts")
    p.add_argument("id")
    for action in ("pause", "resume", "cancel"):
        p = command(jobs, action, cmd_action, f"{action} a job")
        p.add_argument("id")
        p.set_defaults(action=action)
    p = command(jobs, "tasks", cmd_tasks, "list a job's tasks, or --retry/--cancel devices")
    p.add_argument("id")
    p.add_argument("--status", choices=list(TASK_STATES))
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--retry", help="device keys to retry, comma separated")
    p.add_argument("--cancel", help="device keys to cancel, comma separated")
    p = command(jobs, "watch", cmd_watch, "live counts per state until the job finishes")
    p.add_argument("id")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--once", action="store_true", help="print once and exit")
