"""Firmware: receive an upload (streamed to the content store), register it, remove it.

Shared by the API and the console; the HTTP layer only turns its multipart body into parts.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from otabox import protocol
from otabox.errors import BadRequest, Conflict, NotFound
from otabox.models import Firmware, FirmwareStatus
from otabox.server.artifacts import Artifacts, StoredFile
from otabox.server.deltas import DeltaService
from otabox.server.keys import Signer
from otabox.server.registry import check_text
from otabox.server.store import DuplicateError, Store

SIGN_METHODS = ("md5", "sha256")
MAX_FIELD_BYTES = 64 * 1024
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")

# One part of an upload form: its name and its bytes, in chunks.
Part = tuple[str, AsyncIterator[bytes]]


def file_name(name: str, version: str, sha256: str) -> str:
    # Content hash in the name: the URL is immutable, so Range resumes can trust it.
    return f"{_SAFE.sub('_', name)[:40]}-{_SAFE.sub('_', version)[:40]}-{sha256[:12]}.bin"


# C0 and C1 control characters (NUL, ESC, ...); a description may still hold tabs and new lines.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_IN_TEXT = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def check_fields(name: Any, version: Any, desc: Any) -> tuple[str, str, str]:
    """A firmware's name (its line), version and description, checked. Raises BadRequest naming the field."""
    name = check_text(name, "name", max_len=64)
    if _CONTROL.search(name):
        raise BadRequest("name must not contain control characters")
    if not protocol.valid_version(version):
        raise BadRequest("version must be 1-64 printable characters")
    desc = check_text(desc, "desc", required=False, max_len=4096)
    if _CONTROL_IN_TEXT.search(desc):
        raise BadRequest("desc must not contain control characters (tabs and new lines are fine)")
    return name, str(version), desc


def new_firmware_id() -> str:
    return "fw-" + uuid.uuid4().hex[:16]


def _bool(value: Any, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no", ""):
        return value.lower() in ("true", "1", "yes")
    raise BadRequest(f"{field} must be true or false")


async def _read_field(name: str, chunks: AsyncIterator[bytes]) -> str:
    value = b""
    async for chunk in chunks:
        value += chunk
        if len(value) > MAX_FIELD_BYTES:
            raise BadRequest(f"field {name} is too long")
    return value.decode("utf-8", errors="replace")


class FirmwareService:
    def __init__(
        self, store: Store, artifacts: Artifacts, signer: Signer | None, max_upload_bytes: int, deltas: DeltaService
    ) -> None:
        self.store = store
        self.artifacts = artifacts
        self.signer = signer
        self.max_upload_bytes = max_upload_bytes
        self.deltas = deltas

    async def get(self, firmware_id: str) -> Firmware:
        """Raises NotFound."""
        fw = await self.store.get_firmware(firmware_id)
        if fw is None:
            raise NotFound(f"firmware {firmware_id!r} not found")
        return fw

    async def receive(self, product_key: str, parts: AsyncIterator[Part]) -> Firmware:
        """Store the `file` part and register it with the other parts as fields.

        Nothing is left behind when it is refused. Raises BadRequest, Conflict, TooLarge.
        """
        fields: dict[str, str] = {}
        stored: StoredFile | None = None
        try:
            async for name, chunks in parts:
                if name == "file":
                    if stored is not None:
                        raise BadRequest("only one 'file' part is allowed")
                    stored = await self.artifacts.receive(chunks, self.max_upload_bytes)
                elif name:
                    fields[name] = await _read_field(name, chunks)
            if stored is None:
                raise BadRequest("file is required")
            await self.artifacts.share(stored.sha256)
            fw = await self._register(product_key, stored, fields)
        except BaseException:
            if stored is not None and not await self.store.sha256_in_use(stored.sha256):
                await self.artifacts.discard(stored.sha256)
            raise
        await self.deltas.uploaded(fw)
        return fw

    async def signature_of(self, path: Path) -> str | None:
        """The server's Ed25519 signature of a stored file (None without a signing key)."""
        return await asyncio.to_thread(self.signer.sign_file, path) if self.signer else None

    async def _register(self, pk: str, stored: StoredFile, fields: dict[str, str]) -> Firmware:
        if stored.size == 0:
            raise BadRequest("file is empty: a 0-byte firmware cannot be flashed")
        name, version, desc = check_fields(fields.get("name"), fields.get("version"), fields.get("desc"))
        sign_method = fields.get("signMethod", "sha256") or "sha256"
        if sign_method not in SIGN_METHODS:
            raise BadRequest("signMethod must be 'md5' or 'sha256'")
        try:
            min_success = int(fields.get("minSuccessForVerified", "1") or "1")
        except ValueError as exc:
            raise BadRequest("minSuccessForVerified must be an integer") from exc
        if not 1 <= min_success <= 10:
            raise BadRequest("minSuccessForVerified must be between 1 and 10")
        if await self.store.firmware_conflict(pk, name, version):
            raise Conflict(f"firmware {name} {version} already exists in product {pk!r}", code="duplicate")
        signature = await self.signature_of(stored.path)
        fw = Firmware(
            id=new_firmware_id(),
            product_key=pk,
            name=name,
            version=version,
            desc=desc,
            size=stored.size,
            md5=stored.md5,
            sha256=stored.sha256,
            sign_method=sign_method,
            file_name=file_name(name, version, stored.sha256),
            status=FirmwareStatus.UNVERIFIED,
            enable_verification=_bool(fields.get("enableVerification", "false"), "enableVerification"),
            min_success_for_verified=min_success,
            signature=signature,
            created_at=time.time(),
        )
        try:
            return await self.store.create_firmware(fw)
        except DuplicateError as exc:
            raise Conflict(f"firmware {name} {version} already exists in product {pk!r}", code="duplicate") from exc

    async def remove(self, fw: Firmware) -> None:
        """Delete a firmware and, when no other firmware shares it, its file. Raises Conflict while a job uses it."""
        users = await self.store.jobs_using_firmware(fw.id)
        if users:
            raise Conflict(f"firmware is used by active job(s) {', '.join(users)}", code="in-use")
        made = await self.store.deltas_of(fw.id)
        await self.store.delete_deltas_of(fw.id)
        await self.store.delete_firmware(fw.id)
        self.deltas.forget(fw.id)
        for d in made:
            if d.sha256:
                await self.artifacts.discard(d.sha256)
        if not await self.store.sha256_in_use(fw.sha256):
            await self.artifacts.discard(fw.sha256)
