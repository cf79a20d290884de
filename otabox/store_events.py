"""SQL for the upgrade log (events), split from store_jobs.py by noun; mixed into Store."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

Row = dict[str, Any]


def event_row(r: sqlite3.Row) -> Row:
    return {
        "seq": r["seq"],
        "ts": r["ts"],
        "jobId": r["job_id"],
        "jobType": r["job_type"],
        "firmwareId": r["firmware_id"],
        "productKey": r["product_key"],
        "deviceKey": r["device_key"],
        "fromVersion": r["from_version"],
        "toVersion": r["to_version"],
        "status": r["status"],
        "kind": r["kind"],
        "step": r["step"],
        "desc": r["desc"],
        "attempt": r["attempt"],
        "wave": r["wave"],
        "bytesDownloaded": r["bytes_downloaded"],
    }


EVENT_COLUMNS = (
    "seq",
    "ts",
    "jobId",
    "jobType",
    "firmwareId",
    "productKey",
    "deviceKey",
    "fromVersion",
    "toVersion",
    "status",
    "kind",
    "step",
    "desc",
    "attempt",
    "wave",
    "bytesDownloaded",
)


def _event_filter(job_id: str | None, product_key: str | None, since: float | None) -> tuple[str, list[Any]]:
    where: list[str] = ["1 = 1"]
    params: list[Any] = []
    if job_id:
        where.append("job_id = ?")
        params.append(job_id)
    if product_key:
        where.append("product_key = ?")
        params.append(product_key)
    if since is not None:
        where.append("ts >= ?")
        params.append(since)
    return " AND ".join(where), params


class EventsMixin:
    """Reads of the upgrade log. Mixed into `Store`, whose connection it uses."""

    if TYPE_CHECKING:  # provided by Store

        async def _all(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]: ...

        async def _one(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None: ...

    async def count_events(self, job_id: str | None, product_key: str | None, since: float | None) -> int:
        where, params = _event_filter(job_id, product_key, since)
        row = await self._one(f"SELECT COUNT(*) AS n FROM events WHERE {where}", params)
        return row["n"] if row else 0

    async def iter_events(
        self, job_id: str | None = None, product_key: str | None = None, since: float | None = None, batch: int = 5000
    ) -> AsyncIterator[Row]:
        """The upgrade log, oldest first, in batches (constant memory)."""
        where, params = _event_filter(job_id, product_key, since)
        last = 0
        while True:
            rows = await self._all(
                f"SELECT * FROM events WHERE seq > ? AND {where} ORDER BY seq LIMIT ?", (last, *params, batch)
            )
            for r in rows:
                yield event_row(r)
            if len(rows) < batch:
                return
            last = rows[-1]["seq"]

    # ------------------------------------------------------------ web console reads

    async def recent_events(
        self,
        limit: int,
        *,
        after_seq: int = 0,
        job_id: str | None = None,
        product_key: str | None = None,
        device_key: str | None = None,
        statuses: Sequence[str] = (),
    ) -> list[Row]:
        """The newest events (newest first) after `after_seq`, filtered; for the console's log views."""
        where, params = ["seq > ?"], [after_seq]
        for column, value in (("job_id", job_id), ("product_key", product_key), ("device_key", device_key)):
            if value:
                where.append(f"{column} = ?")
                params.append(value)  # type: ignore[arg-type]
        if statuses:
            where.append(f"status IN ({','.join('?' * len(statuses))})")
            params.extend(statuses)  # type: ignore[arg-type]
        rows = await self._all(
            f"SELECT * FROM events WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?", (*params, limit)
        )
        return [event_row(r) for r in rows]

    async def last_event_seq(self, job_id: str | None = None) -> int:
        """The highest event seq (of one job, or of all); 0 when there is none."""
        if job_id:
            row = await self._one("SELECT MAX(seq) AS s FROM events WHERE job_id = ?", (job_id,))
        else:
            row = await self._one("SELECT MAX(seq) AS s FROM events")
        return int(row["s"]) if row and row["s"] is not None else 0
