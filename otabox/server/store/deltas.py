"""SQL of binary deltas between firmware (made by otabox.server.deltas)."""

from __future__ import annotations

from otabox.models import Delta, Firmware
from otabox.server.store import rows
from otabox.server.store.base import StoreBase


class DeltaSQL(StoreBase):
    async def get_delta(self, from_id: str, to_id: str) -> Delta | None:
        r = await self._one("SELECT * FROM deltas WHERE from_id = ? AND to_id = ?", (from_id, to_id))
        return None if r is None else rows.delta(r)

    async def put_delta(self, d: Delta) -> None:
        """Record a made (or failed) delta; a later one for the same pair replaces it."""
        await self._write(
            "INSERT INTO deltas (from_id, to_id, from_version, algorithm, status, size, md5, sha256,"
            " seconds, error, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (from_id, to_id) DO UPDATE SET from_version = excluded.from_version,"
            " algorithm = excluded.algorithm, status = excluded.status, size = excluded.size, md5 = excluded.md5,"
            " sha256 = excluded.sha256, seconds = excluded.seconds, error = excluded.error,"
            " created_at = excluded.created_at",
            (
                d.from_id,
                d.to_id,
                d.from_version,
                d.algorithm,
                d.status,
                d.size,
                d.md5,
                d.sha256,
                d.seconds,
                d.error,
                d.created_at,
            ),
        )

    async def deltas_of(self, firmware_id: str) -> list[Delta]:
        """Deltas from or to a firmware (to drop them with it)."""
        found = await self._all("SELECT * FROM deltas WHERE from_id = ? OR to_id = ?", (firmware_id, firmware_id))
        return [rows.delta(r) for r in found]

    async def delete_deltas_of(self, firmware_id: str) -> None:
        await self._write("DELETE FROM deltas WHERE from_id = ? OR to_id = ?", (firmware_id, firmware_id))

    async def firmware_of_line(self, product_key: str, name: str, version: str) -> Firmware | None:
        """The firmware of a line (product, name) at `version`: what a device on that version runs."""
        r = await self._one(
            "SELECT * FROM firmware WHERE product_key = ? AND name = ? AND version = ?", (product_key, name, version)
        )
        return None if r is None else rows.firmware(r)

    async def line_firmware(self, product_key: str, name: str) -> list[Firmware]:
        """Every firmware of a line (product, name), newest first."""
        found = await self._all(
            "SELECT * FROM firmware WHERE product_key = ? AND name = ? ORDER BY created_at DESC", (product_key, name)
        )
        return [rows.firmware(r) for r in found]

    async def stored_digests(self) -> set[str]:
        """The sha256 of every file the store refers to: firmware and deltas."""
        found = await self._all("SELECT sha256 FROM firmware UNION SELECT sha256 FROM deltas WHERE sha256 != ''")
        return {r["sha256"] for r in found}
