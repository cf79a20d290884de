"""SQL of users, personal API tokens and the audit log (append only: nothing here edits or deletes it)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from otabox.models import ApiToken, AuditEntry, Role, User
from otabox.server.store.base import DuplicateError, Row, StoreBase, Tx


def _user(r: Row) -> User:
    return User(r["username"], Role(r["role"]), r["password_hash"], r["created_at"])


def _token(r: Row) -> ApiToken:
    return ApiToken(
        r["id"], r["username"], r["name"], r["token_hash"], r["created_at"], r["expires_at"], r["revoked_at"],
        r["last_used_at"],
    )  # fmt: skip


def _audit(r: Row) -> AuditEntry:
    return AuditEntry(
        r["ts"], r["actor"], r["role"], r["action"], r["target"], r["remote_addr"], r["status"], r["details"], r["seq"]
    )


class AccountSQL(StoreBase):
    async def create_user(self, user: User) -> None:
        """Raises DuplicateError for a username that exists."""
        await self._write(
            "INSERT INTO users (username, role, password_hash, created_at) VALUES (?, ?, ?, ?)",
            (user.username, user.role, user.password_hash, user.created_at),
        )

    async def get_user(self, username: str) -> User | None:
        r = await self._one("SELECT * FROM users WHERE username = ?", (username,))
        return None if r is None else _user(r)

    async def list_users(self) -> list[User]:
        return [_user(r) for r in await self._all("SELECT * FROM users ORDER BY username")]

    async def update_user(self, username: str, role: Role | None, password_hash: str | None) -> bool:
        sets, params = [], []
        if role is not None:
            sets.append("role = ?")
            params.append(role.value)
        if password_hash is not None:
            sets.append("password_hash = ?")
            params.append(password_hash)
        if not sets:
            return await self.get_user(username) is not None
        return bool(await self._write(f"UPDATE users SET {', '.join(sets)} WHERE username = ?", (*params, username)))

    async def delete_user(self, username: str) -> bool:
        """The user and its tokens (revoked with it)."""

        async def op(tx: Tx) -> bool:
            await tx.execute("DELETE FROM api_tokens WHERE username = ?", (username,))
            return bool(await tx.execute("DELETE FROM users WHERE username = ?", (username,)))

        return await self.batched(op)

    async def create_token(self, token: ApiToken) -> None:
        await self._write(
            "INSERT INTO api_tokens (id, username, name, token_hash, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
            (token.id, token.username, token.name, token.token_hash, token.created_at, token.expires_at),
        )

    async def token_by_hash(self, token_hash: str) -> ApiToken | None:
        r = await self._one("SELECT * FROM api_tokens WHERE token_hash = ?", (token_hash,))
        return None if r is None else _token(r)

    async def list_tokens(self, username: str | None) -> list[ApiToken]:
        if username is None:
            found = await self._all("SELECT * FROM api_tokens ORDER BY created_at")
        else:
            found = await self._all("SELECT * FROM api_tokens WHERE username = ? ORDER BY created_at", (username,))
        return [_token(r) for r in found]

    async def get_token(self, token_id: str) -> ApiToken | None:
        r = await self._one("SELECT * FROM api_tokens WHERE id = ?", (token_id,))
        return None if r is None else _token(r)

    async def revoke_token(self, token_id: str) -> None:
        await self._write(
            "UPDATE api_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (time.time(), token_id)
        )

    async def token_used(self, token_id: str, now: float) -> None:
        await self._write("UPDATE api_tokens SET last_used_at = ? WHERE id = ?", (now, token_id))

    async def append_audit(self, e: AuditEntry) -> None:
        await self._write(
            "INSERT INTO audit (ts, actor, role, action, target, remote_addr, status, details)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (e.ts, e.actor, e.role, e.action, e.target, e.remote_addr, e.status, e.details),
        )

    async def iter_audit(
        self, since: float | None, actor: str | None, action: str | None, batch: int = 5000
    ) -> AsyncIterator[AuditEntry]:
        """Matching entries, oldest first, read in batches (memory stays flat however long the log)."""
        where, params = _audit_filter(since, actor, action)
        where.insert(0, "seq > ?")
        params.insert(0, 0)
        while True:
            found = await self._all(
                f"SELECT * FROM audit WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?", (*params, batch)
            )
            for r in found:
                yield _audit(r)
            if len(found) < batch:
                return
            params[0] = found[-1]["seq"]

    async def audit_page(
        self, since: float | None, actor: str | None, action: str | None, limit: int, offset: int
    ) -> tuple[list[AuditEntry], int]:
        """One page of matching entries, newest first, and how many match in all."""
        where, params = _audit_filter(since, actor, action)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        found = await self._all(
            f"SELECT * FROM audit {clause} ORDER BY seq DESC LIMIT ? OFFSET ?", (*params, limit, offset)
        )
        total = await self._one(f"SELECT COUNT(*) AS n FROM audit {clause}", tuple(params))
        return [_audit(r) for r in found], total["n"] if total else 0


def _audit_filter(since: float | None, actor: str | None, action: str | None) -> tuple[list[str], list[object]]:
    where: list[str] = []
    params: list[object] = []
    for clause, value in (("ts >= ?", since), ("actor = ?", actor or None), ("action = ?", action or None)):
        if value is not None:
            where.append(clause)
            params.append(value)
    return where, params


__all__ = ["AccountSQL", "DuplicateError"]
