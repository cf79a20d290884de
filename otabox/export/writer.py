"""`otabox export`: the upgrade log plus a snapshot of jobs, firmware and devices, for analysis.

Reads the data dir directly (a read-only SQLite connection, safe beside a running server)
or, with --url, a server's API. Writes PATH (events) and `<stem>.jobs|firmware|devices.<ext>`
next to it, same columns in every format (see notebooks/README.md).
"""

from __future__ import annotations

import asyncio
import csv
import json
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

from otabox.export.schema import DEVICE_COLUMNS, EVENT_COLUMNS, FIRMWARE_COLUMNS, FORMATS, JOB_COLUMNS, TASK_STATUSES
from otabox.server import present
from otabox.server.store import Store


def snapshot_path(path: Path, table: str) -> Path:
    """`rollout.csv` -> `rollout.jobs.csv`."""
    return path.with_name(f"{path.stem}.{table}{path.suffix}")


def format_of(path: Path, fmt: str | None) -> str:
    fmt = fmt or path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r} (use .csv, .jsonl or .parquet, or --format)")
    return fmt


class TableWriter:
    """Writes rows of fixed columns as CSV, JSONL or Parquet (Parquet needs pyarrow)."""

    def __init__(self, path: Path, fmt: str, columns: Iterable[str]) -> None:
        self.path, self.fmt, self.columns = path, fmt, tuple(columns)
        self.rows = 0
        self._buffer: list[dict[str, Any]] = []
        self._fh: Any = None
        if fmt == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError as exc:
                raise ValueError("Parquet export needs pyarrow (pip install pyarrow)") from exc
        else:
            self._fh = open(path, "w", encoding="utf-8", newline="")  # noqa: SIM115 - closed in close()
            if fmt == "csv":
                self._csv = csv.writer(self._fh, lineterminator="\n")
                self._csv.writerow(self.columns)

    def write(self, row: dict[str, Any]) -> None:
        self.rows += 1
        if self.fmt == "csv":
            self._csv.writerow(["" if row.get(c) is None else _cell(row.get(c)) for c in self.columns])
        elif self.fmt == "jsonl":
            self._fh.write(json.dumps({c: row.get(c) for c in self.columns}, ensure_ascii=False) + "\n")
        else:
            self._buffer.append(
                {c: _cell(row.get(c)) if isinstance(row.get(c), dict | list) else row.get(c) for c in self.columns}
            )

    def close(self) -> None:
        if self.fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pylist(self._buffer) if self._buffer else pa.table({c: [] for c in self.columns})
            pq.write_table(table, self.path)
        elif self._fh is not None:
            self._fh.close()


def _cell(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return value


def job_record(job: dict[str, Any]) -> dict[str, Any]:
    """A job as the API shows it (with `counts`) -> its row in the jobs table."""
    rec = {c: job.get(c) for c in JOB_COLUMNS}
    counts = job["counts"]
    for s in TASK_STATUSES:
        rec[s] = counts.get(s, 0)
    rec["total"] = sum(counts.get(s, 0) for s in TASK_STATUSES)
    rec["waves"] = json.dumps(job["waves"]) if job.get("waves") else None
    return rec


async def export_store(
    store: Store,
    path: Path,
    fmt: str,
    job_id: str | None,
    product_key: str | None,
    since: float | None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """Export from a Store. Returns rows written per file."""
    jobs, _ = await store.list_jobs((), 1_000_000, 0)
    if job_id:
        jobs = [j for j in jobs if j.id == job_id]
        if not jobs:
            raise LookupError(f"job {job_id!r} not found")
        product_key = product_key or jobs[0].product_key
    if product_key:
        jobs = [j for j in jobs if j.product_key == product_key]
    total = await store.count_events(job_id, product_key, since)
    events = TableWriter(path, fmt, EVENT_COLUMNS)
    try:
        async for ev in store.iter_events(job_id, product_key, since):
            events.write(present.event(ev))
            if progress and (events.rows % 2000 == 0 or events.rows == total):
                progress(events.rows, total)
    finally:
        events.close()
    out = {"events": events.rows}
    writer = TableWriter(snapshot_path(path, "jobs"), fmt, JOB_COLUMNS)
    for job in reversed(jobs):
        writer.write(job_record(present.job(job, await store.job_counts(job.id), 0)))
    writer.close()
    out["jobs"] = writer.rows
    products = [product_key] if product_key else [p.product_key for p in (await store.list_products(100_000, 0))[0]]
    writer = TableWriter(snapshot_path(path, "firmware"), fmt, FIRMWARE_COLUMNS)
    devices = TableWriter(snapshot_path(path, "devices"), fmt, DEVICE_COLUMNS)
    for pk in products:
        for fw in (await store.list_firmware(pk, 1_000_000, 0))[0]:
            writer.write(present.firmware(fw))
        offset = 0
        while True:
            batch, _ = await store.list_devices(pk, limit=5000, offset=offset)
            for d in batch:
                devices.write(present.device(d))
            if len(batch) < 5000:
                break
            offset += 5000
    writer.close()
    devices.close()
    out["firmware"], out["devices"] = writer.rows, devices.rows
    return out


async def export_data_dir(
    data_dir: Path,
    path: Path,
    fmt: str,
    job_id: str | None,
    product_key: str | None,
    since: float | None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """Export straight from a data dir, read-only (safe while the server runs)."""
    db = data_dir / "otabox.db"
    if not db.exists():
        raise FileNotFoundError(f"no otabox database in {data_dir}")
    store = await Store.open(db, read_only=True)
    try:
        return await export_store(store, path, fmt, job_id, product_key, since, progress)
    finally:
        await store.close()


async def _api_rows(client: Any, path: str, **query: Any) -> AsyncIterator[dict[str, Any]]:
    offset = 0
    while True:
        page = await asyncio.to_thread(client.get, path, limit=1000, offset=offset, **query)
        for item in page["items"]:
            yield item
        offset += len(page["items"])
        if not page["items"] or offset >= page["total"]:
            return


def export_api(
    client: Any, path: Path, fmt: str, job_id: str | None, product_key: str | None, since: str | None
) -> dict[str, int]:
    """Export through a server's API (for a server on another machine)."""
    raw = client.request(
        "GET", "/events", query={"jobId": job_id, "productKey": product_key, "since": since, "format": "jsonl"}
    )
    events = TableWriter(path, fmt, EVENT_COLUMNS)
    for line in raw.splitlines() if isinstance(raw, str) else []:
        if line.strip():
            events.write(json.loads(line))
    events.close()

    async def snapshot() -> dict[str, int]:
        jobs = TableWriter(snapshot_path(path, "jobs"), fmt, JOB_COLUMNS)
        async for job in _api_rows(client, "/jobs"):
            if (not job_id or job["id"] == job_id) and (not product_key or job["productKey"] == product_key):
                jobs.write(job_record(job))
        jobs.close()
        firmware = TableWriter(snapshot_path(path, "firmware"), fmt, FIRMWARE_COLUMNS)
        devices = TableWriter(snapshot_path(path, "devices"), fmt, DEVICE_COLUMNS)
        async for product in _api_rows(client, "/products"):
            pk = product["productKey"]
            if product_key and pk != product_key:
                continue
            async for fw in _api_rows(client, f"/products/{pk}/firmware"):
                firmware.write(fw)
            async for d in _api_rows(client, f"/products/{pk}/devices"):
                devices.write({**d, "productKey": pk})
        firmware.close()
        devices.close()
        return {"jobs": jobs.rows, "firmware": firmware.rows, "devices": devices.rows}

    return {"events": events.rows, **asyncio.run(snapshot())}
