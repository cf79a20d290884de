"""Who may do what: each state-changing request's audit action and the role it needs. Pure.

One table for the API (`/api/v1/...`) and the console's forms (`/ui/...`), so a viewer is
refused the same write wherever it comes from. Reads need `viewer`; a write path missing from
the table needs `admin` (a new route is locked until it is placed here).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from otabox.models import Role

API = "/api/v1"
UI = "/ui"


@dataclass(frozen=True, slots=True)
class Rule:
    method: str
    pattern: re.Pattern[str]
    action: str
    role: Role


def _rule(method: str, path: str, action: str, role: Role) -> Rule:
    # {name} matches one path segment.
    regex = re.sub(r"\\\{[a-z]+\\\}", "[^/]+", re.escape(path))
    return Rule(method, re.compile(f"^{regex}$"), action, role)


OP, AD, VW = Role.OPERATOR, Role.ADMIN, Role.VIEWER
RULES: tuple[Rule, ...] = (
    # The API.
    _rule("POST", API + "/products", "product.create", AD),
    _rule("PATCH", API + "/products/{pk}", "product.update", AD),
    _rule("POST", API + "/products/{pk}:rotate-secret", "product.rotate-secret", AD),
    _rule("POST", API + "/products/{pk}/devices", "device.create", AD),
    _rule("POST", API + "/products/{pk}/devices:import", "device.import", AD),
    _rule("PATCH", API + "/products/{pk}/devices/{dk}", "device.update", AD),
    _rule("DELETE", API + "/products/{pk}/devices/{dk}", "device.delete", AD),
    _rule("POST", API + "/products/{pk}/devices/{dk}:rotate-secret", "device.rotate-secret", AD),
    _rule("POST", API + "/products/{pk}/devices/{dk}/certificates", "device.certificate.issue", AD),
    _rule("DELETE", API + "/products/{pk}/devices/{dk}/certificates/{serial}", "device.certificate.revoke", AD),
    _rule("POST", API + "/products/{pk}/firmware", "firmware.upload", OP),
    _rule("DELETE", API + "/firmware/{id}", "firmware.delete", OP),
    _rule("POST", API + "/publishers", "publisher.add", AD),
    _rule("DELETE", API + "/publishers/{name}", "publisher.remove", AD),
    _rule("POST", API + "/bundles", "bundle.import", AD),
    _rule("POST", API + "/backup", "backup.create", AD),
    _rule("POST", API + "/jobs", "job.create", OP),
    _rule("POST", API + "/jobs/{id}/pause", "job.pause", OP),
    _rule("POST", API + "/jobs/{id}/resume", "job.resume", OP),
    _rule("POST", API + "/jobs/{id}/cancel", "job.cancel", OP),
    _rule("POST", API + "/jobs/{id}/tasks:cancel", "task.cancel", OP),
    _rule("POST", API + "/jobs/{id}/tasks:retry", "task.retry", OP),
    _rule("POST", API + "/webhooks", "webhook.add", AD),
    _rule("DELETE", API + "/webhooks/{id}", "webhook.remove", AD),
    _rule("POST", API + "/users", "user.add", AD),
    _rule("PATCH", API + "/users/{name}", "user.update", AD),
    _rule("DELETE", API + "/users/{name}", "user.remove", AD),
    # Every user manages their own tokens (the service keeps them to their own).
    _rule("POST", API + "/tokens", "token.create", VW),
    _rule("DELETE", API + "/tokens/{id}", "token.revoke", VW),
    # Reads any role may make, named for the audit of who looked.
    _rule("GET", API + "/nodes", "node.list", VW),
    # Reads only an admin may make.
    _rule("GET", API + "/users", "user.list", AD),
    _rule("GET", API + "/audit", "audit.read", AD),
    _rule("GET", API + "/webhooks", "webhook.list", AD),
    _rule("GET", API + "/webhooks/{id}/deliveries", "webhook.deliveries", AD),
    # The console's forms.
    _rule("POST", UI + "/products", "product.create", AD),
    _rule("POST", UI + "/products/{pk}/dynamic-activation", "product.update", AD),
    _rule("POST", UI + "/products/{pk}/rotate-secret", "product.rotate-secret", AD),
    _rule("POST", UI + "/products/{pk}/devices", "device.create", AD),
    _rule("POST", UI + "/products/{pk}/devices:import", "device.import", AD),
    _rule("POST", UI + "/devices/{pk}/{dk}/tags", "device.update", AD),
    _rule("POST", UI + "/devices/{pk}/{dk}/rotate-secret", "device.rotate-secret", AD),
    _rule("POST", UI + "/devices/{pk}/{dk}/delete", "device.delete", AD),
    _rule("POST", UI + "/devices/{pk}/{dk}/require-certificate", "device.update", AD),
    _rule("POST", UI + "/devices/{pk}/{dk}/certificates", "device.certificate.issue", AD),
    _rule("POST", UI + "/devices/{pk}/{dk}/certificates/{serial}/revoke", "device.certificate.revoke", AD),
    _rule("POST", UI + "/products/{pk}/firmware", "firmware.upload", OP),
    _rule("POST", UI + "/bundles", "bundle.import", AD),
    _rule("POST", UI + "/firmware/{id}/delete", "firmware.delete", OP),
    _rule("POST", UI + "/firmware/{id}/verify", "job.create", OP),
    _rule("POST", UI + "/jobs/submit", "job.create", OP),
    _rule("POST", UI + "/jobs/{id}/cancel", "job.cancel", OP),
    _rule("POST", UI + "/jobs/{id}/retry", "task.retry", OP),
    _rule("POST", UI + "/jobs/{id}/pause", "job.pause", OP),
    _rule("POST", UI + "/jobs/{id}/resume", "job.resume", OP),
    _rule("POST", UI + "/users", "user.add", AD),
    _rule("POST", UI + "/users/{name}/role", "user.update", AD),
    _rule("POST", UI + "/users/{name}/delete", "user.remove", AD),
    _rule("POST", UI + "/tokens", "token.create", VW),
    _rule("POST", UI + "/tokens/{id}/revoke", "token.revoke", VW),
    _rule("POST", UI + "/logout", "auth.sign-out", VW),
    # Console pages only an admin may read.
    _rule("GET", UI + "/users", "user.list", AD),
    _rule("GET", UI + "/users/{name}/delete", "user.list", AD),
    _rule("GET", UI + "/audit", "audit.read", AD),
    _rule("GET", UI + "/audit/export", "audit.read", AD),
)
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def rule_for(method: str, path: str) -> Rule:
    """The rule of a request; a read not in the table needs `viewer`, a write not in it `admin`."""
    for rule in RULES:
        # HEAD is a GET without the body: the same rule.
        if (rule.method == method or (method, rule.method) == ("HEAD", "GET")) and rule.pattern.match(path):
            return rule
    if method in READ_METHODS:
        return Rule(method, re.compile(""), "read", Role.VIEWER)
    return Rule(method, re.compile(""), f"{method.lower()} {path}", Role.ADMIN)


def is_write(method: str) -> bool:
    return method not in READ_METHODS
