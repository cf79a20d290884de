"""SQL of the device registry: products and devices."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from otabox.models import ACTIVE, Device, EventKind, Product, TaskState, sql_list
from otabox.server.store import rows
from otabox.server.store.base import DuplicateError, IntegrityError, StoreBase, Tx
from otabox.server.store.tasks import TASK_EVENT, log_time


@dataclass(frozen=True, slots=True)
class Credentials:
    """A device's login record: its secret (encrypted), auth mode and identity rules."""

    secret_enc: str
    auth: str
    require_certificate: bool
    activated: bool  # received its secret by dynamic activation (or logged in with it since)
    dynamic_activation: bool  # its product lets registered devices log in once with the product secret


_PRODUCT = "SELECT p.*, (SELECT COUNT(*) FROM devices d WHERE d.product_key = p.product_key) AS devices FROM products p"


class RegistrySQL(StoreBase):
    # ------------------------------------------------------------ products

    async def create_product(self, product_key: str, name: str, product_secret_enc: str | None = None) -> Product:
        """With `product_secret_enc`, dynamic activation is on. Raises DuplicateError when the product exists."""
        now = time.time()
        await self._write(
            "INSERT INTO products (product_key, name, created_at, dynamic_activation, product_secret_enc)"
            " VALUES (?, ?, ?, ?, ?)",
            (product_key, name, now, 0 if product_secret_enc is None else 1, product_secret_enc),
        )
        return Product(product_key, name, now, 0, product_secret_enc is not None)

    async def get_product(self, product_key: str) -> Product | None:
        row = await self._one(f"{_PRODUCT} WHERE product_key = ?", (product_key,))
        return rows.product(row) if row else None

    async def list_products(self, limit: int, offset: int) -> tuple[list[Product], int]:
        found = await self._all(f"{_PRODUCT} ORDER BY product_key LIMIT ? OFFSET ?", (limit, offset))
        total = await self._one("SELECT COUNT(*) AS n FROM products")
        return [rows.product(r) for r in found], total["n"] if total else 0

    # ------------------------------------------------------------ devices

    async def create_devices(self, product_key: str, devices: Iterable[tuple[str, str, str, dict[str, str]]]) -> None:
        """Insert (deviceKey, secret_enc, auth, tags) rows in one transaction. Raises DuplicateError."""
        now = time.time()
        rows = [(product_key, dk, enc, auth, json.dumps(tags, sort_keys=True), now) for dk, enc, auth, tags in devices]

        async def op(tx: Tx) -> None:
            try:
                await tx.executemany(
                    "INSERT INTO devices (product_key, device_key, secret_enc, auth, tags, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    rows,
                )
            except IntegrityError as exc:
                raise DuplicateError(str(exc)) from exc

        await self.batched(op)
        await self.grew(len(rows), "devices")

    async def existing_device_keys(self, product_key: str, device_keys: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for i in range(0, len(device_keys), 500):
            chunk = list(device_keys[i : i + 500])
            marks = ",".join("?" * len(chunk))
            keys = await self._all(
                f"SELECT device_key FROM devices WHERE product_key = ? AND device_key IN ({marks})",
                (product_key, *chunk),
            )
            found.update(r["device_key"] for r in keys)
        return found

    async def get_device(self, product_key: str, device_key: str) -> Device | None:
        row = await self._one(
            "SELECT * FROM devices WHERE product_key = ? AND device_key = ?", (product_key, device_key)
        )
        return rows.device(row) if row else None

    async def device_credentials(self, product_key: str, device_key: str) -> Credentials | None:
        """What a login of the device is checked against, or None when it does not exist."""
        row = await self._one(
            "SELECT d.secret_enc, d.auth, d.require_certificate, d.activated_at, p.dynamic_activation"
            " FROM devices d JOIN products p ON p.product_key = d.product_key"
            " WHERE d.product_key = ? AND d.device_key = ?",
            (product_key, device_key),
        )
        if row is None:
            return None
        return Credentials(
            row["secret_enc"],
            row["auth"],
            bool(row["require_certificate"]),
            activated=row["activated_at"] is not None,
            dynamic_activation=bool(row["dynamic_activation"]),
        )

    async def list_devices(
        self,
        product_key: str,
        *,
        version: str | None = None,
        tags: dict[str, str] | None = None,
        online: bool | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[list[Device], int]:
        where = ["product_key = ?"]
        params: list[Any] = [product_key]
        if version is not None:
            where.append("version = ?")
            params.append(version)
        if online is not None:
            where.append("online = ?")
            params.append(1 if online else 0)
        for k, v in (tags or {}).items():
            where.append("json_extract(tags, ?) = ?")
            params.extend([f'$."{k}"', v])
        clause = " AND ".join(where)
        found = await self._all(
            f"SELECT * FROM devices WHERE {clause} ORDER BY device_key LIMIT ? OFFSET ?",
            (*params, limit, offset),
        )
        total = await self._one(f"SELECT COUNT(*) AS n FROM devices WHERE {clause}", params)
        return [rows.device(r) for r in found], total["n"] if total else 0

    async def set_device_online(self, product_key: str, device_key: str, online: bool) -> None:
        """Online on this node (`node_id`), or offline: only when this node held it (the device
        may have connected again through another node meanwhile)."""
        if online:
            await self._write(
                "UPDATE devices SET online = 1, node_id = ?, last_seen = ? WHERE product_key = ? AND device_key = ?",
                (self.node_id, time.time(), product_key, device_key),
            )
            return
        await self._write(
            "UPDATE devices SET online = 0, node_id = NULL, last_seen = ? WHERE product_key = ? AND device_key = ?"
            " AND (node_id = ? OR node_id IS NULL)",
            (time.time(), product_key, device_key, self.node_id),
        )

    async def set_device_tags(self, product_key: str, device_key: str, tags: dict[str, str]) -> bool:
        return (
            await self._write(
                "UPDATE devices SET tags = ? WHERE product_key = ? AND device_key = ?",
                (json.dumps(tags, sort_keys=True), product_key, device_key),
            )
            > 0
        )

    async def set_device_secret(self, product_key: str, device_key: str, secret_enc: str) -> bool:
        return (
            await self._write(
                "UPDATE devices SET secret_enc = ? WHERE product_key = ? AND device_key = ?",
                (secret_enc, product_key, device_key),
            )
            > 0
        )

    async def delete_device(self, product_key: str, device_key: str) -> bool:
        """Remove a device; its active task (if any) ends canceled, logged, in the same transaction.

        Its finished tasks and its upgrade log stay.
        """

        async def op(tx: Tx) -> bool:
            now = log_time()
            updated = await tx.execute(
                "UPDATE tasks SET status = ?, desc = 'device deleted', finished_at = ?, due_at = NULL,"
                " retry_at = NULL, updated_at = ? WHERE product_key = ? AND device_key = ?"
                f" AND status IN {sql_list(ACTIVE)}",
                (TaskState.CANCELED, now, now, product_key, device_key),
            )
            if updated:
                await tx.execute(
                    TASK_EVENT + " WHERE t.product_key = ? AND t.device_key = ? AND t.updated_at = ?",
                    (now, EventKind.STATE, product_key, device_key, now),
                )
            await tx.execute(
                "UPDATE tasks SET retry_at = NULL WHERE product_key = ? AND device_key = ? AND retry_at IS NOT NULL",
                (product_key, device_key),
            )
            return (
                await tx.execute(
                    "DELETE FROM devices WHERE product_key = ? AND device_key = ?", (product_key, device_key)
                )
                > 0
            )

        return await self.batched(op)

    async def touch_device(self, product_key: str, device_key: str, when: float) -> None:
        """The device was heard from at `when` (lastSeen)."""
        await self._write(
            "UPDATE devices SET last_seen = ? WHERE product_key = ? AND device_key = ?", (when, product_key, device_key)
        )

    async def set_device_version(self, product_key: str, device_key: str, version: str) -> None:
        await self._write(
            "UPDATE devices SET version = ?, last_seen = ? WHERE product_key = ? AND device_key = ?",
            (version, time.time(), product_key, device_key),
        )

    async def mark_all_offline(self) -> int:
        """At start-up of the one node on SQLite nobody is connected yet, whatever the last run left."""
        return await self._write("UPDATE devices SET online = 0, node_id = NULL WHERE online = 1")

    # ------------------------------------------------------------ web console reads

    async def device_counts(self) -> dict[str, dict[str, int]]:
        """Devices online and offline per product: {productKey: {"online": n, "offline": m}}."""
        found = await self._all("SELECT product_key, online, COUNT(*) AS n FROM devices GROUP BY product_key, online")
        out: dict[str, dict[str, int]] = {}
        for r in found:
            out.setdefault(r["product_key"], {"online": 0, "offline": 0})["online" if r["online"] else "offline"] = r[
                "n"
            ]
        return out
