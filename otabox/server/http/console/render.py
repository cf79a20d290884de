"""Shared console plumbing: the console's state, template rendering, filters and small helpers."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp_jinja2
import jinja2
from aiohttp import web

from otabox import rollout
from otabox.models import TASK_STATES, parse_iso
from otabox.server import access
from otabox.server.http.console.sessions import Session, Sessions
from otabox.server.http.plumbing import services
from otabox.server.services import Services
from otabox.server.throttle import LoginLimiter

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
PAGE_SIZE = 50
# No inline script or style anywhere: htmx runs with allowEval/allowScriptTags off and charts are
# SVG with presentation attributes. The data: image source is the empty favicon.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self';"
    " form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}
# Sign-in throttle per client address: failures allowed within the window before a lockout.
LOGIN_FAIL_LIMIT = 10
LOGIN_FAIL_WINDOW = 60.0

# Task state -> (fill colour, readable label). Colours keep 3:1 contrast against white (WCAG 1.4.11).
STATE_STYLE: dict[str, tuple[str, str]] = {
    "pending": ("#767676", "pending"),
    "published": ("#8250df", "published"),
    "upgrading": ("#0969da", "upgrading"),
    "succeeded": ("#1a7f37", "succeeded"),
    "failed": ("#cf222e", "failed"),
    "timeout": ("#bc4c00", "timed out"),
    "canceled": ("#57606a", "canceled"),
    "rolledBack": ("#a40e26", "rolled back"),
}


class Console:
    """Process-wide console state: sessions, the sign-in throttle and the open SSE streams."""

    def __init__(self) -> None:
        self.sessions = Sessions()
        self.limiter = LoginLimiter(LOGIN_FAIL_LIMIT, LOGIN_FAIL_WINDOW)
        # Set on shutdown: every open event stream ends within one interval.
        self.closing = asyncio.Event()
        self.streams = 0
        # Seconds between snapshots of a live page ("about one a second").
        self.interval = 1.0


CONSOLE: web.AppKey[Console] = web.AppKey("otabox-console", Console)
# The signed-in session of a request; a typed key where aiohttp has them (3.14+).
_REQUEST_KEY = getattr(web, "RequestKey", None)
SESSION: Any = _REQUEST_KEY("otabox-session", Session) if _REQUEST_KEY else "otabox-session"


def otabox(request: web.Request) -> Services:
    return services(request)


def console(request: web.Request) -> Console:
    return request.config_dict[CONSOLE]


def session(request: web.Request) -> Session:
    s: Session = request[SESSION]
    return s


def is_htmx(request: web.Request) -> bool:
    return request.headers.get("HX-Request") == "true"


def see_other(location: str) -> web.Response:
    """Post/redirect/get: a 303 to `location` (a console path)."""
    return web.Response(status=303, headers={"Location": location})


def flash(request: web.Request, message: str) -> None:
    session(request).flash.append(message)


def _allowed(s: Session | None) -> Callable[[str], bool]:
    """`allowed(path)` in templates: may this session post a form to `path` (otabox.server.access)?

    Templates show a form only when it would be accepted: a viewer sees no buttons it cannot use.
    """

    def allowed(path: str) -> bool:
        return s is not None and s.role.allows(access.rule_for("POST", path).role)

    return allowed


def _readable(s: Session | None) -> Callable[[str], bool]:
    """`readable(path)` in templates: may this session open the page at `path` (a link shown only then)?"""

    def readable(path: str) -> bool:
        return s is not None and s.role.allows(access.rule_for("GET", path).role)

    return readable


def render(request: web.Request, name: str, ctx: dict[str, Any], status: int = 200) -> web.Response:
    """A full page: the template with the base context (session, CSRF token, flash messages, role)."""
    s: Session | None = request.get(SESSION)
    base = {
        "request": request,
        "csrf": s.csrf if s else "",
        "signed_in": s is not None,
        "flashes": s.take_flash() if s else [],
        "user": s.user if s else "",
        "role": s.role.value if s else "",
        "allowed": _allowed(s),
        "readable": _readable(s),
    }
    resp = aiohttp_jinja2.render_template(name, request, {**base, **ctx}, status=status)
    resp.headers["Cache-Control"] = "no-store"
    return resp


def fragment(request: web.Request, name: str, ctx: dict[str, Any]) -> str:
    s: Session | None = request.get(SESSION)
    base = {"request": request, "csrf": s.csrf if s else "", "allowed": _allowed(s)}
    return aiohttp_jinja2.render_string(name, request, {**base, **ctx})


def html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", headers={"Cache-Control": "no-store"})


def page_offset(request: web.Request) -> int:
    try:
        return max(0, int(request.query.get("offset", "0")))
    except ValueError:
        return 0


# ---------------------------------------------------------------- template filters


def epoch(value: float | str | None) -> float | None:
    """A time as records carry it (ISO 8601 from `present`, or epoch seconds) -> epoch seconds."""
    if value is None or value == "":
        return None
    return parse_iso(value) if isinstance(value, str) else float(value)


def when(value: float | str | None) -> str:
    ts = epoch(value)
    if ts is None:
        return "\u2013"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso_attr(value: float | str | None) -> str:
    ts = epoch(value)
    return "" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ago(value: float | str | None) -> str:
    ts = epoch(value)
    if ts is None:
        return "never"
    d = max(0.0, time.time() - ts)
    if d < 60:
        return f"{int(d)} s ago"
    if d < 3600:
        return f"{int(d // 60)} min ago"
    if d < 86400:
        return f"{int(d // 3600)} h ago"
    return f"{int(d // 86400)} d ago"


def size(n: int | None) -> str:
    if n is None:
        return "\u2013"
    units = ("bytes", "KiB", "MiB", "GiB")
    i = 0 if n < 1024 else min(len(units) - 1, int(math.log(n, 1024)))
    return f"{n} bytes" if i == 0 else f"{n / 1024**i:.1f} {units[i]}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "\u2013"
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


def step_text(step: int | None) -> str:
    """A progress step as operators read it: '-2 download failed', '50 %'."""
    if step is None:
        return ""
    if step < 0:
        return f"{step} {rollout.step_label(step)}"
    return f"{step} %"


def state_label(status: str) -> str:
    return STATE_STYLE.get(status, ("", status))[1]


def query(request: web.Request, **changes: Any) -> str:
    """The current query string with `changes` applied (None removes a key)."""
    params = {k: v for k, v in request.query.items()}
    for k, v in changes.items():
        if v is None or v == "":
            params.pop(k, None)
        else:
            params[k] = str(v)
    return "?" + urlencode(params) if params else "?"


def setup_templates(sub: web.Application) -> None:
    env = aiohttp_jinja2.setup(
        sub,
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        when=when, iso=iso_attr, ago=ago, size=size, duration=duration, step=step_text, state=state_label
    )
    env.globals.update(query=query, STATE_STYLE=STATE_STYLE, TASK_STATES=[t.value for t in TASK_STATES])
