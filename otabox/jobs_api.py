"""Jobs and upgrade-log endpoints of the management API."""

from __future__ import annotations

import csv
import io
import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from otabox import protocol, rollout
from otabox.errors import BadRequest, Conflict, NotFound
from otabox.store_events import EVENT_COLUMNS
from otabox.web import API_PREFIX, APP, iso, json_response, listing, page, parse_time, present, read_json

if TYPE_CHECKING:
    from otabox.app import App

MAX_VERIFY_DEVICES = 10


def _num(
    body: dict[str, Any],
    key: str,
    *,
    integer: bool = False,
    minimum: float = 0.0,
    exclusive: bool = True,
    maximum: float | None = None,
) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and value != int(value)):
        raise BadRequest(f"{key} must be a {'whole ' if integer else ''}number")
    if value < minimum or (exclusive and value == minimum) or (maximum is not None and value > maximum):
        raise BadRequest(f"{key} is out of range")
    return int(value) if integer else float(value)


def _str_list(value: Any, field: str, check: Any = None) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"{field} must be a non-empty list of strings")
    if check is not None and not all(check(v) for v in value):
        raise BadRequest(f"{field} contains an invalid value")
    return list(dict.fromkeys(value))


def validate_job(body: dict[str, Any]) -> dict[str, Any]:
    """Normalise a POST /jobs body into the stored spec. Raises BadRequest naming the field."""
    jtype = body.get("type", "upgrade")
    if jtype not in ("upgrade", "verify"):
        raise BadRequest("type must be 'upgrade' or 'verify'")
    scope_in = body.get("scope") or {}
    if not isinstance(scope_in, dict):
        raise BadRequest("scope must be an object")
    unknown = set(scope_in) - {"versionNumbers", "deviceKeys", "tags"}
    if unknown:
        raise BadRequest(f"scope has unknown field(s) {sorted(unknown)}")
    scope: dict[str, Any] = {}
    if "versionNumbers" in scope_in:
        scope["versionNumbers"] = _str_list(scope_in["versionNumbers"], "scope.versionNumbers", protocol.valid_version)
    if "deviceKeys" in scope_in:
        scope["deviceKeys"] = _str_list(scope_in["deviceKeys"], "scope.deviceKeys", protocol.valid_key)
    if "tags" in scope_in:
        tags = scope_in["tags"]
        if not isinstance(tags, dict) or not tags:
            raise BadRequest("scope.tags must be an object of tag -> list of values")
        scope["tags"] = {k: _str_list(v if isinstance(v, list) else [v], f"scope.tags.{k}") for k, v in tags.items()}
    if jtype == "verify":
        if set(scope) != {"deviceKeys"}:
            raise BadRequest("a verify job takes scope.deviceKeys only")
        if len(scope["deviceKeys"]) > MAX_VERIFY_DEVICES:
            raise BadRequest(f"a verify job takes at most {MAX_VERIFY_DEVICES} devices")
    spec: dict[str, Any] = {"scope": scope}
    policy = body.get("policy", "snapshot")
    if policy not in ("snapshot", "incremental"):
        raise BadRequest("policy must be 'snapshot' or 'incremental'")
    mode = body.get("mode", "push")
    if mode not in ("push", "request"):
        raise BadRequest("mode must be 'push' or 'request'")
    spec.update(policy=policy if jtype == "upgrade" else "snapshot", mode=mode)
    spec["maxConcurrency"] = _num(body, "maxConcurrency", integer=True)
    spec["ratePerMinute"] = _num(body, "ratePerMinute")
    spec["timeoutSeconds"] = _num(body, "timeoutSeconds") or 7200.0
    retry = body.get("retry") or {}
    if not isinstance(retry, dict):
        raise BadRequest("retry must be an object")
    spec["retry"] = {
        "count": _num(retry, "count", integer=True, exclusive=False, maximum=100) or 0,
        "intervalSeconds": _num(retry, "intervalSeconds", exclusive=False) or 0.0,
    }
    abort = body.get("abort")
    if abort is not None:
        if not isinstance(abort, dict) or "failureRatio" not in abort:
            raise BadRequest("abort must be an object with failureRatio")
        spec["abort"] = {
            "failureRatio": _num(abort, "failureRatio", maximum=1.0),
            "minFinished": _num(abort, "minFinished", integer=True, minimum=1, exclusive=False) or 1,
        }
    waves = body.get("waves")
    if waves is not None:
        if not isinstance(waves, list) or not waves or not all(isinstance(w, dict) for w in waves):
            raise BadRequest("waves must be a non-empty list of objects")
        out, last = [], 0.0
        for i, w in enumerate(waves):
            pct = _num(w, "percent", maximum=100.0)
            if pct is None or pct <= last:
                raise BadRequest(f"waves[{i}].percent must be cumulative and increasing (0 < percent <= 100)")
            last = pct
            item: dict[str, Any] = {"percent": pct}
            ratio = _num(w, "successRatio", exclusive=False, maximum=1.0)
            if ratio is not None:
                item["successRatio"] = ratio
            out.append(item)
        if last != 100:
            raise BadRequest("the last wave must reach percent 100")
        spec["waves"] = out
    sched = body.get("schedule") or {}
    if not isinstance(sched, dict):
        raise BadRequest("schedule must be an object")
    schedule: dict[str, Any] = {}
    for key in ("start", "end"):
        if sched.get(key):
            schedule[key] = sched[key]
            schedule[key + "Epoch"] = parse_time(sched[key], f"schedule.{key}")
    if "startEpoch" in schedule and "endEpoch" in schedule and schedule["endEpoch"] <= schedule["startEpoch"]:
        raise BadRequest("schedule.end must be after schedule.start")
    if sched.get("dailyWindow") is not None:
        daily = sched["dailyWindow"]
        try:
            if not isinstance(daily, list) or len(daily) != 2:
                raise ValueError
            lo, hi = rollout.parse_hhmm(daily[0]), rollout.parse_hhmm(daily[1])
        except (ValueError, TypeError, AttributeError) as exc:
            raise BadRequest('schedule.dailyWindow must be ["HH:MM", "HH:MM"]') from exc
        if lo == hi:
            raise BadRequest("schedule.dailyWindow must not be empty")
        schedule["dailyWindow"] = daily
        tz = sched.get("timezoneOffsetMinutes", 0)
        if isinstance(tz, bool) or not isinstance(tz, int) or not -14 * 60 <= tz <= 14 * 60:
            raise BadRequest("schedule.timezoneOffsetMinutes must be whole minutes within ±14 h")
        schedule["timezoneOffsetMinutes"] = tz
    if schedule:
        spec["schedule"] = schedule
    return spec


async def view(app: Any, job: dict[str, Any]) -> dict[str, Any]:
    """A job as the API shows it: with counts per task state and retries still due."""
    out = job_view(job, await app.store.job_counts(job["id"]))
    out["retriesPending"] = await app.store.retries_pending(job["id"])
    return out


def job_view(job: dict[str, Any], counts: dict[str, int]) -> dict[str, Any]:
    out = {k: v for k, v in job.items() if k != "schedule"}
    if "schedule" in job:
        out["schedule"] = {k: v for k, v in job["schedule"].items() if not k.endswith("Epoch")}
    full = {s: counts.get(s, 0) for s in rollout.TASK_STATES}
    out["counts"] = full
    out["total"] = sum(full.values())
    return out


async def _job(request: web.Request) -> dict[str, Any]:
    job = await request.app[APP].store.get_job(request.match_info["id"])
    if job is None:
        raise NotFound(f"job {request.match_info['id']!r} not found")
    return job


async def create_job(request: web.Request) -> web.Response:
    body = await read_json(request)
    return json_response(await start_job(request.app[APP], body), status=201)


async def start_job(app: App, body: dict[str, Any]) -> dict[str, Any]:
    """Validate a POST /jobs body and create the job (also used by the web console).

    Returns the job view; raises BadRequest, NotFound or Conflict.
    """
    spec = validate_job(body)
    fw_id = body.get("firmwareId")
    if not isinstance(fw_id, str):
        raise BadRequest("firmwareId is required")
    fw = await app.store.get_firmware(fw_id)
    if fw is None:
        raise NotFound(f"firmware {fw_id!r} not found")
    jtype = body.get("type", "upgrade")
    if jtype == "upgrade" and fw["enableVerification"] and fw["status"] != "verified":
        raise Conflict("firmware must be verified first (enableVerification is on)", code="unverified")
    name = body.get("name") or f"{jtype} {fw['name']} {fw['version']}"
    if not isinstance(name, str) or len(name) > 200:
        raise BadRequest("name must be a string of at most 200 characters")
    devices, busy = await app.store.scope_devices(fw["productKey"], spec["scope"], fw["version"])
    if jtype == "verify":
        known = {d["deviceKey"] for d in devices}
        missing = [k for k in spec["scope"]["deviceKeys"] if k not in known]
        if missing:
            raise Conflict(
                f"devices not found, busy or already on {fw['version']}: {', '.join(missing)}",
                code="devices-unavailable",
            )
    p_waves = tuple(rollout.Wave(w["percent"], w.get("successRatio")) for w in spec.get("waves", ()))
    waves = rollout.assign_waves(len(devices), p_waves)
    now = time.time()
    start = spec.get("schedule", {}).get("startEpoch")
    scheduled = start is not None and start > now
    job = {
        "id": "job-" + uuid.uuid4().hex[:12],
        "name": name,
        "type": jtype,
        "firmwareId": fw_id,
        "productKey": fw["productKey"],
        "toVersion": fw["version"],
        "status": "scheduled" if scheduled else "running",
        "startedAt": None if scheduled else now,
        "currentWave": 1 if p_waves else 0,
        "skipped": busy,
        "spec": spec,
    }
    await app.store.create_job(job, [(d["deviceKey"], d["version"], w) for d, w in zip(devices, waves, strict=True)])
    app.scheduler.jobs_changed()
    created = await app.store.get_job(job["id"])
    assert created is not None
    return await view(app, created)


async def list_jobs(request: web.Request) -> web.Response:
    app = request.app[APP]
    p = page(request)
    status = request.query.get("status") or None
    if status is not None and status not in rollout.JOB_STATES:
        raise BadRequest(f"status must be one of {', '.join(rollout.JOB_STATES)}")
    jobs, total = await app.store.list_jobs(status, p.limit, p.offset)
    return listing([await view(app, j) for j in jobs], total)


async def get_job(request: web.Request) -> web.Response:
    job = await _job(request)
    return json_response(await view(request.app[APP], job))


async def job_action(request: web.Request) -> web.Response:
    job = await _job(request)
    return json_response(await change_job(request.app[APP], job, request.match_info["action"]))


async def change_job(app: App, job: dict[str, Any], action: str) -> dict[str, Any]:
    """Pause, resume or cancel a job; returns the updated job view. Raises Conflict or NotFound."""
    status, now = job["status"], time.time()
    if action == "pause":
        if status not in ("running", "scheduled"):
            raise Conflict(f"cannot pause a {status} job", code="bad-state")
        await app.store.set_job(job["id"], status="paused", status_reason="paused by operator")
    elif action == "resume":
        if status != "paused":
            raise Conflict(f"cannot resume a {status} job", code="bad-state")
        waves = job.get("waves") or ()
        wave = job["currentWave"]
        # Resuming a job that a wave gate paused means: go on to the next wave anyway.
        if job["statusReason"].startswith("wave ") and wave < len(waves):
            await app.store.set_job(job["id"], current_wave=wave + 1)
        await app.store.set_job(job["id"], status="running", status_reason="")
    elif action == "cancel":
        if status in rollout.JOB_DONE:
            raise Conflict(f"cannot cancel a {status} job", code="bad-state")
        await app.store.set_job(job["id"], status="canceled", status_reason="canceled by operator", finished_at=now)
        await app.store.bulk_transition(
            job["id"], rollout.ACTIVE, None, status="canceled", desc="job canceled", finished_at=now, due_at=None
        )
        await app.store.bulk_transition(job["id"], ("failed",), None, retry_at=None)
    else:
        raise NotFound(f"unknown action {action!r}")
    app.scheduler.jobs_changed()
    updated = await app.store.get_job(job["id"])
    assert updated is not None
    return await view(app, updated)


async def list_tasks(request: web.Request) -> web.Response:
    app = request.app[APP]
    job = await _job(request)
    p = page(request)
    status = request.query.get("status") or None
    if status is not None and status not in rollout.TASK_STATES:
        raise BadRequest(f"status must be one of {', '.join(rollout.TASK_STATES)}")
    tasks, total = await app.store.list_tasks(job["id"], status, p.limit, p.offset)
    return listing(tasks, total)


async def tasks_action(request: web.Request) -> web.Response:
    app = request.app[APP]
    job = await _job(request)
    body = await read_json(request)
    keys = _str_list(body.get("deviceKeys"), "deviceKeys", protocol.valid_key)
    now = time.time()
    if request.match_info["action"] == "cancel":
        n = await app.store.bulk_transition(
            job["id"],
            rollout.ACTIVE,
            keys,
            status="canceled",
            desc="canceled by operator",
            finished_at=now,
            due_at=None,
        )
    elif request.match_info["action"] == "retry":
        n = await retry_tasks(app, job, keys)
    else:
        raise NotFound("unknown tasks action")
    app.scheduler.jobs_changed()
    return json_response({"updated": n})


async def retry_tasks(app: App, job: dict[str, Any], device_keys: list[str]) -> int:
    """Operator retry of finished, unsuccessful tasks; returns how many restarted. Raises Conflict."""
    if job["status"] in ("canceled", "aborted"):
        raise Conflict(f"cannot retry tasks of a {job['status']} job", code="bad-state")
    n = 0
    for dk in device_keys:
        n += await app.store.retry_task(job["id"], job["productKey"], dk)
    if n and job["status"] == "completed":
        await app.store.set_job(job["id"], status="running", finished_at=None, status_reason="")
    app.scheduler.jobs_changed()
    return n


async def events(request: web.Request) -> web.StreamResponse:
    """The upgrade log as JSONL (default) or CSV, streamed oldest first."""
    app = request.app[APP]
    q = request.query
    fmt = q.get("format", "jsonl")
    if fmt not in ("jsonl", "csv"):
        raise BadRequest("format must be jsonl or csv")
    since = parse_time(q["since"], "since") if q.get("since") else None
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8" if fmt == "csv" else "application/x-ndjson",
            "Content-Disposition": f'attachment; filename="otabox-events.{fmt}"',
        }
    )
    await resp.prepare(request)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if fmt == "csv":
        writer.writerow(EVENT_COLUMNS)
    async for ev in app.store.iter_events(q.get("jobId") or None, q.get("productKey") or None, since):
        ev["ts"] = iso(ev["ts"])
        if fmt == "csv":
            writer.writerow(["" if ev[c] is None else ev[c] for c in EVENT_COLUMNS])
        else:
            buf.write(json.dumps(present(ev), ensure_ascii=False) + "\n")
        if buf.tell() > 64 * 1024:
            await resp.write(buf.getvalue().encode())
            buf.seek(0)
            buf.truncate()
    await resp.write(buf.getvalue().encode())
    await resp.write_eof()
    return resp


def add_routes(web_app: web.Application) -> None:
    r = web_app.router
    p = API_PREFIX
    r.add_post(f"{p}/jobs", create_job)
    r.add_get(f"{p}/jobs", list_jobs)
    r.add_get(f"{p}/jobs/{{id}}", get_job)
    r.add_post(f"{p}/jobs/{{id}}/tasks:{{action}}", tasks_action)
    r.add_get(f"{p}/jobs/{{id}}/tasks", list_tasks)
    r.add_post(f"{p}/jobs/{{id}}/{{action}}", job_action)
    r.add_get(f"{p}/events", events)
