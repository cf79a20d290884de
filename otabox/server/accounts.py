"""Users, roles, personal API tokens and the audit log: who a request acts as, and what it did.

Passwords are kept as scrypt hashes (stdlib `hashlib.scrypt`, a salt each, ~50 ms to check, run
in a thread); tokens are 256-bit random strings kept as SHA-256 (they cannot be guessed, so a
slow hash would only cost each request). The first-start admin token is the built-in user
`admin`, who exists without a password until one is set.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Mapping
from typing import Any

from otabox.errors import BadRequest, Conflict, Forbidden, NotFound
from otabox.models import BUILTIN_ADMIN, ApiToken, AuditEntry, Principal, Role, User
from otabox.server.keys import hash_token
from otabox.server.store import DuplicateError, Store

USERNAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_PASSWORD = 10
MAX_PASSWORD = 1000
# A hundred years: past it an expiry time is no longer a date (Python's datetime ends at year 9999).
MAX_TOKEN_SECONDS = 100 * 365 * 86400
TOKEN_PREFIX = "otb_"
# scrypt cost: n=2^14, r=8, p=1 takes ~50 ms and 16 MiB here, the interactive-login setting.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        raw = base64.b64decode(salt), base64.b64decode(digest)
        computed = hashlib.scrypt(password.encode(), salt=raw[0], n=int(n), r=int(r), p=int(p), dklen=len(raw[1]))
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(computed, raw[1])


class AccountService:
    def __init__(self, store: Store, admin_token_hash: str) -> None:
        self.store = store
        self.admin_token_hash = admin_token_hash

    async def ensure_builtin_admin(self) -> None:
        if await self.store.get_user(BUILTIN_ADMIN) is None:
            await self.store.create_user(User(BUILTIN_ADMIN, Role.ADMIN, "", time.time()))

    # ------------------------------------------------------------ who is asking

    async def by_token(self, token: str) -> Principal | None:
        """The principal of a bearer token (the admin token, or a live personal token)."""
        hashed = hash_token(token)
        if hmac.compare_digest(hashed, self.admin_token_hash):
            return Principal(BUILTIN_ADMIN, Role.ADMIN)
        found = await self.store.token_by_hash(hashed)
        now = time.time()
        if found is None or found.revoked_at is not None or (found.expires_at is not None and found.expires_at <= now):
            return None
        user = await self.store.get_user(found.username)
        if user is None:
            return None
        if found.last_used_at is None or now - found.last_used_at > 60:
            await self.store.token_used(found.id, now)
        return Principal(user.username, user.role, found.id)

    async def by_password(self, username: str, password: str) -> Principal | None:
        user = await self.store.get_user(username)
        if user is None or not user.password_hash:
            # The same work as a real check, so a missing user is not told apart by its speed.
            await asyncio.to_thread(check_password, password, _DUMMY_HASH)
            return None
        if not await asyncio.to_thread(check_password, password, user.password_hash):
            return None
        return Principal(user.username, user.role)

    async def recheck(self, who: Principal) -> Principal | None:
        """`who` as things stand now, for a console session made at sign-in: None once the user is
        removed or the token it signed in with is revoked or expired, else the user's current role."""
        user = await self.store.get_user(who.username)
        if user is None:
            return None
        if who.token_id is not None:
            found = await self.store.get_token(who.token_id)
            if found is None or found.revoked_at is not None:
                return None
            if found.expires_at is not None and found.expires_at <= time.time():
                return None
        return Principal(user.username, user.role, who.token_id)

    # ------------------------------------------------------------ users (admin)

    async def add_user(self, body: Mapping[str, Any]) -> tuple[User, str | None]:
        """POST /users: the user, and its password when one was generated (shown once)."""
        _only(body, {"username", "role", "password"})
        username = body.get("username")
        if not isinstance(username, str) or not USERNAME.match(username):
            raise BadRequest("username must be 1-64 characters of A-Z a-z 0-9 _ . @ -")
        role = _role(body.get("role"))
        given = body.get("password")
        password = _password(given) if given is not None else secrets.token_urlsafe(15)
        user = User(username, role, await asyncio.to_thread(hash_password, password), time.time())
        try:
            await self.store.create_user(user)
        except DuplicateError as exc:
            raise Conflict(f"user {username!r} exists", code="duplicate") from exc
        return user, (password if given is None else None)

    async def update_user(self, username: str, body: Mapping[str, Any]) -> User:
        _only(body, {"role", "password"})
        if not body:
            raise BadRequest("give role or password")
        role = _role(body["role"]) if "role" in body else None
        if username == BUILTIN_ADMIN and role not in (None, Role.ADMIN):
            raise Conflict("the built-in admin stays an admin", code="builtin")
        hashed = await asyncio.to_thread(hash_password, _password(body["password"])) if "password" in body else None
        if not await self.store.update_user(username, role, hashed):
            raise NotFound(f"user {username!r} not found")
        user = await self.store.get_user(username)
        assert user is not None
        return user

    async def remove_user(self, username: str) -> None:
        if username == BUILTIN_ADMIN:
            raise Conflict("the built-in admin cannot be removed", code="builtin")
        if not await self.store.delete_user(username):
            raise NotFound(f"user {username!r} not found")

    # ------------------------------------------------------------ tokens (own; admin: all)

    async def create_token(self, who: Principal, body: Mapping[str, Any]) -> tuple[ApiToken, str]:
        _only(body, {"name", "expiresInSeconds"})
        name = body.get("name")
        if not isinstance(name, str) or not 1 <= len(name) <= 100:
            raise BadRequest("name must be a string of 1 to 100 characters")
        expires = body.get("expiresInSeconds")
        if expires is not None and (
            isinstance(expires, bool) or not isinstance(expires, int | float) or not 0 < expires <= MAX_TOKEN_SECONDS
        ):
            raise BadRequest(f"expiresInSeconds must be a positive number of at most {MAX_TOKEN_SECONDS}")
        now = time.time()
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token = ApiToken(
            id="tok-" + secrets.token_hex(6),
            username=who.username,
            name=name,
            token_hash=hash_token(secret),
            created_at=now,
            expires_at=None if expires is None else now + float(expires),
            revoked_at=None,
        )
        await self.store.create_token(token)
        return token, secret

    async def tokens(self, who: Principal) -> list[ApiToken]:
        return await self.store.list_tokens(None if who.role == Role.ADMIN else who.username)

    async def revoke_token(self, who: Principal, token_id: str) -> None:
        found = await self.store.get_token(token_id)
        if found is None or (found.username != who.username and who.role != Role.ADMIN):
            raise NotFound(f"token {token_id!r} not found")  # another user's token is none of theirs
        await self.store.revoke_token(token_id)

    # ------------------------------------------------------------ the audit log

    async def audit(
        self, who: Principal | None, action: str, target: str, address: str, status: int, details: str = ""
    ) -> None:
        await self.store.append_audit(
            AuditEntry(
                ts=time.time(),
                actor=who.username if who else "-",
                role=who.role.value if who else "-",
                action=action,
                target=target,
                remote_addr=address,
                status=status,
                details=details[:500],
            )
        )


_DUMMY_HASH = hash_password(secrets.token_urlsafe(12))


def _only(body: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = set(body) - allowed
    if unknown:
        raise BadRequest(f"unknown field(s) {sorted(unknown)}")


def _role(value: Any) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise BadRequest(f"role must be one of {', '.join(r.value for r in Role)}") from None


def _password(value: Any) -> str:
    if not isinstance(value, str) or not MIN_PASSWORD <= len(value) <= MAX_PASSWORD:
        raise BadRequest(f"password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    return value


__all__ = ["AccountService", "Forbidden", "check_password", "hash_password"]
