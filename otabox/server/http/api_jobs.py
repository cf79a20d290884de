"""Jobs and upgrade-log endpoints of the management API."""

from __future__ import annotations

import time

from aiohttp import web

from otabox import protocol
from otabox.errors import BadRequest, NotFound
from otabox.export.schema import EVENT_COLUMNS
from otabox.jobspec import str_list
from otabox.models import JOB_STATES, TASK_STATES, Job, JobStatus, TaskState
from otabox.server import present
from otabox.server.http.plumbing import (
    API_PREFIX,
    actor,
    json_response,
    listing,
    page,
    parse_time,
    read_json,
    services,
    stream_format,
    stream_rows,
)
from otabox.server.services import Services


async def job_view(svc: Services, job: Job) -> dict[str, object]:
    """A job as the API shows it: with counts per task state, retries still due and why it waits."""
    counts = await svc.store.job_counts(job.id)
    out = present.job(job, counts, await svc.store.retries_pending(job.id))
    out["waiting"] = present.waiting(await svc.jobs.waiting(job, counts, time.time()))
    return out


def _state(value: str | None, states: tuple[str, ...], name: str = "status") -> str | None:
    if value and value not in states:
        raise BadRequest(f"{name} must be one of {', '.join(states)}")
    return value or None


async def create_job(request: web.Request) -> web.Response:
    svc = services(request)
    job, warnings = await svc.jobs.create(await read_json(request))
    out = await job_view(svc, job)
    if warnings:
        out["warnings"] = warnings
    return json_response(out, status=201)


async def list_jobs(request: web.Request) -> web.Response:
    svc = services(request)
    p = page(request)
    status = _state(request.query.get("status"), JOB_STATES)
    jobs, total = await svc.store.list_jobs((JobStatus(status),) if status else (), p.limit, p.offset)
    return listing([await job_view(svc, j) for j in jobs], total)


async def get_job(request: web.Request) -> web.Response:
    svc = services(request)
    return json_response(await job_view(svc, await svc.jobs.get(request.match_info["id"])))


async def job_action(request: web.Request) -> web.Response:
    svc = services(request)
    job = await svc.jobs.change(
        await svc.jobs.get(request.match_info["id"]), request.match_info["action"], actor(request)
    )
    return json_response(await job_view(svc, job))


async def list_tasks(request: web.Request) -> web.Response:
    svc = services(request)
    job = await svc.jobs.get(request.match_info["id"])
    p = page(request)
    status = _state(request.query.get("status"), TASK_STATES)
    tasks, total = await svc.store.list_tasks(job.id, TaskState(status) if status else None, p.limit, p.offset)
    return listing([present.task(t) for t in tasks], total)


async def tasks_action(request: web.Request) -> web.Response:
    svc = services(request)
    job = await svc.jobs.get(request.match_info["id"])
    body = await read_json(request)
    keys = str_list(body.get("deviceKeys"), "deviceKeys", protocol.valid_key)
    action = request.match_info["action"]
    if action == "cancel":
        n = await svc.jobs.cancel_tasks(job, keys, actor(request))
    elif action == "retry":
        n = await svc.jobs.retry_tasks(job, keys, actor(request))
    else:
        raise NotFound("unknown tasks action")
    return json_response({"updated": n})


async def events(request: web.Request) -> web.StreamResponse:
    """The upgrade log as JSONL (default) or CSV, streamed oldest first."""
    svc = services(request)
    q = request.query
    fmt = stream_format(request)
    since = parse_time(q["since"], "since") if q.get("since") else None
    found = svc.store.iter_events(q.get("jobId") or None, q.get("productKey") or None, since)
    rows = (present.event(ev) async for ev in found)
    return await stream_rows(request, rows, EVENT_COLUMNS, fmt, "otabox-events")


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
