"""New job on one page: form -> review -> start. The form maps onto a POST /jobs body.

Validation is the API's own (`jobs_api.validate_job` and `start_job`), so the console cannot
create a job the API would refuse, and its error messages name the same fields.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from otabox import jobs_api, rollout
from otabox.console.render import fragment, html, otabox, render, see_other
from otabox.errors import BadRequest, OtaboxError

MAX_WAVES = 4
SAMPLE = 10
# Fields the review page carries back and forth as hidden inputs.
FIELDS = [
    "firmwareId",
    "name",
    "versions",
    "deviceKeys",
    "tags",
    "mode",
    "policy",
    "maxConcurrency",
    "ratePerMinute",
    "start",
    "end",
    "dailyFrom",
    "dailyTo",
    "tzOffset",
    "timeoutSeconds",
    "retryCount",
    "retryInterval",
    "abortPercent",
    "abortMinFinished",
] + [f"wave{i}_{k}" for i in range(1, MAX_WAVES + 1) for k in ("percent", "success")]

LABELS = {
    "maxConcurrency": "Max concurrency",
    "ratePerMinute": "Rate per minute",
    "tzOffset": "Time zone offset",
    "timeoutSeconds": "Timeout",
    "retryCount": "Retry count",
    "retryInterval": "Retry interval",
    "abortPercent": "Abort threshold",
    "abortMinFinished": "Abort after finished",
}


def _split(text: str) -> list[str]:
    return [x for x in re.split(r"[\s,;]+", text.strip()) if x]


def _number(form: dict[str, str], key: str, *, integer: bool = False) -> float | int | None:
    text = form.get(key, "").strip()
    if not text:
        return None
    label = LABELS.get(key, key)
    try:
        value = float(text)
    except ValueError as exc:
        raise BadRequest(f"{label} must be a number") from exc
    if integer:
        if value != int(value):
            raise BadRequest(f"{label} must be a whole number")
        return int(value)
    return value


def _tags(text: str) -> dict[str, list[str]]:
    tags: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        key, sep, values = line.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise BadRequest(f"tags: write one tag per line as key=value[,value…] (got {line.strip()!r})")
        tags.setdefault(key.strip(), []).extend(v.strip() for v in values.split(",") if v.strip())
    return tags


def scope_of(form: dict[str, str]) -> dict[str, Any]:
    scope: dict[str, Any] = {}
    if versions := _split(form.get("versions", "")):
        scope["versionNumbers"] = versions
    if keys := _split(form.get("deviceKeys", "")):
        scope["deviceKeys"] = keys
    if tags := _tags(form.get("tags", "")):
        scope["tags"] = tags
    return scope


def body_of(form: dict[str, str]) -> dict[str, Any]:
    """The POST /jobs body the form describes. Raises BadRequest naming the field."""
    body: dict[str, Any] = {
        "firmwareId": form.get("firmwareId", ""),
        "type": "upgrade",
        "scope": scope_of(form),
        "mode": form.get("mode") or "push",
        "policy": form.get("policy") or "snapshot",
    }
    if not body["firmwareId"]:
        raise BadRequest("choose a firmware")
    if form.get("name", "").strip():
        body["name"] = form["name"].strip()
    for key in ("maxConcurrency",):
        if (v := _number(form, key, integer=True)) is not None:
            body[key] = v
    for key in ("ratePerMinute", "timeoutSeconds"):
        if (v := _number(form, key)) is not None:
            body[key] = v
    retry_count = _number(form, "retryCount", integer=True)
    retry_interval = _number(form, "retryInterval")
    if retry_count is not None or retry_interval is not None:
        body["retry"] = {"count": retry_count or 0, "intervalSeconds": retry_interval or 0}
    abort = _number(form, "abortPercent")
    if abort is not None:
        body["abort"] = {
            "failureRatio": abort / 100,
            "minFinished": _number(form, "abortMinFinished", integer=True) or 1,
        }
    waves = []
    for i in range(1, MAX_WAVES + 1):
        pct = _number(form, f"wave{i}_percent")
        ok = _number(form, f"wave{i}_success")
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
    schedule: dict[str, Any] = {}
    for key in ("start", "end"):
        if form.get(key, "").strip():
            schedule[key] = form[key].strip()
    if form.get("dailyFrom", "").strip() or form.get("dailyTo", "").strip():
        schedule["dailyWindow"] = [form.get("dailyFrom", "").strip(), form.get("dailyTo", "").strip()]
        schedule["timezoneOffsetMinutes"] = _number(form, "tzOffset", integer=True) or 0
    if schedule:
        body["schedule"] = schedule
    return body


def _form(data: Mapping[str, Any]) -> dict[str, str]:
    return {k: str(data.get(k, "")) for k in FIELDS}


async def _firmware_choices(request: web.Request) -> list[dict[str, Any]]:
    items, _ = await otabox(request).store.list_firmware(None, 1000, 0)
    return items


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
    out["firmware"] = fw
    try:
        scope = jobs_api.validate_job({"scope": scope_of(form)})["scope"]
    except OtaboxError as exc:
        out["error"] = exc.message
        return out
    devices, busy = await app.store.scope_devices(fw["productKey"], scope, fw["version"])
    out["count"] = len(devices)
    out["busy"] = busy
    out["sample"] = devices[:SAMPLE]
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
        spec = jobs_api.validate_job(body)
        if step == "start":
            job = await jobs_api.start_job(app, body)
            return see_other(f"/ui/jobs/{job['id']}")
    except OtaboxError as exc:
        return await _render_form(request, form, exc.message)
    preview = await _preview(request, form)
    fw = preview["firmware"]
    if fw is None:
        return await _render_form(request, form, preview["error"] or "choose a firmware")
    waves = tuple(rollout.Wave(w["percent"], w.get("successRatio")) for w in spec.get("waves", ()))
    sizes = rollout.wave_sizes(preview["count"] or 0, waves) if waves else []
    ctx = {
        "form": form,
        "body": body,
        "spec": spec,
        "fw": fw,
        "preview": preview,
        "waves": list(zip(spec.get("waves", []), sizes, strict=True)),
        "name": body.get("name") or f"upgrade {fw['name']} {fw['version']}",
        "blocked": fw["enableVerification"] and fw["status"] != "verified",
    }
    return render(request, "job_review.html", ctx)


def add_routes(sub: web.Application) -> None:
    r = sub.router
    r.add_get("/jobs/new", new_job)
    r.add_get("/jobs/scope", scope_preview)
    r.add_post("/jobs/submit", submit)
