"""SQL of device identity: device certificates (by serial), certificate-only devices, dynamic activation."""

from __future__ import annotations

import time

from otabox.models import DeviceCertificate
from otabox.server.store import rows
from otabox.server.store.base import StoreBase


class IdentitySQL(StoreBase):
    async def add_certificate(self, cert: DeviceCertificate) -> None:
        await self._write(
            "INSERT INTO device_certificates (serial, product_key, device_key, fingerprint, not_after, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (cert.serial, cert.product_key, cert.device_key, cert.fingerprint, cert.not_after, cert.created_at),
        )

    async def get_certificate(self, serial: str) -> DeviceCertificate | None:
        r = await self._one("SELECT * FROM device_certificates WHERE serial = ?", (serial,))
        return None if r is None else rows.certificate(r)

    async def list_certificates(self, product_key: str, device_key: str) -> list[DeviceCertificate]:
        found = await self._all(
            "SELECT * FROM device_certificates WHERE product_key = ? AND device_key = ? ORDER BY created_at",
            (product_key, device_key),
        )
        return [rows.certificate(r) for r in found]

    async def revoke_certificate(self, product_key: str, device_key: str, serial: str) -> bool:
        """Mark it revoked (idempotent: a second revoke keeps the first time). False when unknown."""
        return (
            await self._write(
                "UPDATE device_certificates SET revoked_at = COALESCE(revoked_at, ?)"
                " WHERE serial = ? AND product_key = ? AND device_key = ?",
                (time.time(), serial, product_key, device_key),
            )
            > 0
        )

    async def revoke_all_certificates(self, product_key: str, device_key: str) -> int:
        """Revoke every certificate of a device (it is deleted: none may identify a later one of its key)."""
        return await self._write(
            "UPDATE device_certificates SET revoked_at = ?"
            " WHERE product_key = ? AND device_key = ? AND revoked_at IS NULL",
            (time.time(), product_key, device_key),
        )

    async def set_require_certificate(self, product_key: str, device_key: str, required: bool) -> bool:
        return (
            await self._write(
                "UPDATE devices SET require_certificate = ? WHERE product_key = ? AND device_key = ?",
                (1 if required else 0, product_key, device_key),
            )
            > 0
        )

    async def set_product_activation(self, product_key: str, secret_enc: str | None) -> bool:
        """Turn dynamic activation on with this (encrypted) product secret, or off with None."""
        return (
            await self._write(
                "UPDATE products SET dynamic_activation = ?, product_secret_enc = ? WHERE product_key = ?",
                (0 if secret_enc is None else 1, secret_enc, product_key),
            )
            > 0
        )

    async def product_secret(self, product_key: str) -> str | None:
        """The encrypted product secret of a product with dynamic activation on, else None."""
        r = await self._one(
            "SELECT product_secret_enc FROM products WHERE product_key = ? AND dynamic_activation = 1", (product_key,)
        )
        return None if r is None else r["product_secret_enc"]

    async def mark_activated(self, product_key: str, device_key: str) -> bool:
        """Record the device's activation once; True only the first time."""
        return (
            await self._write(
                "UPDATE devices SET activated_at = ? WHERE product_key = ? AND device_key = ? AND activated_at IS NULL",
                (time.time(), product_key, device_key),
            )
            > 0
        )
