"""Jobs: the list (running / scheduled / finished), the live job page, its actions and device tabs."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from otabox.errors import OtaboxError
from otabox.models import (
    ACTIVE,
    FAILURES,
    FINISHED,
    IN_FLIGHT,
    JOB_DONE,
    TASK_STATES,
    Job,
    JobStatus,
    TaskState,
    Waiting,
)
from otabox.server import present
from otabox.server.http.api_jobs import events
from otabox.server.http.console import charts
from otabox.server.http.console.render import (
    PAGE_SIZE,
    flash,
    fragment,
    html,
    is_htmx,
    otabox,
    page_offset,
    render,
    see_other,
    when,
)
from otabox.server.http.plumbing import actor
from otabox.server.services import Services

TABS: dict[str, tuple[JobStatus, ...]] = {
    "running": (JobStatus.RUNNING, JobStatus.PAUSED),
    "scheduled": (JobStatus.SCHEDULED,),
    "finished": JOB_DONE,
}
CURVE_BUCKETS = 60
# `waiting.reason` (the API's) as an operator reads it.
_WAITING = {
    Waiting.OUTSIDE_WINDOW: "waiting for the daily window",
    Waiting.RATE_LIMITED: "{in_flight} in flight, {pending} waiting for the rate limit",
    Waiting.CONCURRENCY_FULL: "{in_flight} in flight (the concurrency limit), {pending} waiting",
    Waiting.AWAITING_REQUESTS: "waiting for {pending} device(s) to ask for the upgrade",
    Waiting.DEVICES_OFFLINE: "waiting for {pending} offline device(s) to connect",
}


def plain_reason(job: dict[str, Any], counts: dict[TaskState, int]) -> str:
    """The job's state in one sentence an operator can act on ("paused: wave 2 below 95 % success")."""
    status, reason = job["status"], job.get("statusReason") or ""
    if reason:
        return reason if reason.startswith(status) else f"{status}: {reason}"
    in_flight = sum(counts.get(s, 0) for s in IN_FLIGHT)
    waiting = counts.get(TaskState.PENDING, 0)
    total = sum(counts.values())
    if status == "running":
        waves = job.get("waves") or ()
        where = f"wave {max(1, job['currentWave'])} of {len(waves)}, " if waves else ""
        why = _WAITING.get((job.get("waiting") or {}).get("reason", ""))
        if why:
            until = (job.get("waiting") or {}).get("until")
            return f"running: {where}{why.format(pending=waiting, in_flight=in_flight)}" + (
                f" (until {when(until)})" if until else ""
            )
        if job.get("mode") == "request" and waiting and not in_flight:
            return f"running: {where}waiting for {waiting} device(s) to ask for the upgrade"
        return f"running: {where}{in_flight} in flight, {waiting} waiting"
    if status == "scheduled":
        start = (job.get("schedule") or {}).get("start")
        return f"scheduled: starts at {start}" if start else "scheduled"
    if status == "completed":
        return f"completed: {counts.get(TaskState.SUCCEEDED, 0)} of {total} succeeded"
    return str(status)


async def job_card(app: Services, record: Job) -> dict[str, Any]:
    """A job with its counts, progress, plain reason and stacked bar, as lists show it."""
    counts = full_counts(await app.store.job_counts(record.id))
    job = present.job(record, counts, 0)
    job["waiting"] = present.waiting(await app.jobs.waiting(record, counts, time.time()))
    total = sum(counts.values())
    done = sum(counts[s] for s in FINISHED)
    return {
        "failures": sum(counts[s] for s in FAILURES),
        "job": job,
        "counts": counts,
        "total": total,
        "percent": round(100 * done / total) if total else 0,
        "reason": plain_reason(job, counts),
        "bar": charts.stacked_bar(counts, height=14),
    }


def full_counts(counts: dict[TaskState, int]) -> dict[TaskState, int]:
    return {s: counts.get(s, 0) for s in TASK_STATES}


async def job_or_404(request: web.Request) -> Job:
    return await otabox(request).jobs.get(request.match_info["id"])


# ---------------------------------------------------------------- snapshot (page and SSE)


async def snapshot(request: web.Request, record: Job) -> dict[str, Any]:
    """Everything the live parts of a job page show; rendered into fragments by `job_fragments`."""
    app = otabox(request)
    counts = full_counts(await app.store.job_counts(record.id))
    job = present.job(record, counts, await app.store.retries_pending(record.id))
    job["waiting"] = present.waiting(await app.jobs.waiting(record, counts, time.time()))
    total = sum(counts.values())
    finished = sum(counts[s] for s in FINISHED)
    fw_record = await app.store.get_firmware(record.firmware_id)
    fw = present.firmware(fw_record) if fw_record else None
    waves = []
    if record.spec.waves:
        per_wave = await app.store.wave_counts(record.id)
        sizes = [sum(per_wave.get(i, {}).values()) for i in range(1, len(record.spec.waves) + 1)]
        for i, w in enumerate(record.spec.waves, start=1):
            wc = full_counts(per_wave.get(i, {}))
            n = sizes[i - 1]
            good = wc[TaskState.SUCCEEDED]
            waves.append(
                {
                    "number": i,
                    "percent": w.percent,
                    "successRatio": w.success_ratio,
                    "counts": wc,
                    "total": n,
                    "succeeded": good,
                    "ratio": good / n if n else None,
                    "bar": charts.stacked_bar(wc, height=16, label=f"Wave {i}"),
                    "current": i == record.current_wave,
                }
            )
    start = record.started_at or record.created_at
    end = record.finished_at or time.time()
    span = max(end - start, 1.0)
    hist = await app.store.finish_histogram(record.id, start, span / CURVE_BUCKETS)
    ok, bad = charts.cumulative(hist, CURVE_BUCKETS)
    return {
        "job": job,
        "counts": counts,
        "total": total,
        "finished": finished,
        "percent": round(100 * finished / total) if total else 0,
        "reason": plain_reason(job, counts),
        "firmware": fw,
        "waves": waves,
        "bar": charts.stacked_bar(counts, height=28),
        "curve": charts.completion_curve(ok, bad, total, span),
        "failed": sum(counts[s] for s in FAILURES),
    }


def job_fragments(request: web.Request, snap: dict[str, Any]) -> dict[str, str]:
    """SSE event name -> HTML of that live region."""
    return {
        "status": fragment(request, "_job_status.html", snap),
        "progress": fragment(request, "_job_progress.html", snap),
        "tabs": fragment(request, "_job_tabs.html", {**snap, "tab": request.query.get("tab", "")}),
    }


# ---------------------------------------------------------------- pages


async def jobs_list(request: web.Request) -> web.Response:
    app = otabox(request)
    tab = request.query.get("tab", "running")
    if tab not in TABS:
        tab = "running"
    offset = page_offset(request)
    jobs, total = await app.store.list_jobs(TABS[tab], PAGE_SIZE, offset)
    rows = [await job_card(app, job) for job in jobs]
    tab_totals = {t: (await app.store.list_jobs(s, 1, 0))[1] for t, s in TABS.items()}
    return render(
        request,
        "jobs.html",
        {"tab": tab, "rows": rows, "total": total, "offset": offset, "page": PAGE_SIZE, "tab_totals": tab_totals},
    )


async def job_page(request: web.Request) -> web.Response:
    record = await job_or_404(request)
    snap = await snapshot(request, record)
    tasks = await tasks_context(request, record)
    return render(request, "job.html", {**tasks, **snap, "frag": job_fragments(request, snap)})


async def tasks_context(request: web.Request, record: Job) -> dict[str, Any]:
    """The device table of the tab, search and page in the query (?tab=failed&q=th-0&offset=50)."""
    tab = request.query.get("tab", "")
    if tab not in TASK_STATES:
        tab = ""
    q = request.query.get("q", "").strip()[:64]
    offset = page_offset(request)
    found, total = await otabox(request).store.find_tasks(
        record.id, TaskState(tab) if tab else None, q, PAGE_SIZE, offset
    )
    items = [{**present.task(t), "failure": t.status in (TaskState.FAILED, TaskState.TIMEOUT)} for t in found]
    job = present.job(record, {}, 0)
    return {"job": job, "tab": tab, "q": q, "tasks": items, "tasks_total": total, "offset": offset, "page": PAGE_SIZE}


# ---------------------------------------------------------------- actions


def _back(request: web.Request, job_id: str) -> str:
    nxt = request.query.get("next", "")
    return nxt if nxt.startswith("/ui/jobs") and not nxt.startswith("//") else f"/ui/jobs/{job_id}"


async def job_action(request: web.Request) -> web.Response:
    """Pause or resume (htmx: answers with the new status region; else redirects back)."""
    job = await job_or_404(request)
    action = request.match_info["action"]
    try:
        updated = await otabox(request).jobs.change(job, action, actor(request))
    except OtaboxError as exc:
        if is_htmx(request):
            return html(fragment(request, "_error.html", {"title": "Not possible now", "message": exc.message}))
        flash(request, exc.message)
        return see_other(_back(request, job.id))
    if is_htmx(request):
        snap = await snapshot(request, updated)
        return html(fragment(request, "_job_status.html", snap))
    flash(request, f"Job {updated.name}: {action}d.")
    return see_other(_back(request, job.id))


async def cancel_confirm(request: web.Request) -> web.Response:
    record = await job_or_404(request)
    counts = full_counts(await otabox(request).store.job_counts(record.id))
    active = sum(counts[s] for s in ACTIVE)
    job = present.job(record, counts, 0)
    return render(request, "job_cancel.html", {"job": job, "active": active, "next": _back(request, record.id)})


async def cancel(request: web.Request) -> web.Response:
    job = await job_or_404(request)
    try:
        await otabox(request).jobs.cancel(job, actor(request))
        flash(request, f"Job {job.name} canceled.")
    except OtaboxError as exc:
        flash(request, exc.message)
    return see_other(f"/ui/jobs/{job.id}")


async def retry(request: web.Request) -> web.Response:
    """Retry one device (deviceKey in the form) or every failed, timed-out and rolled-back device of the job."""
    app = otabox(request)
    job = await job_or_404(request)
    form = await request.post()
    keys = [str(k) for k in form.getall("deviceKey", [])]
    if not keys:
        for status in FAILURES:
            offset = 0
            while True:
                tasks, total = await app.store.list_tasks(job.id, status, 1000, offset)
                keys.extend(t.device_key for t in tasks)
                offset += len(tasks)
                if not tasks or offset >= total:
                    break
    try:
        n = await app.jobs.retry_tasks(job, keys, actor(request)) if keys else 0
        flash(request, f"{n} device(s) will be retried." if n else "No device could be retried.")
    except OtaboxError as exc:
        flash(request, exc.message)
    return see_other(f"/ui/jobs/{job.id}" + ("?tab=pending" if keys else ""))


async def export_events(request: web.Request) -> web.StreamResponse:
    """CSV (or JSONL) of the upgrade log, exactly as GET /api/v1/events answers it."""
    return await events(request)


def add_routes(sub: web.Application) -> None:
    r = sub.router
    r.add_get("/jobs", jobs_list)
    r.add_get("/jobs/{id}", job_page)
    r.add_get("/jobs/{id}/cancel", cancel_confirm)
    r.add_post("/jobs/{id}/cancel", cancel)
    r.add_post("/jobs/{id}/retry", retry)
    r.add_post("/jobs/{id}/{action:pause|resume}", job_action)
    r.add_get("/events/export", export_events)
