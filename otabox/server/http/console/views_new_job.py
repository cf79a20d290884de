"""New job on one page: form -> review -> start. The form maps onto a POST /jobs body.

The inputs, their labels and limits come from the job-spec table (`otabox.jobspec`), and
validation is the job service's own, so the console cannot create a job the API would refuse,
and its error messages name the same fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from otabox import jobspec, rollout
from otabox.errors import BadRequest, OtaboxError
from otabox.server import present
from otabox.server.http.console.render import fragment, html, otabox, render, see_other

MAX_WAVES = 4
SAMPLE = 10
PACE = jobspec.form_fields("maxConcurrency", "ratePerMinute", "timeoutSeconds")
RETRY_ABORT = jobspec.form_fields(
    "retry.count", "retry.intervalSeconds", "abort.failureRatio", "abort.minFinished", "rollbackWatchSeconds"
)
# Fields the review page carries back and forth as hidden inputs.
FIELDS = [f.form for f in jobspec.JOB_FIELDS if f.form] + ["dailyFrom", "dailyTo"]
FIELDS += [f"wave{i}_{k}" for i in range(1, MAX_WAVES + 1) for k in ("percent", "success")]


def _percent(form: Mapping[str, str], key: str, label: str) -> float | None:
    text = form.get(key, "").strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError as exc:
        raise BadRequest(f"{label} must be a number") from exc


def scope_of(form: Mapping[str, str]) -> dict[str, Any]:
    return dict(jobspec.body_from_form(form).get("scope", {}))


def body_of(form: Mapping[str, str]) -> dict[str, Any]:
    """The POST /jobs body the form describes. Raises BadRequest naming the field."""
    body = jobspec.body_from_form(form)
    body["type"] = "upgrade"
    body.setdefault("scope", {})
    if not body.get("firmwareId"):
        raise BadRequest("choose a firmware")
    if "abort" in body and "failureRatio" not in body["abort"]:
        del body["abort"]  # "after at least N finished" means nothing without a threshold
    waves = []
    for i in range(1, MAX_WAVES + 1):
        pct = _percent(form, f"wave{i}_percent", f"wave {i} percent")
        ok = _percent(form, f"wave{i}_success", f"wave {i} success")
        if pct is None:
            if ok is not None:
                raise BadRequest(f"wave {i}: give its percent of devices too")
            continue
        wave: dict[str, Any] = {"percent": pct}
        if ok is not None:
            wave["successRatio"] = ok / 100
        waves.append(wave)
    if waves:
        body["waves"] = waves
    schedule = body.setdefault("schedule", {})
    if form.get("dailyFrom", "").strip() or form.get("dailyTo", "").strip():
        schedule["dailyWindow"] = [form.get("dailyFrom", "").strip(), form.get("dailyTo", "").strip()]
    if not schedule:
        del body["schedule"]
    return body


def _form(data: Mapping[str, Any]) -> dict[str, str]:
    return {k: str(data.get(k, "")) for k in FIELDS}


async def _firmware_choices(request: web.Request) -> list[dict[str, Any]]:
    items, _ = await otabox(request).store.list_firmware(None, 1000, 0)
    return [present.firmware(f) for f in items]


async def _preview(request: web.Request, form: dict[str, str]) -> dict[str, Any]:
    """Matching devices of the scope in the form: {"count", "sample", "firmware", "error"}."""
    app = otabox(request)
    out: dict[str, Any] = {"count": None, "busy": 0, "sample": [], "firmware": None, "error": ""}
    if not form.get("firmwareId"):
        out["error"] = "Choose a firmware to see the devices that match."
        return out
    fw = await app.store.get_firmware(form["firmwareId"])
    if fw is None:
        out["error"] = "That firmware no longer exists."
        return out
    out["firmware"] = present.firmware(fw)
    try:
        scope = jobspec.parse_scope({"scope": scope_of(form)})
    except OtaboxError as exc:
        out["error"] = exc.message
        return out
    devices, busy = await app.store.scope_devices(fw.product_key, scope, fw.version)
    out["count"] = len(devices)
    out["busy"] = busy
    out["sample"] = [present.device(d) for d in devices[:SAMPLE]]
    return out


async def new_job(request: web.Request) -> web.Response:
    form = _form(request.query)
    form["mode"] = form["mode"] or "push"
    form["policy"] = form["policy"] or "snapshot"
    return await _render_form(request, form, "")


async def _render_form(request: web.Request, form: dict[str, str], error: str) -> web.Response:
    """The form (again), with `error` on top when it was refused; 200 either way, as forms are re-shown."""
    ctx = {
        "form": form,
        "error": error,
        "firmware": await _firmware_choices(request),
        "preview": await _preview(request, form),
        "max_waves": MAX_WAVES,
        "pace": PACE,
        "retry_abort": RETRY_ABORT,
        "tz": jobspec.FIELDS["schedule.timezoneOffsetMinutes"],
        "downgrade": jobspec.FIELDS["allowDowngrade"],
        "delta": jobspec.FIELDS["delta"],
    }
    return render(request, "job_new.html", ctx)


async def scope_preview(request: web.Request) -> web.Response:
    return html(fragment(request, "_scope_preview.html", {"preview": await _preview(request, _form(request.query))}))


async def submit(request: web.Request) -> web.Response:
    """One handler for the three buttons: review (form -> review), edit (review -> form), start."""
    app = otabox(request)
    form = _form(await request.post())
    step = str((await request.post()).get("step", "review"))
    if step == "edit":
        return await _render_form(request, form, "")
    try:
        body = body_of(form)
        spec = jobspec.validate(body)
        if step == "start":
            job, _warnings = await app.jobs.create(body)
            return see_other(f"/ui/jobs/{job.id}")
    except OtaboxError as exc:
        return await _render_form(request, form, exc.message)
    preview = await _preview(request, form)
    fw = preview["firmware"]
    if fw is None:
        return await _render_form(request, form, preview["error"] or "choose a firmware")
    shown = jobspec.to_json(spec)
    sizes = rollout.wave_sizes(preview["count"] or 0, spec.waves) if spec.waves else []
    ctx = {
        "form": form,
        "body": body,
        "spec": shown,
        "fw": fw,
        "preview": preview,
        "waves": list(zip(shown.get("waves", []), sizes, strict=True)),
        "name": body.get("name") or f"upgrade {fw['name']} {fw['version']}",
        "blocked": fw["enableVerification"] and fw["status"] != "verified",
    }
    return render(request, "job_review.html", ctx)


def add_routes(sub: web.Application) -> None:
    r = sub.router
    r.add_get("/jobs/new", new_job)
    r.add_get("/jobs/scope", scope_preview)
    r.add_post("/jobs/submit", submit)
