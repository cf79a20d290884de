"""Console sign-in sessions: server-side, in memory, with an idle timeout and a CSRF token each.

A restart signs everybody out (nothing about sessions is stored on disk); that is the price of
keeping no session secrets in the database and needing no cleanup job.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass, field

from otabox.models import Role

COOKIE = "otabox_session"
# Idle timeout: an operator who walks away is signed out after this long without a request.
# Long enough for a working day of occasional clicks, short enough for a shared control room PC.
SESSION_IDLE = 8 * 3600.0
# Upper bound on sessions kept at once, so repeated sign-ins cannot grow memory without end.
MAX_SESSIONS = 1000


@dataclass(slots=True)
class Session:
    sid: str
    csrf: str
    user: str
    role: Role
    last_seen: float
    flash: list[str] = field(default_factory=list)
    token_id: str | None = None  # the personal token it signed in with (revoking it ends the session)

    def take_flash(self) -> list[str]:
        out, self.flash = self.flash, []
        return out

    def csrf_ok(self, token: str | None) -> bool:
        return token is not None and token != "" and hmac.compare_digest(token.encode(), self.csrf.encode())


class Sessions:
    """Session id -> Session; expired sessions are dropped when looked up or when space is needed."""

    def __init__(self, idle: float = SESSION_IDLE) -> None:
        self.idle = idle
        self._by_id: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def create(self, user: str, role: Role, token_id: str | None = None) -> Session:
        now = time.monotonic()
        if len(self._by_id) >= MAX_SESSIONS:
            self._prune(now)
            if len(self._by_id) >= MAX_SESSIONS:
                oldest = min(self._by_id.values(), key=lambda s: s.last_seen)
                del self._by_id[oldest.sid]
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), user, role, now, token_id=token_id)
        self._by_id[session.sid] = session
        return session

    def get(self, sid: str | None, *, touch: bool = True) -> Session | None:
        """The live session for a cookie value, or None; `touch` restarts its idle clock."""
        if not sid:
            return None
        session = self._by_id.get(sid)
        if session is None:
            return None
        now = time.monotonic()
        if now - session.last_seen > self.idle:
            del self._by_id[sid]
            return None
        if touch:
            session.last_seen = now
        return session

    def drop(self, sid: str | None) -> None:
        if sid:
            self._by_id.pop(sid, None)

    def _prune(self, now: float) -> None:
        for sid in [s.sid for s in self._by_id.values() if now - s.last_seen > self.idle]:
            del self._by_id[sid]
