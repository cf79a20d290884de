"""SQL of firmware and of the bytes each device downloaded."""

from __future__ import annotations

import time
from collections.abc import Sequence

from otabox.models import SYSTEM, Firmware, FirmwareStatus, JobEvent, Publisher
from otabox.server.store import rows
from otabox.server.store.base import DuplicateError, IntegrityError, StoreBase, Tx
from otabox.server.store.tasks import insert_job_event

_INSERT = (
    "INSERT INTO firmware (id, product_key, name, version, desc, size, md5, sha256, sign_method,"
    " file_name, enable_verification, min_success_for_verified, signature, created_at, publisher)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _values(fw: Firmware) -> tuple[object, ...]:
    return (
        fw.id,
        fw.product_key,
        fw.name,
        fw.version,
        fw.desc,
        fw.size,
        fw.md5,
        fw.sha256,
        fw.sign_method,
        fw.file_name,
        1 if fw.enable_verification else 0,
        fw.min_success_for_verified,
        fw.signature,
        fw.created_at,
        fw.publisher,
    )


class FirmwareSQL(StoreBase):
    # ------------------------------------------------------------ firmware

    async def create_firmware(self, fw: Firmware) -> Firmware:
        """Insert a firmware record. Raises DuplicateError on a name/version clash."""
        await self._write(_INSERT, _values(fw))
        return fw

    async def create_firmware_many(self, records: Sequence[Firmware]) -> None:
        """Insert several firmware records in one transaction (a bundle: all or none). Raises DuplicateError."""

        async def op(tx: Tx) -> None:
            try:
                await tx.executemany(_INSERT, [_values(fw) for fw in records])
            except IntegrityError as exc:
                raise DuplicateError(str(exc)) from exc

        await self.batched(op)

    async def firmware_conflict(self, product_key: str, name: str, version: str) -> bool:
        """True when the product's firmware line `name` already has `version`."""
        row = await self._one(
            "SELECT 1 FROM firmware WHERE product_key = ? AND name = ? AND version = ?", (product_key, name, version)
        )
        return row is not None

    async def get_firmware(self, firmware_id: str) -> Firmware | None:
        row = await self._one("SELECT * FROM firmware WHERE id = ?", (firmware_id,))
        return rows.firmware(row) if row else None

    async def list_firmware(self, product_key: str | None, limit: int, offset: int) -> tuple[list[Firmware], int]:
        where, params = ("WHERE product_key = ?", [product_key]) if product_key else ("", [])
        found = await self._all(
            f"SELECT * FROM firmware {where} ORDER BY created_at LIMIT ? OFFSET ?", (*params, limit, offset)
        )
        total = await self._one(f"SELECT COUNT(*) AS n FROM firmware {where}", params)
        return [rows.firmware(r) for r in found], total["n"] if total else 0

    async def delete_firmware(self, firmware_id: str) -> bool:
        return await self._write("DELETE FROM firmware WHERE id = ?", (firmware_id,)) > 0

    async def sha256_in_use(self, sha256: str) -> bool:
        return await self._one("SELECT 1 FROM firmware WHERE sha256 = ? LIMIT 1", (sha256,)) is not None

    async def set_firmware_status(self, firmware_id: str, status: FirmwareStatus) -> None:
        await self._write("UPDATE firmware SET status = ? WHERE id = ?", (status, firmware_id))

    async def verify_firmware(self, firmware_id: str, job_id: str, desc: str) -> bool:
        """Mark firmware verified and write its verify job's `firmwareVerified` row of the upgrade
        log (the webhook event `firmware.verified`), in one transaction: neither is seen without the
        other. False, writing nothing, when it already was verified."""

        async def op(tx: Tx) -> bool:
            changed = await tx.execute(
                "UPDATE firmware SET status = ? WHERE id = ? AND status != ?",
                (FirmwareStatus.VERIFIED, firmware_id, FirmwareStatus.VERIFIED),
            )
            if changed:
                await insert_job_event(tx, job_id, JobEvent.FIRMWARE_VERIFIED, SYSTEM, desc)
            return bool(changed)

        return await self.batched(op)

    # ------------------------------------------------------------ downloads

    async def add_download(self, product_key: str, device_key: str, firmware_id: str, nbytes: int) -> None:
        await self._write(
            "INSERT INTO downloads (product_key, device_key, firmware_id, bytes, requests, updated_at)"
            " VALUES (?, ?, ?, ?, 1, ?) ON CONFLICT(product_key, device_key, firmware_id)"
            " DO UPDATE SET bytes = downloads.bytes + excluded.bytes, requests = downloads.requests + 1,"
            " updated_at = excluded.updated_at",
            (product_key, device_key, firmware_id, nbytes, time.time()),
        )

    async def download_bytes_total(self) -> int:
        """Every firmware byte ever served (all devices, full images and deltas)."""
        row = await self._one("SELECT COALESCE(SUM(bytes), 0) AS n FROM downloads")
        return int(row["n"]) if row else 0

    async def downloaded_bytes(self, product_key: str, device_key: str, firmware_id: str) -> int:
        row = await self._one(
            "SELECT bytes FROM downloads WHERE product_key = ? AND device_key = ? AND firmware_id = ?",
            (product_key, device_key, firmware_id),
        )
        return int(row["bytes"]) if row else 0

    # ------------------------------------------------------------ trusted publishers (signed bundles)

    async def create_publisher(self, name: str, public_key: str) -> Publisher:
        """Raises DuplicateError when the name or the key is already trusted."""
        now = time.time()
        await self._write(
            "INSERT INTO publishers (name, public_key, created_at) VALUES (?, ?, ?)", (name, public_key, now)
        )
        return Publisher(name, public_key, now)

    async def list_publishers(self) -> list[Publisher]:
        return [rows.publisher(r) for r in await self._all("SELECT * FROM publishers ORDER BY name")]

    async def delete_publisher(self, name: str) -> bool:
        return await self._write("DELETE FROM publishers WHERE name = ?", (name,)) > 0
