"""The web console: server-rendered pages under /ui/ (aiohttp-jinja2, vendored htmx 2, Server-Sent Events).

Everything ships inside the package (templates/, static/): no CDN, no Node build. Operators sign
in with the admin token and get a server-side session cookie (HttpOnly, SameSite=Strict); every
state-changing request must carry the session's CSRF token. The REST API keeps its bearer tokens.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote, urlparse

from aiohttp import web

from otabox.errors import OtaboxError
from otabox.models import Principal
from otabox.server.http.console import (
    sse,
    views_accounts,
    views_api,
    views_devices,
    views_firmware,
    views_jobs,
    views_main,
    views_new_job,
)
from otabox.server.http.console.render import (
    CONSOLE,
    SECURITY_HEADERS,
    SESSION,
    STATIC,
    Console,
    console,
    is_htmx,
    otabox,
    render,
    see_other,
    setup_templates,
)
from otabox.server.http.console.sessions import COOKIE
from otabox.server.http.plumbing import guarded

__all__ = ["CONSOLE", "Console", "setup", "shutdown"]

log = logging.getLogger(__name__)

PREFIX = "/ui"
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def _public(path: str) -> bool:
    return path in (PREFIX + "/login",) or path.startswith(PREFIX + "/static/")


def _same_origin(request: web.Request) -> bool:
    """A browser's Origin header, when sent, must name this server (defence in depth next to CSRF)."""
    origin = request.headers.get("Origin")
    if not origin or origin == "null":
        return origin is None
    return urlparse(origin).netloc == request.host


async def _csrf_token(request: web.Request) -> str | None:
    token = request.headers.get("X-CSRF-Token") or request.query.get("csrf")
    if token is None and request.content_type == "application/x-www-form-urlencoded":
        token = str((await request.post()).get("csrf", "")) or None
    return token


@web.middleware
async def console_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Session check, CSRF check, HTML error pages and security headers for everything under /ui/."""
    try:
        resp = await _guarded(request, handler)
    except web.HTTPException as exc:
        if exc.status < 400:
            exc.headers.update(SECURITY_HEADERS)
            raise
        resp = _error_page(request, exc.status, exc.reason)
    except OtaboxError as exc:
        resp = _error_page(request, exc.status, exc.message)
    except ConnectionError:
        raise
    except Exception:
        log.exception("console error on %s %s", request.method, request.path)
        resp = _error_page(request, 500, "Internal server error; the server log has the details.")
    if not resp.prepared:
        resp.headers.update(SECURITY_HEADERS)
    return resp


async def _guarded(request: web.Request, handler: Any) -> web.StreamResponse:
    if _public(request.path):
        result: web.StreamResponse = await handler(request)
        return result
    c = console(request)
    # Event streams do not restart the idle clock: an open page alone does not keep a session alive.
    s = c.sessions.get(request.cookies.get(COOKIE), touch="text/event-stream" not in request.headers.get("Accept", ""))
    if s is not None:
        # As in the API, a removed user, a revoked token or a new role counts from the next request on.
        now = await otabox(request).accounts.recheck(Principal(s.user, s.role, s.token_id))
        if now is None:
            c.sessions.drop(s.sid)
            s = None
        else:
            s.role = now.role
    if s is None:
        if is_htmx(request):
            return web.Response(status=401, headers={"HX-Redirect": PREFIX + "/login"})
        if request.method == "GET" and "text/event-stream" not in request.headers.get("Accept", ""):
            return see_other(PREFIX + "/login?next=" + quote(request.path_qs, safe="/"))
        return _error_page(request, 401, "Sign in first.")
    request[SESSION] = s
    if request.method not in _SAFE_METHODS and (not _same_origin(request) or not s.csrf_ok(await _csrf_token(request))):
        return _error_page(request, 403, "The form was stale or came from another site; reload and try again.")
    # The same role rules and audit log as the API (otabox.server.access).
    result = await guarded(request, handler, Principal(s.user, s.role, s.token_id))
    return result


def _error_page(request: web.Request, status: int, message: str) -> web.Response:
    titles = {401: "Sign-in needed", 403: "Forbidden", 404: "Not found", 409: "Not possible now", 413: "Too large"}
    title = titles.get(status, "Invalid request" if status < 500 else "Server error")
    try:
        if is_htmx(request):
            # htmx swaps 2xx only: answer 200 so the message lands where the result would have.
            return render(request, "_error.html", {"title": title, "message": message}, status=200)
        return render(request, "error.html", {"title": title, "message": message, "status": status}, status=status)
    except Exception:
        log.exception("console error page failed")
        return web.Response(text=f"{title}: {message}", status=status)


# ---------------------------------------------------------------- sign in / out


def _next_path(value: str | None) -> str:
    # Only console paths: an open redirect would let a link send operators elsewhere after sign-in.
    if value and value.startswith(PREFIX + "/") and not value.startswith("//") and "\\" not in value:
        return value
    return PREFIX + "/"


async def login_form(request: web.Request) -> web.Response:
    s = console(request).sessions.get(request.cookies.get(COOKIE))
    if s is not None:
        return see_other(_next_path(request.query.get("next")))
    return render(request, "login.html", {"next": _next_path(request.query.get("next")), "error": ""})


async def login(request: web.Request) -> web.Response:
    c = console(request)
    form = await request.post()
    nxt = _next_path(str(form.get("next", "")))
    address = request.remote or "?"
    if not _same_origin(request):
        return render(request, "login.html", {"next": nxt, "error": "Sign-in must come from this page."}, 403)
    if c.limiter.locked(address):
        msg = "Too many failed sign-ins from this address; wait a minute and try again."
        return render(request, "login.html", {"next": nxt, "error": msg}, 429)
    accounts = otabox(request).accounts
    username, password = str(form.get("username", "")).strip(), str(form.get("password", ""))
    token = str(form.get("token", "")).strip()
    if username:
        who = await accounts.by_password(username, password)
    else:
        who = await accounts.by_token(token) if token else None
    if who is None:
        c.limiter.fail(address)
        log.warning("console sign-in failed from %s", address)
        await accounts.audit(
            None, "auth.failed", request.path, address, 401, f"console{' as ' + username if username else ''}"
        )
        # The form again with its message, as 200: browsers log a 4xx page as a console error.
        error = "That user name and password do not match." if username else "That token is not valid."
        return render(request, "login.html", {"next": nxt, "error": error})
    c.limiter.clear(address)
    s = c.sessions.create(who.username, who.role, who.token_id)
    log.info("console sign-in from %s", address)
    resp = see_other(nxt)
    resp.set_cookie(COOKIE, s.sid, httponly=True, samesite="Strict", path=PREFIX, secure=request.secure)
    return resp


async def logout(request: web.Request) -> web.Response:
    console(request).sessions.drop(request.cookies.get(COOKIE))
    resp = see_other(PREFIX + "/login")
    resp.del_cookie(COOKIE, path=PREFIX)
    return resp


async def to_console(request: web.Request) -> web.Response:
    return see_other(PREFIX + "/")


# ---------------------------------------------------------------- assembly


async def shutdown(web_app: web.Application) -> None:
    """on_shutdown: end every open event stream now, so the server does not wait on them to exit."""
    c = web_app.get(CONSOLE)
    if c is not None:
        c.closing.set()


def setup(web_app: web.Application) -> None:
    """Mount the console on `web_app` under /ui/ (and redirect / there); registers its on_shutdown hook."""
    web_app[CONSOLE] = Console()
    sub = web.Application(middlewares=[console_middleware])
    setup_templates(sub)
    r = sub.router
    r.add_get("/login", login_form)
    r.add_post("/login", login)
    r.add_post("/logout", logout)
    r.add_static("/static", STATIC, name="static")
    views_main.add_routes(sub)
    views_devices.add_routes(sub)
    views_firmware.add_routes(sub)
    views_new_job.add_routes(sub)
    views_jobs.add_routes(sub)
    views_accounts.add_routes(sub)
    views_api.add_routes(sub)
    sse.add_routes(sub)
    web_app.add_subapp(PREFIX, sub)
    web_app.router.add_get("/", to_console)
    web_app.router.add_get(PREFIX, to_console)
    web_app.on_shutdown.append(shutdown)
