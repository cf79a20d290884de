"""Trusted publishers and the import of signed offline bundles (`otabox.bundle` is the format).

A bundle's firmware is stored only when a trusted publisher's key verifies its manifest, every
file matches the manifest, every product exists and no version clashes: all of it, or nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from otabox import bundle
from otabox.errors import BadRequest, Conflict, Forbidden, NotFound
from otabox.models import Firmware, FirmwareStatus, Publisher
from otabox.server.artifacts import Artifacts
from otabox.server.firmware import FirmwareService, check_fields, file_name, new_firmware_id
from otabox.server.registry import check_key
from otabox.server.store import DuplicateError, Store


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


class BundleService:
    def __init__(self, store: Store, artifacts: Artifacts, firmware: FirmwareService) -> None:
        self.store = store
        self.artifacts = artifacts
        self.firmware = firmware

    # ------------------------------------------------------------ publishers

    async def add_publisher(self, body: Mapping[str, Any]) -> Publisher:
        """Trust a publisher's key. Raises BadRequest or Conflict (name or key already trusted)."""
        name = check_key(body.get("name"), "name")
        text = body.get("publicKey")
        if not isinstance(text, str):
            raise BadRequest("publicKey must be the publisher's Ed25519 public key (PEM or base64)")
        try:
            key = bundle.raw_b64(bundle.load_public(text))
        except bundle.BundleError as exc:
            raise BadRequest(f"publicKey: {exc}") from exc
        try:
            return await self.store.create_publisher(name, key)
        except DuplicateError as exc:
            raise Conflict(f"publisher {name!r} or this key is already trusted", code="duplicate") from exc

    async def remove_publisher(self, name: str) -> None:
        """Stop trusting a publisher (its firmware stays). Raises NotFound."""
        if not await self.store.delete_publisher(name):
            raise NotFound(f"publisher {name!r} not found")

    # ------------------------------------------------------------ import

    async def import_bundle(self, path: Path) -> list[Firmware]:
        """Check the bundle at `path` and store its firmware (all or none).

        Raises Forbidden (no trusted publisher signed it), BadRequest (damaged, does not match its
        manifest, unknown product, bad fields), Conflict (a version already stored).
        """
        trusted = {p.name: bundle.load_public(p.public_key) for p in await self.store.list_publishers()}
        if not trusted:
            raise Forbidden("no publisher is trusted yet: add the vendor's key first (otabox publisher add)")
        try:
            checked, files = await asyncio.to_thread(
                bundle.check, path, trusted, self.artifacts.tmp, max_bytes=self.firmware.max_upload_bytes
            )
        except bundle.UnknownPublisher as exc:
            raise Forbidden(str(exc), code="untrusted") from exc
        except bundle.BundleError as exc:
            raise BadRequest(str(exc), code="bad-bundle") from exc
        adopted: list[str] = []
        try:
            records = []
            for entry in checked.entries:
                if await self.store.get_product(entry.product_key) is None:
                    raise BadRequest(f"the bundle is for product {entry.product_key!r}, which does not exist here")
                name, version, desc = check_fields(entry.name, entry.version, entry.desc)
                clash = await self.store.firmware_conflict(entry.product_key, name, version)
                if clash:
                    raise Conflict(
                        f"firmware {name} {version} already exists in product {entry.product_key!r}", code="duplicate"
                    )
                md5 = await asyncio.to_thread(_md5, files[entry.member])
                stored = self.artifacts.adopt(files[entry.member], entry.sha256, entry.size, md5)
                adopted.append(stored.sha256)
                await self.artifacts.share(stored.sha256)
                records.append(
                    Firmware(
                        id=new_firmware_id(),
                        product_key=entry.product_key,
                        name=name,
                        version=version,
                        desc=desc,
                        size=stored.size,
                        md5=stored.md5,
                        sha256=stored.sha256,
                        sign_method="sha256",
                        file_name=file_name(name, version, stored.sha256),
                        status=FirmwareStatus.UNVERIFIED,
                        enable_verification=False,
                        min_success_for_verified=1,
                        signature=await self.firmware.signature_of(stored.path),
                        created_at=time.time(),
                        publisher=checked.publisher,
                    )
                )
            try:
                await self.store.create_firmware_many(records)
            except DuplicateError as exc:
                raise Conflict("a firmware of the bundle already exists", code="duplicate") from exc
        except BaseException:
            for p in files.values():
                p.unlink(missing_ok=True)
            for sha in adopted:
                if not await self.store.sha256_in_use(sha):
                    await self.artifacts.discard(sha)
            raise
        for fw in records:
            await self.firmware.deltas.uploaded(fw)
        return records
