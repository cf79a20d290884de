"""`otabox job ...` commands: create, list, show, pause, resume, cancel, tasks, watch."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from otabox.client import Client

STATES = ("pending", "published", "upgrading", "succeeded", "failed", "canceled", "timeout")
DONE = ("completed", "canceled", "aborted")


def _show(args: argparse.Namespace, data: Any, columns: list[str] | None = None) -> None:
    from otabox.cli import _show as show

    show(args, data, columns)


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def body_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """A POST /jobs body from flags (or a JSON file, flags overriding it)."""
    body: dict[str, Any] = {}
    if args.file:
        with open(args.file, encoding="utf-8") as fh:
            body = json.load(fh)
    if args.firmware:
        body["firmwareId"] = args.firmware
    for key, value in (("type", args.type), ("name", args.name), ("mode", args.mode), ("policy", args.policy)):
        if value:
            body[key] = value
    scope = body.setdefault("scope", {})
    if args.versions:
        scope["versionNumbers"] = _csv(args.versions)
    if args.devices:
        scope["deviceKeys"] = _csv(args.devices)
    for tag in args.tag or []:
        k, _, v = tag.partition("=")
        scope.setdefault("tags", {}).setdefault(k, []).append(v)
    if not scope:
        del body["scope"]
    for key, value in (
        ("maxConcurrency", args.max_concurrency),
        ("ratePerMinute", args.rate),
        ("timeoutSeconds", args.timeout),
    ):
        if value is not None:
            body[key] = value
    if args.retry is not None:
        body["retry"] = {"count": args.retry, "intervalSeconds": args.retry_interval}
    if args.abort_ratio is not None:
        body["abort"] = {"failureRatio": args.abort_ratio, "minFinished": args.abort_min}
    if args.waves:
        waves = []
        for item in _csv(args.waves) or []:
            pct, _, ratio = item.partition(":")
            wave: dict[str, Any] = {"percent": float(pct)}
            if ratio:
                wave["successRatio"] = float(ratio)
            waves.append(wave)
        body["waves"] = waves
    schedule = body.get("schedule", {})
    if args.start:
        schedule["start"] = args.start
    if args.end:
        schedule["end"] = args.end
    if args.daily_window:
        lo, _, hi = args.daily_window.partition("-")
        schedule["dailyWindow"] = [lo, hi]
        schedule["timezoneOffsetMinutes"] = args.tz_offset
    if schedule:
        body["schedule"] = schedule
    return body


def _counts_line(job: dict[str, Any]) -> str:
    c = job["counts"]
    parts = [f"{s} {c[s]}" for s in STATES if c.get(s)]
    wave = f" wave {job['currentWave']}/{len(job['waves'])}" if job.get("waves") else ""
    reason = f" ({job['statusReason']})" if job.get("statusReason") else ""
    return f"{job['id']} {job['status']}{reason}{wave}: {', '.join(parts) or 'no tasks'} [total {job['total']}]"


def cmd_create(args: argparse.Namespace, c: Client) -> None:
    job = c.post("/jobs", body_from_args(args))
    if args.json:
        _show(args, job)
    else:
        print(f"created {_counts_line(job)}")


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
        if job["status"] in DONE or (args.once):
            if tty:
                sys.stdout.write("\n")
            return 0
        time.sleep(args.interval)


def register(sub: Any, api: argparse.ArgumentParser, command: Any, group: Any) -> None:
    jobs = group("job", "batch upgrade and verification jobs")
    p = command(jobs, "create", cmd_create, "create a job (flags or --file job.json)")
    p.add_argument("--file", help="JSON body as in POST /api/v1/jobs (flags override it)")
    p.add_argument("--firmware", help="firmware id")
    p.add_argument("--type", choices=["upgrade", "verify"])
    p.add_argument("--name")
    p.add_argument("--mode", choices=["push", "request"])
    p.add_argument("--policy", choices=["snapshot", "incremental"])
    p.add_argument("--versions", help="source versions, comma separated")
    p.add_argument("--devices", help="device keys, comma separated")
    p.add_argument("--tag", action="append", help="key=value (repeat for more values or keys)")
    p.add_argument("--max-concurrency", type=int)
    p.add_argument("--rate", type=float, help="new pushes per minute")
    p.add_argument("--timeout", type=float, help="seconds from upgrading to timeout")
    p.add_argument("--retry", type=int, help="extra attempts after a device-reported failure")
    p.add_argument("--retry-interval", type=float, default=60.0)
    p.add_argument("--abort-ratio", type=float, help="abort when failures/finished reaches this")
    p.add_argument("--abort-min", type=int, default=20, help="finished tasks before abort may trigger")
    p.add_argument("--waves", help="cumulative percents with optional success ratio, e.g. 5:0.95,50:0.9,100")
    p.add_argument("--start", help="ISO 8601 start time")
    p.add_argument("--end", help="ISO 8601 end time")
    p.add_argument("--daily-window", help="HH:MM-HH:MM")
    p.add_argument("--tz-offset", type=int, default=0, help="minutes east of UTC for --daily-window")
    p = command(jobs, "list", cmd_list, "list jobs")
    p.add_argument("--status")
    p.add_argument("--limit", type=int, default=100)
    p = command(jobs, "show", cmd_show, "show a job with its counts")
    p.add_argument("id")
    for action in ("pause", "resume", "cancel"):
        p = command(jobs, action, cmd_action, f"{action} a job")
        p.add_argument("id")
        p.set_defaults(action=action)
    p = command(jobs, "tasks", cmd_tasks, "list a job's tasks, or --retry/--cancel devices")
    p.add_argument("id")
    p.add_argument("--status")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--retry", help="device keys to retry, comma separated")
    p.add_argument("--cancel", help="device keys to cancel, comma separated")
    p = command(jobs, "watch", cmd_watch, "live counts per state until the job finishes")
    p.add_argument("id")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--once", action="store_true", help="print once and exit")
