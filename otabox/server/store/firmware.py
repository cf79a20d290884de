"""SQL of firmware and of the bytes each device downloaded."""

from __future__ import annotations

import time

from otabox.models import Firmware, FirmwareStatus
from otabox.server.store import rows
from otabox.server.store.base import StoreBase


class FirmwareSQL(StoreBase):
    # ------------------------------------------------------------ firmware

    async def create_firmware(self, fw: Firmware) -> Firmware:
        """Insert a firmware record. Raises DuplicateError on a name/version clash."""
        await self._write(
            "INSERT INTO firmware (id, product_key, name, version, desc, size, md5, sha256, sign_method,"
            " file_name, enable_verification, min_success_for_verified, signature, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
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
            ),
        )
        return fw

    async def firmware_conflict(self, product_key: str, name: str, version: str) -> str | None:
        row = await self._one(
            "SELECT name, version FROM firmware WHERE product_key = ? AND (name = ? OR version = ?)",
            (product_key, name, version),
        )
        if row is None:
            return None
        return "name" if row["name"] == name else "version"

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

    # ------------------------------------------------------------ downloads

    async def add_download(self, product_key: str, device_key: str, firmware_id: str, nbytes: int) -> None:
        await self._write(
            "INSERT INTO downloads (product_key, device_key, firmware_id, bytes, requests, updated_at)"
            " VALUES (?, ?, ?, ?, 1, ?) ON CONFLICT(product_key, device_key, firmware_id)"
            " DO UPDATE SET bytes = bytes + excluded.bytes, requests = requests + 1, updated_at = excluded.updated_at",
            (product_key, device_key, firmware_id, nbytes, time.time()),
        )

    async def downloaded_bytes(self, product_key: str, device_key: str, firmware_id: str) -> int:
        row = await self._one(
            "SELECT bytes FROM downloads WHERE product_key = ? AND device_key = ? AND firmware_id = ?",
            (product_key, device_key, firmware_id),
        )
        return int(row["bytes"]) if row else 0
