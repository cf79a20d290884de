"""SQL of the upgrade log (events). Task events are written by `tasks.py` with their state change."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from otabox.models import Event, EventKind, TaskState, sql_list
from otabox.server.store import rows
from otabox.server.store.base import StoreBase


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


_OUTCOMES = (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.TIMEOUT)


class EventSQL(StoreBase):
    async def count_events(self, job_id: str | None, product_key: str | None, since: float | None) -> int:
        where, params = _event_filter(job_id, product_key, since)
        row = await self._one(f"SELECT COUNT(*) AS n FROM events WHERE {where}", params)
        return row["n"] if row else 0

    async def iter_events(
        self, job_id: str | None = None, product_key: str | None = None, since: float | None = None, batch: int = 5000
    ) -> AsyncIterator[Event]:
        """The upgrade log, oldest first, in batches (constant memory)."""
        where, params = _event_filter(job_id, product_key, since)
        last = 0
        while True:
            found = await self._all(
                f"SELECT * FROM events WHERE seq > ? AND {where} ORDER BY seq LIMIT ?", (last, *params, batch)
            )
            for r in found:
                yield rows.event(r)
            if len(found) < batch:
                return
            last = found[-1]["seq"]

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
    ) -> list[Event]:
        """The newest events (newest first) after `after_seq`, filtered; for the console's log views."""
        where, params = ["seq > ?"], [after_seq]
        for column, value in (("job_id", job_id), ("product_key", product_key), ("device_key", device_key)):
            if value:
                where.append(f"{column} = ?")
                params.append(value)  # type: ignore[arg-type]
        if statuses:
            where.append(f"status IN ({','.join('?' * len(statuses))})")
            params.extend(statuses)  # type: ignore[arg-type]
        found = await self._all(
            f"SELECT * FROM events WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?", (*params, limit)
        )
        return [rows.event(r) for r in found]

    async def last_event_seq(self, job_id: str | None = None) -> int:
        """The highest event seq (of one job, or of all); 0 when there is none."""
        if job_id:
            row = await self._one("SELECT MAX(seq) AS s FROM events WHERE job_id = ?", (job_id,))
        else:
            row = await self._one("SELECT MAX(seq) AS s FROM events")
        return int(row["s"]) if row and row["s"] is not None else 0

    async def finish_histogram(self, job_id: str, start: float, bucket: float) -> list[tuple[int, str, int]]:
        """(bucket index, status, count) of succeeded/failed/timeout events of a job, buckets of `bucket` s."""
        found = await self._all(
            "SELECT CAST((ts - ?) / ? AS INTEGER) AS b, status, COUNT(*) AS n FROM events"
            f" WHERE job_id = ? AND kind = ? AND status IN {sql_list(_OUTCOMES)}"
            " GROUP BY b, status ORDER BY b",
            (start, bucket, job_id, EventKind.STATE),
        )
        return [(max(0, int(r["b"])), r["status"], r["n"]) for r in found]
