"""Unit tests of otabox.analysis on small hand-made frames, plus load() round trips."""

from __future__ import annotations

import csv
import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

pd = pytest.importorskip("pandas")
analysis = pytest.importorskip("otabox.analysis")

BASE = datetime(2026, 11, 26, 10, 0, 0, tzinfo=UTC)


def ev(job: str, device: str, status: str, **fields: Any) -> dict[str, Any]:
    """One event row; seq and ts are filled in by `events()`."""
    return {
        "jobId": job, "jobType": "upgrade", "firmwareId": f"fw-{job}", "productKey": "meter",
        "deviceKey": device, "fromVersion": "1.0.0", "toVersion": "2.0.0", "status": status,
        "kind": "state", "attempt": 1, **fields,
    }  # fmt: skip


def events(rows: list[dict[str, Any]]) -> Any:
    """Typed events frame: seq 1.. in list order, ts = BASE + seq seconds."""
    for seq, row in enumerate(rows, start=1):
        row["seq"], row["ts"] = seq, (BASE + timedelta(seconds=seq)).isoformat()
    return analysis.coerce(pd.DataFrame(rows), "events")


def scenario() -> Any:
    """Two jobs. J1 has waves: a succeeds; b is declined, then fails the download on retry; c times
    out; d is canceled while pending; e stays published. J2 has no waves: b fails again (device-
    defined), f comes back on an unexpected version, g rejects the push, h fails verification then
    succeeds on retry, k declines."""
    w1, w2 = {"wave": 1}, {"wave": 2, "fromVersion": "1.1.0"}
    v2 = {"fromVersion": "2.0.0", "toVersion": "2.1.0"}
    return events([
        ev("J1", "a", "pending", **w1),                                          # 1
        ev("J1", "a", "published", **w1),                                        # 2
        ev("J1", "a", "upgrading", step=0, bytesDownloaded=0, **w1),             # 3
        ev("J1", "a", "upgrading", kind="progress", step=50, bytesDownloaded=512, **w1),  # 4
        ev("J1", "a", "succeeded", **w1),                                        # 5
        ev("J1", "b", "pending", **w1),                                          # 6
        ev("J1", "b", "published", **w1),                                        # 7
        ev("J1", "b", "failed", step=-5, desc="declined", **w1),                 # 8
        ev("J1", "b", "published", attempt=2, **w1),                             # 9
        ev("J1", "b", "upgrading", step=0, attempt=2, **w1),                     # 10
        ev("J1", "b", "failed", step=-2, desc="download failed", attempt=2, **w1),  # 11
        ev("J1", "c", "pending", **w2),                                          # 12
        ev("J1", "c", "published", **w2),                                        # 13
        ev("J1", "c", "upgrading", step=10, **w2),                               # 14
        ev("J1", "c", "timeout", desc="timed out", **w2),                        # 15
        ev("J1", "d", "pending", **w2),                                          # 16
        ev("J1", "d", "canceled", **w2),                                         # 17
        ev("J1", "e", "pending", **w2),                                          # 18
        ev("J1", "e", "published", **w2),                                        # 19
        ev("J2", "b", "pending", toVersion="2.1.0"),                             # 20
        ev("J2", "b", "published", toVersion="2.1.0"),                           # 21
        ev("J2", "b", "upgrading", step=5, toVersion="2.1.0"),                   # 22
        ev("J2", "b", "failed", step=-9, desc="battery low", toVersion="2.1.0"),  # 23
        ev("J2", "f", "pending", **v2),                                          # 24
        ev("J2", "f", "published", **v2),                                        # 25
        ev("J2", "f", "upgrading", step=0, **v2),                                # 26
        ev("J2", "f", "failed", desc="unexpected version 9.9.9", **v2),          # 27
        ev("J2", "g", "pending", **v2),                                          # 28
        ev("J2", "g", "published", **v2),                                        # 29
        ev("J2", "g", "failed", desc="upgrade rejected: busy", **v2),            # 30
        ev("J2", "h", "pending", **v2),                                          # 31
        ev("J2", "h", "published", **v2),                                        # 32
        ev("J2", "h", "upgrading", step=0, **v2),                                # 33
        ev("J2", "h", "failed", step=-3, desc="md5 mismatch", **v2),             # 34
        ev("J2", "h", "published", attempt=2, **v2),                             # 35
        ev("J2", "h", "upgrading", step=0, attempt=2, **v2),                     # 36
        ev("J2", "h", "succeeded", attempt=2, **v2),                             # 37
        ev("J2", "k", "pending", **v2),                                          # 38
        ev("J2", "k", "published", **v2),                                        # 39
        ev("J2", "k", "failed", step=-5, desc="declined", **v2),                 # 40
    ])  # fmt: skip


def records(frame: Any) -> list[dict[str, Any]]:
    """Rows as plain dicts, with NA/NaN/NaT as None, for exact comparisons."""
    return [{k: (None if pd.isna(v) else v) for k, v in row.items()} for row in frame.to_dict("records")]


def test_coerce_types_every_column() -> None:
    frame = scenario()
    assert list(frame.columns) == list(analysis.SCHEMAS["events"])
    assert isinstance(frame["ts"].dtype, pd.DatetimeTZDtype) and str(frame["ts"].dtype.tz) == "UTC"
    # "canceled" is a task state too
    job_rows = ["paused", "resumed", "aborted", "waveOpened", "completed", "firmwareVerified"]
    assert list(frame["status"].cat.categories) == [*analysis.TASK_STATUSES, *job_rows]
    assert analysis.TASK_STATUSES[-1] == "rolledBack"
    assert list(frame["kind"].cat.categories) == ["state", "progress", "job"]
    assert list(frame["jobType"].cat.categories) == ["upgrade", "verify"]
    for column in ["seq", "step", "attempt", "wave", "bytesDownloaded"]:
        assert frame[column].dtype == "Int64", column
    assert frame["bytesDownloaded"].isna().sum() == 38  # missing in the records: null


def test_coerce_keeps_unknown_categories_and_rejects_garbage() -> None:
    frame = analysis.coerce(pd.DataFrame({"status": ["pending", "paused-ish"]}), "events")
    assert list(frame["status"].astype(str)) == ["pending", "paused-ish"]
    known = list(analysis.SCHEMAS["events"]["status"])
    assert list(frame["status"].cat.categories) == [*known, "paused-ish"]
    with pytest.raises(ValueError):
        analysis.coerce(pd.DataFrame({"step": ["35", "lots"]}), "events")


def test_status_counts() -> None:
    counts = analysis.status_counts(scenario())
    assert records(counts) == [
        {"jobId": "J1", "tasks": 5, "pending": 0, "published": 1, "upgrading": 0, "succeeded": 1,
         "failed": 1, "canceled": 1, "timeout": 1, "rolledBack": 0},
        {"jobId": "J2", "tasks": 5, "pending": 0, "published": 0, "upgrading": 0, "succeeded": 1,
         "failed": 4, "canceled": 0, "timeout": 0, "rolledBack": 0},
    ]  # fmt: skip
    assert analysis.status_counts(scenario(), "J2")["jobId"].tolist() == ["J2"]


def test_busiest_job_breaks_ties_by_first_seen() -> None:
    frame = scenario()
    assert analysis.busiest_job(frame) == "J1"  # 5 tasks each
    assert analysis.busiest_job(frame[frame["deviceKey"] != "e"]) == "J2"
    with pytest.raises(ValueError):
        analysis.busiest_job(frame.iloc[0:0])


def test_funnel() -> None:
    assert records(analysis.funnel(scenario())) == [
        # d never left pending; e was published but never started.
        {"jobId": "J1", "tasks": 5, "reached_published": 4, "reached_upgrading": 3, "succeeded": 1,
         "failed": 1, "timeout": 1, "rolledBack": 0, "canceled": 1, "active": 1},
        # g failed without a step (rejected push); k's declining step counts as a progress report.
        {"jobId": "J2", "tasks": 5, "reached_published": 5, "reached_upgrading": 4, "succeeded": 1,
         "failed": 4, "timeout": 0, "rolledBack": 0, "canceled": 0, "active": 0},
    ]  # fmt: skip
    assert analysis.funnel(scenario(), job_id="J2")["jobId"].tolist() == ["J2"]


def test_task_durations() -> None:
    table = analysis.task_durations(scenario()).set_index(["jobId", "deviceKey", "attempt"])
    assert len(table) == 12
    a = table.loc[("J1", "a", 1)]
    assert (a["published_at"], a["upgrading_at"], a["finished_at"]) == tuple(
        pd.Timestamp(BASE + timedelta(seconds=s)) for s in (2, 3, 5)
    )
    assert (a["status"], a["wave"], a["fromVersion"]) == ("succeeded", 1, "1.0.0")
    assert (a["publish_to_upgrading_s"], a["upgrading_to_done_s"], a["publish_to_done_s"]) == (1.0, 2.0, 3.0)
    declined = table.loc[("J1", "b", 1)]  # failed straight from published
    assert declined["status"] == "failed" and pd.isna(declined["upgrading_at"])
    assert math.isnan(declined["publish_to_upgrading_s"]) and declined["publish_to_done_s"] == 1.0
    retry = table.loc[("J1", "b", 2)]
    assert (retry["publish_to_upgrading_s"], retry["upgrading_to_done_s"]) == (1.0, 1.0)
    canceled = table.loc[("J1", "d", 1)]
    assert canceled["status"] == "canceled" and math.isnan(canceled["publish_to_done_s"])
    active = table.loc[("J1", "e", 1)]
    assert active["status"] == "published" and pd.isna(active["finished_at"])
    assert table.loc[("J2", "h", 2), "publish_to_done_s"] == 2.0


def test_step_labels_cover_every_code() -> None:
    frame = events([
        ev("J", "x", "failed", step=-1), ev("J", "x", "failed", step=-2), ev("J", "x", "failed", step=-3),
        ev("J", "x", "failed", step=-4), ev("J", "x", "failed", step=-5), ev("J", "x", "failed", step=-6),
        ev("J", "x", "failed", step=-100, desc="Unexpected version? no: device text"),
        ev("J", "x", "failed", desc="unexpected version 9.9.9"), ev("J", "x", "timeout", desc="timed out"),
        ev("J", "x", "failed", desc="rejected"), ev("J", "x", "upgrading", step=50),
    ])  # fmt: skip
    labels = analysis.step_labels(frame)
    assert list(labels.cat.categories) == analysis.STEP_LABELS
    assert labels.astype(object).where(labels.notna(), None).tolist() == [
        "upgrade", "download", "verify", "flash", "declined", "device-defined", "unexpected version",
        "unexpected version", "timeout", "other", None,
    ]  # fmt: skip


def test_failure_breakdown_by_step_label() -> None:
    table = analysis.failure_breakdown(scenario())
    assert records(table.assign(step_label=table["step_label"].astype(str))) == [
        {"step_label": "download", "failures": 1, "devices": 1, "share": 1 / 8},
        {"step_label": "verify", "failures": 1, "devices": 1, "share": 1 / 8},
        {"step_label": "declined", "failures": 2, "devices": 2, "share": 2 / 8},
        {"step_label": "device-defined", "failures": 1, "devices": 1, "share": 1 / 8},
        {"step_label": "unexpected version", "failures": 1, "devices": 1, "share": 1 / 8},
        {"step_label": "timeout", "failures": 1, "devices": 1, "share": 1 / 8},
        {"step_label": "other", "failures": 1, "devices": 1, "share": 1 / 8},
    ]


def test_failure_breakdown_by_version_attempt_and_job() -> None:
    frame = scenario()
    assert records(analysis.failure_breakdown(frame, "fromVersion")) == [
        {"fromVersion": "1.0.0", "failures": 3, "devices": 1, "share": 3 / 8},
        {"fromVersion": "1.1.0", "failures": 1, "devices": 1, "share": 1 / 8},
        {"fromVersion": "2.0.0", "failures": 4, "devices": 4, "share": 4 / 8},
    ]
    assert records(analysis.failure_breakdown(frame, "attempt")) == [
        {"attempt": 1, "failures": 7, "devices": 6, "share": 7 / 8},
        {"attempt": 2, "failures": 1, "devices": 1, "share": 1 / 8},
    ]
    by_job = analysis.failure_breakdown(frame, ["jobId", "attempt"])
    assert by_job[["jobId", "attempt", "failures"]].values.tolist() == [
        ["J1", 1, 2],
        ["J1", 2, 1],
        ["J2", 1, 5],
    ]


def test_completion_over_time() -> None:
    curve = analysis.completion_over_time(scenario(), "J1", freq="5s")
    assert list(curve.index) == [pd.Timestamp(BASE + timedelta(seconds=s)) for s in (0, 5, 10, 15)]
    assert curve.columns.tolist() == ["elapsed_s", "succeeded", "failed", "canceled", "timeout", "rolledBack", "done"]
    # First event at +1 s; each row holds at its bin's end. a succeeds at +5, b fails at +11,
    # c times out at +15, d is canceled at +17; e is still published.
    assert curve.values.tolist() == [
        [4.0, 0, 0, 0, 0, 0, 0],
        [9.0, 1, 0, 0, 0, 0, 1],
        [14.0, 1, 1, 0, 0, 0, 2],
        [19.0, 1, 1, 1, 1, 0, 4],
    ]
    assert analysis.completion_over_time(scenario(), "nope").empty


def test_completion_counts_a_retried_task_once() -> None:
    curve = analysis.completion_over_time(scenario(), "J2", freq="1min")
    assert curve[["succeeded", "failed", "done"]].values.tolist() == [[1, 4, 5]]


def test_failures_without_kind_column() -> None:
    frame = scenario().drop(columns=["kind"])
    assert len(analysis.failures(analysis.coerce(frame, "events"))) == 8


def test_wave_progress() -> None:
    assert records(analysis.wave_progress(scenario(), "J1")) == [
        {
            "wave": 1,
            "tasks": 2,
            "succeeded": 1,
            "failed": 1,
            "canceled": 0,
            "active": 0,
            "success_ratio": 0.5,
        },
        {
            "wave": 2,
            "tasks": 3,
            "succeeded": 0,
            "failed": 1,
            "canceled": 1,
            "active": 1,
            "success_ratio": 0.0,
        },
    ]
    assert analysis.wave_progress(scenario(), "J2").empty


def test_job_waves() -> None:
    jobs = analysis.coerce(
        pd.DataFrame({
            "id": ["J1", "J2"],
            "waves": [json.dumps([{"percent": 5, "successRatio": 0.95}, {"percent": 100}]), None],
        }),
        "jobs",
    )  # fmt: skip
    plan = analysis.job_waves(jobs, "J1")
    assert plan["wave"].tolist() == [1, 2] and plan["percent"].tolist() == [5.0, 100.0]
    assert plan["successRatio"].iloc[0] == 0.95 and math.isnan(plan["successRatio"].iloc[1])
    assert analysis.job_waves(jobs, "J2").empty


def test_repeat_failures() -> None:
    repeat = analysis.repeat_failures(scenario())
    assert records(repeat) == [
        {"productKey": "meter", "deviceKey": "b", "failures": 3, "jobs": 2,
         "labels": "declined, download, device-defined", "fromVersions": "1.0.0",
         "last_failure_at": pd.Timestamp(BASE + timedelta(seconds=23))},
    ]  # fmt: skip
    everyone = analysis.repeat_failures(scenario(), min_failures=1)
    assert everyone["deviceKey"].tolist() == ["b", "c", "f", "g", "h", "k"]


def test_job_summary() -> None:
    summary = analysis.job_summary(scenario()).set_index("jobId")
    assert summary.loc["J1", ["tasks", "succeeded", "failed", "timeout", "canceled", "active"]].tolist() == [
        5, 1, 1, 1, 1, 1,
    ]  # fmt: skip
    assert summary.loc["J1", "success_rate"] == 0.2 and summary.loc["J2", "success_rate"] == 0.2
    assert summary["attempts"].tolist() == [6, 6]
    assert summary["median_publish_to_done_s"].tolist() == [3.0, 2.0]
    assert summary.loc["J2", "fromVersions"] == "1.0.0, 2.0.0"
    assert summary.loc["J2", "toVersion"] == "2.1.0"
    assert summary["bytes_downloaded"].tolist() == [512, 0]  # only J1's device a logged bytes
    assert summary.loc["J1", "bytes_per_task"] == 512 / 5


def test_functions_do_not_modify_their_input() -> None:
    frame = scenario()
    before = frame.copy()
    analysis.funnel(frame)
    analysis.task_durations(frame)
    analysis.failure_breakdown(frame)
    analysis.completion_over_time(frame, "J1")
    analysis.wave_progress(frame, "J1")
    analysis.repeat_failures(frame)
    analysis.job_summary(frame)
    pd.testing.assert_frame_equal(frame, before)


# --- load() -------------------------------------------------------------------------------------------

EVENT = {
    "jobId": "j1", "jobType": "upgrade", "firmwareId": "f1", "productKey": "meter", "deviceKey": "007",
    "fromVersion": "1.10", "toVersion": "2.0", "attempt": 1,
}  # fmt: skip
TABLES: dict[str, list[dict[str, Any]]] = {
    "events": [
        {"seq": 2, "ts": "2026-11-26T20:51:04.000001Z", **EVENT, "status": "upgrading", "kind": "progress",
         "step": 35, "desc": 'said "hi", then\nwent on', "wave": 1, "bytesDownloaded": 4_000_000_000},
        {"seq": 1, "ts": "2026-11-26T20:51:03.123456Z", **EVENT, "status": "published", "kind": "state",
         "step": None, "desc": None, "wave": None, "bytesDownloaded": None},
        {"seq": 3, "ts": "2026-11-26T20:52:00Z", **EVENT, "status": "failed", "kind": "state",
         "step": -7, "desc": "NA", "wave": 1, "bytesDownloaded": None},
    ],
    "jobs": [
        {"id": "j1", "name": "roll, east", "type": "upgrade", "firmwareId": "f1", "productKey": "meter",
         "status": "running", "statusReason": None, "mode": "push", "policy": "snapshot",
         "createdAt": "2026-11-26T20:50:00Z", "startedAt": "2026-11-26T20:51:00.5Z", "finishedAt": None,
         "total": 1, "pending": 0, "published": 0, "upgrading": 0, "succeeded": 0, "failed": 1, "canceled": 0,
         "timeout": 0, "currentWave": 1, "waves": '[{"percent": 5, "successRatio": 0.95}, {"percent": 100}]'},
    ],
    "firmware": [
        {"id": "f1", "productKey": "meter", "name": "meter 2.0", "version": "2.0", "size": 1048576,
         "md5": "0" * 32, "sha256": "f" * 64, "signMethod": "sha256", "status": "unverified",
         "createdAt": "2026-11-26T20:00:00Z"},
    ],
    "devices": [
        {"productKey": "meter", "deviceKey": "007", "version": "1.10", "online": True,
         "lastSeen": "2026-11-26T20:52:00Z", "createdAt": "2026-11-01T00:00:00Z", "tags": '{"site": "east"}'},
        {"productKey": "meter", "deviceKey": "008", "version": "1.10", "online": False,
         "lastSeen": None, "createdAt": "2026-11-01T00:00:00Z", "tags": "{}"},
    ],
}  # fmt: skip


def write(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows in the export format the suffix names (CSV: empty cell = null, bools lower-case)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        return
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({
                k: "" if v is None else str(v).lower() if isinstance(v, bool) else v for k, v in row.items()
            })  # fmt: skip


def write_export(directory: Path, suffix: str, tables: dict[str, list[dict[str, Any]]] = TABLES) -> Path:
    directory.mkdir()
    for table, rows in tables.items():
        write(directory / (f"rollout{suffix}" if table == "events" else f"rollout.{table}{suffix}"), rows)
    return directory / f"rollout{suffix}"


def test_load_csv_and_jsonl_give_equal_typed_frames(tmp_path: Path) -> None:
    from_csv = analysis.load(write_export(tmp_path / "csv", ".csv"))
    from_jsonl = analysis.load(write_export(tmp_path / "jsonl", ".jsonl"))
    for table in analysis.SCHEMAS:
        pd.testing.assert_frame_equal(getattr(from_csv, table), getattr(from_jsonl, table), obj=table)

    events = from_csv.events
    assert events["seq"].tolist() == [1, 2, 3]  # sorted
    assert events["deviceKey"].tolist() == ["007"] * 3 and events["fromVersion"].iloc[0] == "1.10"
    assert events["desc"].iloc[1] == 'said "hi", then\nwent on' and events["desc"].iloc[2] == "NA"
    assert events["ts"].iloc[0] == pd.Timestamp("2026-11-26T20:51:03.123456Z")
    assert events["bytesDownloaded"].iloc[1] == 4_000_000_000 and pd.isna(events["wave"].iloc[0])
    jobs, firmware, devices = from_csv.jobs, from_csv.firmware, from_csv.devices
    assert jobs["name"].iloc[0] == "roll, east" and pd.isna(jobs["finishedAt"].iloc[0])
    assert list(jobs["status"].cat.categories) == [
        "scheduled",
        "running",
        "paused",
        "completed",
        "canceled",
        "aborted",
    ]
    assert jobs["failed"].dtype == "Int64" and jobs["startedAt"].iloc[0] == pd.Timestamp("2026-11-26T20:51:00.5Z")
    assert json.loads(jobs["waves"].iloc[0])[0] == {"percent": 5, "successRatio": 0.95}
    assert firmware["size"].iloc[0] == 1048576 and firmware["status"].iloc[0] == "unverified"
    assert devices["online"].tolist() == [True, False] and devices["online"].dtype == "boolean"
    assert pd.isna(devices["lastSeen"].iloc[1]) and json.loads(devices["tags"].iloc[0]) == {"site": "east"}


def test_load_without_snapshots_or_optional_columns(tmp_path: Path) -> None:
    rows = [{k: v for k, v in row.items() if k != "bytesDownloaded"} for row in TABLES["events"]]
    export = analysis.load(write_export(tmp_path / "only", ".csv", {"events": rows}))
    assert export.events["bytesDownloaded"].isna().all() and export.events["bytesDownloaded"].dtype == "Int64"
    for table in ["jobs", "firmware", "devices"]:
        frame = getattr(export, table)
        assert frame.empty and list(frame.columns) == list(analysis.SCHEMAS[table])
        pd.testing.assert_frame_equal(frame, analysis.empty(table))
    assert str(export.jobs["createdAt"].dtype.tz) == "UTC"


def test_load_refuses_unknown_formats_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        analysis.load(tmp_path / "rollout.xlsx")
    with pytest.raises(FileNotFoundError):
        analysis.load(tmp_path / "missing.csv")


def test_job_labels_and_job_events() -> None:
    jobs = pd.DataFrame({"id": ["J1", "J2"], "name": ["roll east", None]})
    assert analysis.job_labels(jobs, ["J1", "J2", "J3"]) == {"J1": "roll east", "J2": "J2", "J3": "J3"}
    assert analysis.job_labels(pd.DataFrame(), ["J1"]) == {"J1": "J1"}
    events = analysis.coerce(
        pd.DataFrame(
            {
                "seq": [1, 2, 3],
                "ts": ["2026-01-01T00:00:00Z", "2026-01-01T00:00:01Z", "2026-01-01T00:00:02Z"],
                "jobId": ["J1", "J1", "J1"],
                "deviceKey": ["d1", "", ""],
                "status": ["pending", "paused", "resumed"],
                "kind": ["state", "job", "job"],
                "actor": [None, "admin", "admin"],
                "desc": [None, "paused by admin", "resumed by admin"],
            }
        )
    )
    timeline = analysis.job_events(events, "J1")
    assert timeline["status"].astype(str).tolist() == ["paused", "resumed"]
    assert timeline["actor"].tolist() == ["admin", "admin"]
    assert analysis.status_counts(events)["tasks"].tolist() == [1]  # job rows are not tasks
