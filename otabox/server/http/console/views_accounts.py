"""Users, personal tokens and the audit log from the console.

Every rule is the account service's (`otabox.server.accounts`), as the API uses it: a refused form
is shown again with the service's message and the API's status, so the audit row of a console
form (written by the console's middleware, `plumbing.guarded`) reads as the API's would.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from otabox.errors import OtaboxError
from otabox.models import BUILTIN_ADMIN, ApiToken, Role, parse_iso
from otabox.server import access
from otabox.server.http import api_accounts
from otabox.server.http.console.render import PAGE_SIZE, flash, otabox, page_offset, render, see_other
from otabox.server.http.plumbing import principal

# A token's lifetime in the form: seconds (None: until revoked) and how the choice reads.
EXPIRY_CHOICES: tuple[tuple[int | None, str], ...] = (
    (None, "never (until revoked)"),
    (86400, "1 day"),
    (7 * 86400, "7 days"),
    (30 * 86400, "30 days"),
    (90 * 86400, "90 days"),
    (365 * 86400, "1 year"),
)


def token_state(t: ApiToken, now: float) -> str:
    if t.revoked_at is not None:
        return "revoked"
    if t.expires_at is not None and t.expires_at <= now:
        return "expired"
    return "active"


# ---------------------------------------------------------------- users (admin)


async def users_page(
    request: web.Request, *, error: str = "", form: dict[str, str] | None = None, status: int = 200
) -> web.Response:
    """The users page; `error` on top when a form on it was refused (with the refusal's status)."""
    store = otabox(request).store
    now = time.time()
    live = Counter(t.username for t in await store.list_tokens(None) if token_state(t, now) == "active")
    ctx = {
        "users": await store.list_users(),
        "roles": [r.value for r in Role],
        "live_tokens": live,
        "builtin": BUILTIN_ADMIN,
        "error": error,
        "form": form or {"username": "", "role": Role.VIEWER.value},
    }
    return render(request, "users.html", ctx, status)


async def add_user(request: web.Request) -> web.Response:
    form = await request.post()
    body = {"username": str(form.get("username", "")).strip(), "role": str(form.get("role", ""))}
    password = str(form.get("password", ""))
    try:
        user, made = await otabox(request).accounts.add_user(body | ({"password": password} if password else {}))
    except OtaboxError as exc:
        return await users_page(request, error=f"User not added: {exc.message}.", form=body, status=exc.status)
    if made is not None:
        return render(request, "user_password.html", {"user": user, "password": made})
    flash(request, f"Added {user.username} ({user.role}).")
    return see_other("/ui/users")


async def set_role(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    role = str((await request.post()).get("role", ""))
    try:
        user = await otabox(request).accounts.update_user(name, {"role": role})
    except OtaboxError as exc:
        return await users_page(request, error=f"Role of {name} not changed: {exc.message}.", status=exc.status)
    flash(request, f"{user.username} is now {user.role}.")
    # Who just took the admin role from themselves may no longer open the users page.
    return see_other("/ui/users" if user.username != principal(request).username else "/ui/")


async def remove_confirm(request: web.Request) -> web.Response:
    store = otabox(request).store
    user = await store.get_user(request.match_info["name"])
    if user is None:
        return await users_page(request, error=f"No user {request.match_info['name']!r}.", status=404)
    now = time.time()
    live = [t for t in await store.list_tokens(user.username) if token_state(t, now) == "active"]
    return render(request, "user_delete.html", {"user": user, "live": len(live), "builtin": BUILTIN_ADMIN})


async def remove(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    try:
        await otabox(request).accounts.remove_user(name)
    except OtaboxError as exc:
        return await users_page(request, error=f"{name} not removed: {exc.message}.", status=exc.status)
    flash(request, f"Removed {name}; its tokens and console sessions no longer work.")
    return see_other("/ui/users")


# ---------------------------------------------------------------- tokens (own; admin: all)


async def tokens_page(request: web.Request, *, error: str = "", name: str = "", status: int = 200) -> web.Response:
    who = principal(request)
    now = time.time()
    found = sorted(await otabox(request).accounts.tokens(who), key=lambda t: t.created_at, reverse=True)
    ctx = {
        "tokens": [(t, token_state(t, now)) for t in found],
        "everyone": who.role == Role.ADMIN,
        "choices": [("" if s is None else str(s), label) for s, label in EXPIRY_CHOICES],
        "error": error,
        "name": name,
    }
    return render(request, "tokens.html", ctx, status)


async def create_token(request: web.Request) -> web.Response:
    form = await request.post()
    name = str(form.get("name", "")).strip()
    expiry = {"" if s is None else str(s): s for s, _ in EXPIRY_CHOICES}
    chosen = str(form.get("expires", ""))
    if chosen not in expiry:
        return await tokens_page(request, error="Token not created: choose an expiry from the list.", status=400)
    seconds = expiry[chosen]
    body: dict[str, Any] = {"name": name} | ({"expiresInSeconds": seconds} if seconds is not None else {})
    try:
        token, secret = await otabox(request).accounts.create_token(principal(request), body)
    except OtaboxError as exc:
        return await tokens_page(request, error=f"Token not created: {exc.message}.", name=name, status=exc.status)
    return render(request, "token_secret.html", {"token": token, "secret": secret})


async def revoke_token(request: web.Request) -> web.Response:
    token_id = request.match_info["id"]
    try:
        await otabox(request).accounts.revoke_token(principal(request), token_id)
    except OtaboxError as exc:
        return await tokens_page(request, error=f"Not revoked: {exc.message}.", status=exc.status)
    flash(request, f"Revoked token {token_id}: it is refused from now on.")
    return see_other("/ui/tokens")


# ---------------------------------------------------------------- the audit log (admin)


def audit_filters(request: web.Request) -> dict[str, str]:
    """The page's filters, named as GET /api/v1/audit names them (the downloads pass them on)."""
    q = request.query
    return {k: q.get(k, "").strip() for k in ("actor", "action", "since")}


async def audit_page(request: web.Request) -> web.Response:
    store = otabox(request).store
    f = audit_filters(request)
    error = ""
    since = None
    if f["since"]:
        try:
            since = parse_iso(f["since"])
        except ValueError:
            error = "Since: write a UTC time such as 2025-01-31 or 2025-01-31T08:00."
    offset = page_offset(request)
    entries, total = ([], 0) if error else await store.audit_page(
        since, f["actor"], f["action"], PAGE_SIZE, offset
    )  # fmt: skip
    # Reads are not audited: only the actions of writes (and refused sign-ins) are ever found.
    actions = {r.action for r in access.RULES if access.is_write(r.method)} | {"auth.failed"}
    if f["action"]:
        actions.add(f["action"])
    ctx = {
        "f": f,
        "error": error,
        "entries": entries,
        "total": total,
        "offset": offset,
        "page": PAGE_SIZE,
        "actions": sorted(actions),
        "actors": [u.username for u in await store.list_users()],
        "export": urlencode({k: v for k, v in f.items() if v}),
    }
    return render(request, "audit.html", ctx)


async def export_audit(request: web.Request) -> web.StreamResponse:
    """JSONL or CSV of the audit log (the page's filters), exactly as GET /api/v1/audit answers it."""
    return await api_accounts.audit(request)


def add_routes(sub: web.Application) -> None:
    r = sub.router
    r.add_get("/users", users_page)
    r.add_post("/users", add_user)
    r.add_post("/users/{name}/role", set_role)
    r.add_get("/users/{name}/delete", remove_confirm)
    r.add_post("/users/{name}/delete", remove)
    r.add_get("/tokens", tokens_page)
    r.add_post("/tokens", create_token)
    r.add_post("/tokens/{id}/revoke", revoke_token)
    r.add_get("/audit", audit_page)
    r.add_get("/audit/export", export_audit)
