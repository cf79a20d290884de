"""Typed loading and derived tables for the upgrade-log export (`otabox export`).

Everything below `load()` is a pure function of DataFrames shaped like `load()` returns
(or like `coerce()` makes from raw records), so notebooks and tests share one definition
of "a task succeeded", "a failure at the download step" and so on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from pandas.tseries.frequencies import to_offset

from otabox.export import schema
from otabox.models import ACTIVE, FAILURES, FINISHED

TASK_STATUSES = list(schema.TASK_STATUSES)
ACTIVE_STATUSES = [s.value for s in ACTIVE]
FINAL_STATUSES = [s.value for s in FINISHED]
FAILURE_STATUSES = [s.value for s in FAILURES]
STEP_LABELS = [
    "download", "verify", "flash", "declined", "upgrade",
    "device-defined", "unexpected version", "timeout", "rolled back", "other",
]  # fmt: skip
_CODE_LABELS = {-1: "upgrade", -2: "download", -3: "verify", -4: "flash", -5: "declined"}
TASK_KEY = ["jobId", "deviceKey"]

# Column name -> type, per table: the export's own schema (otabox.export.schema).
SCHEMAS: dict[str, dict[str, Any]] = schema.SCHEMAS


@dataclass(frozen=True, slots=True, eq=False)
class Export:
    """One export: the events plus the snapshot tables (empty when their file is absent)."""

    events: pd.DataFrame
    jobs: pd.DataFrame
    firmware: pd.DataFrame
    devices: pd.DataFrame


def load(path: str | Path) -> Export:
    """Read an export (`.csv`, `.jsonl` or `.parquet`) and its snapshot files next to it.

    Returns an `Export` of typed frames (see `coerce`), events sorted by `seq`. Raises
    FileNotFoundError when the events file is missing, ValueError for an unknown extension.
    Snapshot files `<stem>.jobs|firmware|devices.<ext>` are optional.
    """
    path = Path(path)
    if path.suffix not in (".csv", ".jsonl", ".parquet"):
        raise ValueError(f"unsupported export format {path.suffix!r}: use .csv, .jsonl or .parquet")
    tables = {}
    for table in SCHEMAS:
        file = path if table == "events" else path.with_name(f"{path.stem}.{table}{path.suffix}")
        raw = _read(file) if table == "events" or file.exists() else pd.DataFrame()
        tables[table] = coerce(raw, table)
    events = tables["events"].sort_values("seq", kind="stable").reset_index(drop=True)
    return Export(events, tables["jobs"], tables["firmware"], tables["devices"])


def _read(file: Path) -> pd.DataFrame:
    """Read one file as untyped values; CSV cells stay strings so "007" keeps its zeros."""
    if file.suffix == ".csv":
        return pd.read_csv(file, dtype=str, keep_default_na=False, na_values=[""])
    if file.suffix == ".parquet":
        return pd.read_parquet(file)
    with file.open(encoding="utf-8") as lines:
        return pd.DataFrame.from_records([json.loads(line) for line in lines if line.strip()])


def coerce(frame: pd.DataFrame, table: str = "events") -> pd.DataFrame:
    """Return a copy of raw `frame` typed per the export contract for `table`.

    Strings become `string`, ints nullable `Int64`, times tz-aware UTC (microseconds),
    enums categoricals with the full category list (unknown values are appended, never
    dropped), JSON columns compact JSON text. Missing contract columns are added as null;
    extra columns are kept after them. Raises ValueError for values that do not parse.
    """
    schema = SCHEMAS[table]
    out = pd.DataFrame(index=frame.index)
    for column, kind in schema.items():
        values = frame[column] if column in frame else pd.Series(None, index=frame.index, dtype=object)
        out[column] = _convert(values, kind)
    for column in frame.columns.difference(list(schema), sort=False):
        out[column] = frame[column]
    return out.reset_index(drop=True)


def _convert(values: pd.Series, kind: Any) -> pd.Series:
    """Convert one raw column to its contract type."""
    values = values.astype(object).where(values.notna(), None)
    if isinstance(kind, list):
        extra = sorted({str(v) for v in values.dropna()} - set(kind))
        return pd.Series(pd.Categorical(values, categories=kind + extra), index=values.index)
    if kind == "int":
        return pd.to_numeric(values).astype("Int64")
    if kind == "float":
        return pd.to_numeric(values).astype("Float64")
    if kind == "time":
        return pd.to_datetime(values, utc=True, format="ISO8601").dt.as_unit("us")
    if kind == "bool":
        truth = {"true": True, "1": True, "false": False, "0": False}
        return values.map(lambda v: v if v is None else truth[str(v).lower()]).astype("boolean")
    if kind == "json":
        values = values.map(lambda v: v if v is None or isinstance(v, str) else json.dumps(v))
    return values.astype("string")


def empty(table: str) -> pd.DataFrame:
    """Return an empty typed frame with the contract columns of `table`."""
    return coerce(pd.DataFrame(), table)


def task_events(events: pd.DataFrame) -> pd.DataFrame:
    """The events of tasks (one device in one job): every derived table below counts only these."""
    if "kind" not in events:
        return events
    return events[events["kind"].astype(str) != "job"]


def job_events(events: pd.DataFrame, job_id: str | None = None) -> pd.DataFrame:
    """What happened to jobs as a whole (paused, resumed, canceled, aborted, waveOpened, completed,
    firmwareVerified), with who did it (`actor`: an operator, or "system" for the server's own rules)."""
    if "kind" not in events:
        return events.iloc[0:0]
    rows = events[events["kind"].astype(str) == "job"]
    rows = rows if job_id is None else rows[rows["jobId"] == job_id]
    return rows[["ts", "jobId", "status", "actor", "desc", "wave"]].reset_index(drop=True)


def job_labels(jobs: pd.DataFrame, job_ids: Sequence[str]) -> dict[str, str]:
    """jobId -> how figures name the job: its name from the jobs snapshot, the id when unnamed or absent."""
    names = {} if jobs.empty else dict(zip(jobs["id"].astype(str), jobs["name"], strict=True))
    return {j: (str(names[j]) if isinstance(names.get(j), str) and names[j] else j) for j in job_ids}


def _ordered(events: pd.DataFrame) -> pd.DataFrame:
    """Events oldest first (by `seq`, stable)."""
    return events.sort_values("seq", kind="stable")


def _for_job(events: pd.DataFrame, job_id: str | None) -> pd.DataFrame:
    """Events of one job, or all events when `job_id` is None."""
    return events if job_id is None else events[events["jobId"] == job_id]


def last_status(events: pd.DataFrame) -> pd.DataFrame:
    """Return the last event of each task (jobId, deviceKey): one row per task, in event order."""
    events = task_events(events)
    return _ordered(events).drop_duplicates(TASK_KEY, keep="last").reset_index(drop=True)


def status_counts(events: pd.DataFrame, job_id: str | None = None) -> pd.DataFrame:
    """Return per job the number of tasks in each status now: jobId, tasks, one column per status.

    These are the counts `GET /jobs/{id}` reports, computed from each task's last event.
    """
    events = task_events(events)
    last = last_status(_for_job(events, job_id))
    counts = pd.crosstab(last["jobId"].astype(str), last["status"].astype(str))
    counts = counts.reindex(columns=TASK_STATUSES, fill_value=0).astype("int64")
    counts.insert(0, "tasks", counts.sum(axis=1))
    return counts.rename_axis(index="jobId", columns=None).reset_index()


def busiest_job(events: pd.DataFrame) -> str:
    """Return the id of the job with the most tasks (ties: the job seen first). Raises ValueError if none."""
    events = task_events(events)
    if events.empty:
        raise ValueError("the export has no events")
    tasks = _ordered(events).drop_duplicates(TASK_KEY).groupby("jobId", sort=False, observed=True)
    return str(tasks.size().idxmax())


def funnel(events: pd.DataFrame, job_id: str | None = None) -> pd.DataFrame:
    """Return per job: tasks, reached_published, reached_upgrading, then last-status counts.

    A task reached "published" if any of its events has status published or later on the
    path (upgrading, succeeded), "upgrading" if any has status upgrading/succeeded or carries
    a device step (a progress report, even a failing one). succeeded, failed, timeout,
    rolledBack, canceled and active (pending/published/upgrading) come from each task's last status,
    so they add up to `tasks`.
    """
    events = task_events(events)
    events = _for_job(events, job_id)
    status = events["status"].astype(str)
    marks = pd.DataFrame({
        "jobId": events["jobId"].astype(str),
        "deviceKey": events["deviceKey"],
        "reached_published": status.isin(["published", "upgrading", "succeeded"]),
        "reached_upgrading": status.isin(["upgrading", "succeeded"]) | events["step"].notna(),
    })  # fmt: skip
    reached = marks.groupby(TASK_KEY, observed=True).any().groupby("jobId").sum()
    counts = status_counts(events).set_index("jobId")
    result = counts[["tasks"]].join(reached).fillna(0).astype("int64")
    for column in ["succeeded", "failed", "timeout", "rolledBack", "canceled"]:
        result[column] = counts[column]
    result["active"] = counts[ACTIVE_STATUSES].sum(axis=1)
    return result.reset_index()


def task_durations(events: pd.DataFrame) -> pd.DataFrame:
    """Return one row per attempt (jobId, deviceKey, attempt) with its timings.

    Columns: wave, fromVersion, toVersion, published_at, upgrading_at, finished_at (first
    time each status was reached in that attempt; NaT if never), status (last status of the
    attempt), and seconds publish_to_upgrading_s, upgrading_to_done_s, publish_to_done_s
    (float, NaN when an end is missing).
    """
    events = task_events(events)
    key = [*TASK_KEY, "attempt"]
    events = _ordered(events)
    groups = events.groupby(key, sort=False, observed=True)
    result = groups[["wave", "fromVersion", "toVersion", "status"]].last()
    status = events["status"].astype(str)
    for column, wanted in [
        ("published_at", ["published"]),
        ("upgrading_at", ["upgrading"]),
        ("finished_at", FINAL_STATUSES),
    ]:
        result[column] = events[status.isin(wanted)].groupby(key, observed=True)["ts"].min()
    result["status"] = result.pop("status")
    for column, start, end in [
        ("publish_to_upgrading_s", "published_at", "upgrading_at"),
        ("upgrading_to_done_s", "upgrading_at", "finished_at"),
        ("publish_to_done_s", "published_at", "finished_at"),
    ]:
        result[column] = (result[end] - result[start]).dt.total_seconds().astype("float64")
    return result.reset_index()


def step_labels(events: pd.DataFrame) -> pd.Series:
    """Return a categorical failure label per event (NaN for events that are not failures).

    timeout status -> "timeout"; rolledBack status -> "rolled back";
    desc starting "unexpected version" -> "unexpected version";
    step -1..-5 -> upgrade/download/verify/flash/declined; step < -5 -> "device-defined";
    any other failure -> "other".
    """
    events = task_events(events)
    status = events["status"].astype(str)
    step = events["step"].astype("Float64")
    desc = events["desc"].astype("string").fillna("")
    labels = step.map(lambda s: None if pd.isna(s) else _CODE_LABELS.get(int(s))).astype(object)
    labels = labels.where(~(step < -5).fillna(False), "device-defined")
    labels = labels.where(~desc.str.lower().str.startswith("unexpected version"), "unexpected version")
    labels = labels.fillna("other").where(status != "timeout", "timeout")
    labels = labels.where(status != "rolledBack", "rolled back")
    labels = labels.where(status.isin(FAILURE_STATUSES), None)
    return pd.Series(pd.Categorical(labels, categories=STEP_LABELS), index=events.index, name="step_label")


def failures(events: pd.DataFrame) -> pd.DataFrame:
    """Return the state changes to failed/timeout/rolledBack (one per failed attempt), with a step_label column."""
    events = task_events(events)
    # `!= "progress"` rather than `== "state"`: an export without the kind column still works.
    state = events[(events["kind"] != "progress") & events["status"].isin(FAILURE_STATUSES)]
    return _ordered(state).assign(step_label=step_labels(state))


def failure_breakdown(events: pd.DataFrame, by: str | Sequence[str] = ("step_label",)) -> pd.DataFrame:
    """Return failed attempts grouped by `by` (any event column or "step_label").

    Columns: the `by` columns, failures (failed attempts), devices (distinct deviceKeys),
    share (failures / all failures). Sorted by the `by` columns; empty groups are left out.
    """
    events = task_events(events)
    keys = [by] if isinstance(by, str) else list(by)
    failed = failures(events)
    grouped = failed.groupby(keys, observed=True, dropna=False)
    result = grouped.agg(failures=("seq", "size"), devices=("deviceKey", "nunique")).reset_index()
    result[["failures", "devices"]] = result[["failures", "devices"]].astype("int64")
    result["share"] = result["failures"] / max(len(failed), 1)
    return result.sort_values(keys, kind="stable").reset_index(drop=True)


def completion_over_time(events: pd.DataFrame, job_id: str, freq: str = "10s") -> pd.DataFrame:
    """Return cumulative finished tasks of one job per time bin of `freq`.

    Each task counts once, in the bin where it reached its final status (its last event,
    if that is a final status). Index: bin start (UTC) from the job's first to last event.
    Columns: elapsed_s (seconds from the job's first event to the bin's end, when the counts
    hold), succeeded, failed, timeout, canceled, done (their sum). Empty if the job has no events.
    `freq` must be a fixed span ("10s", "1min").
    """
    events = task_events(events)
    events = _for_job(events, job_id)
    columns = ["elapsed_s", *FINAL_STATUSES, "done"]
    if events.empty:
        return pd.DataFrame(columns=columns, index=pd.DatetimeIndex([], tz="UTC", name="ts"))
    last = last_status(events)
    done = last[last["status"].isin(FINAL_STATUSES)]
    bins = pd.date_range(events["ts"].min().floor(freq), events["ts"].max().floor(freq), freq=freq)
    counts = pd.crosstab(done["ts"].dt.floor(freq), done["status"].astype(str))
    counts = counts.reindex(index=bins, columns=FINAL_STATUSES, fill_value=0).cumsum().astype("int64")
    counts["done"] = counts.sum(axis=1)
    counts.insert(0, "elapsed_s", (bins + to_offset(freq) - events["ts"].min()).total_seconds())
    return counts.rename_axis(index="ts", columns=None)


def wave_progress(events: pd.DataFrame, job_id: str) -> pd.DataFrame:
    """Return per wave of one job: tasks, succeeded, failed (incl. timeout), canceled, active, success_ratio.

    A task belongs to the wave of its last event; success_ratio = succeeded / tasks. Empty
    when the job has no waves (all `wave` null).
    """
    events = task_events(events)
    last = last_status(_for_job(events, job_id)).dropna(subset=["wave"])
    status = last["status"].astype(str)
    table = pd.DataFrame({
        "wave": last["wave"].astype("int64"),
        "tasks": 1,
        "succeeded": status == "succeeded",
        "failed": status.isin(FAILURE_STATUSES),
        "canceled": status == "canceled",
        "active": status.isin(ACTIVE_STATUSES),
    })  # fmt: skip
    result = table.groupby("wave").sum().astype("int64")
    result["success_ratio"] = result["succeeded"] / result["tasks"]
    return result.reset_index()


def job_waves(jobs: pd.DataFrame, job_id: str) -> pd.DataFrame:
    """Return the wave plan of a job from the jobs snapshot: wave, percent, successRatio (empty if none)."""
    text = jobs.loc[jobs["id"] == job_id, "waves"].dropna()
    plan = json.loads(text.iloc[0]) if len(text) else []
    result = pd.DataFrame(plan, columns=["percent", "successRatio"]).astype("float64")
    result.insert(0, "wave", range(1, len(result) + 1))
    return result


def repeat_failures(events: pd.DataFrame, min_failures: int = 2) -> pd.DataFrame:
    """Return devices with at least `min_failures` failed attempts, across attempts and jobs.

    Columns: productKey, deviceKey, failures, jobs (distinct jobs failed in), labels and
    fromVersions (distinct values, comma-separated, in order seen), last_failure_at.
    Sorted by failures descending, then deviceKey.
    """
    events = task_events(events)
    failed = failures(events)

    def distinct(values: pd.Series) -> str:
        return ", ".join(dict.fromkeys(str(v) for v in values.dropna()))

    grouped = failed.groupby(["productKey", "deviceKey"], observed=True)
    result = grouped.agg(
        failures=("seq", "size"),
        jobs=("jobId", "nunique"),
        labels=("step_label", distinct),
        fromVersions=("fromVersion", distinct),
        last_failure_at=("ts", "max"),
    ).reset_index()
    result = result[result["failures"] >= min_failures]
    result = result.astype({"failures": "int64", "jobs": "int64"})
    return result.sort_values(["failures", "deviceKey"], ascending=[False, True]).reset_index(drop=True)


def job_summary(events: pd.DataFrame) -> pd.DataFrame:
    """Return one row per job for side-by-side comparison.

    Columns: jobId, jobType, firmwareId, toVersion, fromVersions, tasks, succeeded, failed,
    timeout, rolledBack, canceled, active, success_rate (succeeded / tasks), attempts (all attempts
    started), median_publish_to_done_s and p90_publish_to_done_s (succeeded attempts only),
    bytes_downloaded (firmware bytes served to the job's devices, full images and deltas: the
    highest count logged per task, summed) and bytes_per_task.
    """
    events = task_events(events)
    first = _ordered(events).groupby("jobId", sort=False, observed=True)
    info = first[["jobType", "firmwareId", "toVersion"]].first()
    info["fromVersions"] = first["fromVersion"].agg(lambda v: ", ".join(sorted(v.dropna().unique())))
    counts = funnel(events).set_index("jobId").drop(columns=["reached_published", "reached_upgrading"])
    result = info.join(counts)
    result["success_rate"] = result["succeeded"] / result["tasks"]
    durations = task_durations(events)
    result["attempts"] = durations.groupby("jobId", observed=True).size()
    done = durations[durations["status"] == "succeeded"].groupby("jobId", observed=True)
    result["median_publish_to_done_s"] = done["publish_to_done_s"].median()
    result["p90_publish_to_done_s"] = done["publish_to_done_s"].quantile(0.9)
    # A task's count only grows (Range resumes, a delta then the full image): its highest is its total.
    per_task = events.groupby(TASK_KEY, observed=True)["bytesDownloaded"].max()
    result["bytes_downloaded"] = per_task.groupby(level="jobId", observed=True).sum().astype("Int64")
    result["bytes_per_task"] = result["bytes_downloaded"] / result["tasks"]
    return result.rename_axis("jobId").reset_index()
