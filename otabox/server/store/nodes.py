"""SQL of the nodes sharing one database: heartbeats and per-node presence of devices.

Each node upserts its row every heartbeat. A device's online row names the node holding its
connection (`devices.node_id`, NULL when offline): a node starting marks offline only its own
devices, and any live node marks offline those of a node whose heartbeat is too old.
"""

from __future__ import annotations

from dataclasses import dataclass

from otabox.server.store.base import StoreBase, Tx


@dataclass(frozen=True, slots=True)
class NodeRow:
    node_id: str
    started_at: float
    heartbeat_at: float
    devices_connected: int


class NodeSQL(StoreBase):
    async def heartbeat(self, node_id: str, started_at: float, now: float, devices_connected: int) -> None:
        sql = (
            "INSERT INTO nodes (node_id, started_at, heartbeat_at, devices_connected) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(node_id) DO UPDATE SET started_at = excluded.started_at,"
            " heartbeat_at = excluded.heartbeat_at, devices_connected = excluded.devices_connected"
        )
        params = (node_id, started_at, now, devices_connected)
        if self.dialect == "sqlite":
            await self._write(sql, params)  # one node: nobody else reads its heartbeat
            return
        # Not in the group commit's line but on a pooled connection (its own transaction): under
        # load that line holds seconds of progress reports, and a heartbeat waiting in it made a
        # busy node look dead to the others, which showed its devices offline and took its
        # leadership (the 50,000-device bench).
        await self.backend.fetch(sql, params)

    async def list_nodes(self) -> list[NodeRow]:
        found = await self._all("SELECT * FROM nodes ORDER BY node_id")
        return [NodeRow(r["node_id"], r["started_at"], r["heartbeat_at"], r["devices_connected"]) for r in found]

    async def forget_other_nodes(self, node_id: str) -> int:
        """On SQLite there is one node: rows left by earlier runs under other ids go."""
        return await self._write("DELETE FROM nodes WHERE node_id <> ?", (node_id,))

    async def mark_node_offline(self, node_id: str) -> int:
        """A node starting holds no connection yet: its devices (and any held by nobody) are offline."""
        return await self._write(
            "UPDATE devices SET online = 0, node_id = NULL WHERE online = 1 AND (node_id = ? OR node_id IS NULL)",
            (node_id,),
        )

    async def mark_silent_nodes_offline(self, silent_since: float) -> int:
        """Devices held by nodes whose last heartbeat is older than `silent_since` are offline."""
        return await self._write(
            "UPDATE devices SET online = 0, node_id = NULL WHERE online = 1 AND node_id IN"
            " (SELECT node_id FROM nodes WHERE heartbeat_at < ?)",
            (silent_since,),
        )

    async def online_on(self, node_id: str) -> set[tuple[str, str]]:
        """The devices the database shows online on this node."""
        found = await self._all(
            "SELECT product_key, device_key FROM devices WHERE node_id = ? AND online = 1", (node_id,)
        )
        return {(r["product_key"], r["device_key"]) for r in found}

    async def count_online_on(self, node_id: str) -> int:
        row = await self._one("SELECT COUNT(*) AS n FROM devices WHERE node_id = ? AND online = 1", (node_id,))
        return int(row["n"]) if row else 0

    async def correct_presence(
        self, node_id: str, online: list[tuple[str, str]], offline: list[tuple[str, str]]
    ) -> None:
        """In one transaction: `online` shown online on this node, `offline` offline if still shown here."""

        async def op(tx: Tx) -> None:
            if online:
                await tx.executemany(
                    "UPDATE devices SET online = 1, node_id = ? WHERE product_key = ? AND device_key = ?",
                    [(node_id, pk, dk) for pk, dk in online],
                )
            if offline:
                await tx.executemany(
                    "UPDATE devices SET online = 0, node_id = NULL WHERE product_key = ? AND device_key = ?"
                    " AND node_id = ?",
                    [(pk, dk, node_id) for pk, dk in offline],
                )

        await self.batched(op)
