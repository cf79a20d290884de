"""Run the notebooks headless against an export and check what they show."""

from __future__ import annotations

import csv
import json
import os
import random
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")
analysis = pytest.importorskip("otabox.analysis")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
NOTEBOOK_NAMES = ["01_rollout_overview.ipynb", "02_failures.ipynb", "03_compare_jobs.ipynb"]
CELL_TIMEOUT_S = 120  # generous: the first cell imports pandas and matplotlib in a cold kernel
HEADLINE_KEYS = ["tasks", *analysis.TASK_STATUSES]

# --- a small synthetic export in the export contract's format --------------------------------------

EVENT_COLUMNS = [
    "seq", "ts", "jobId", "jobType", "firmwareId", "productKey", "deviceKey", "fromVersion",
    "toVersion", "status", "kind", "step", "desc", "attempt", "wave", "bytesDownloaded",
]  # fmt: skip
JOB_COLUMNS = [
    "id", "name", "type", "firmwareId", "productKey", "status", "statusReason", "mode", "policy",
    "createdAt", "startedAt", "finishedAt", "total", "pending", "published", "upgrading", "succeeded",
    "failed", "canceled", "timeout", "currentWave", "waves",
]  # fmt: skip
FIRMWARE_COLUMNS = [
    "id", "productKey", "name", "version", "size", "md5", "sha256", "signMethod", "status", "createdAt",
]  # fmt: skip
DEVICE_COLUMNS = ["productKey", "deviceKey", "version", "online", "lastSeen", "createdAt", "tags"]

PRODUCT = "meter"
FIRMWARE_SIZE = 1_048_576
FAILURE_TEXT = {
    -1: "upgrade failed",
    -2: "download failed: HTTP 404",
    -3: "verification failed: md5 mismatch",
    -4: "flash write failed",
    -5: "declined: user postponed",
    -7: "battery low",
    -9: "sensor self-test failed",
}


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _write_table(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    """Write rows as CSV (header, empty cell = null) or JSONL (null for missing), per the suffix."""
    if path.suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps({column: row.get(column) for column in columns}) + "\n")
        return

    def cell(value: Any) -> Any:
        if value is None:
            return ""
        return str(value).lower() if isinstance(value, bool) else value

    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(columns)
        writer.writerows([cell(row.get(column)) for column in columns] for row in rows)


class _Job:
    """Collects the events of one synthetic job, task by task."""

    def __init__(self, job_id: str, firmware_id: str, to_version: str, rng: random.Random) -> None:
        self.job_id, self.firmware_id, self.to_version, self.rng = job_id, firmware_id, to_version, rng
        self.events: list[dict[str, Any]] = []
        self.final: dict[str, str] = {}

    def _event(self, at: datetime, device: str, from_version: str, status: str, **fields: Any) -> None:
        self.events.append({
            "ts": at, "jobId": self.job_id, "jobType": "upgrade", "firmwareId": self.firmware_id,
            "productKey": PRODUCT, "deviceKey": device, "fromVersion": from_version,
            "toVersion": self.to_version, "status": status, "kind": fields.pop("kind", "state"),
            "attempt": 1, **fields,
        })  # fmt: skip
        self.final[device] = status

    def task(self, device: str, from_version: str, start: datetime, outcomes: list[str | int],
             wave: int | None) -> datetime:  # fmt: skip
        """Play one task and return its end time.

        Each outcome is one attempt: "ok", a negative step, "unexpected", "timeout", "canceled",
        "rejected", or "pending"/"published"/"upgrading" to leave the task active.
        """
        at = start
        common = {"wave": wave}
        self._event(at, device, from_version, "pending", **common)
        for attempt, outcome in enumerate(outcomes, start=1):
            common = {"wave": wave, "attempt": attempt}
            if outcome == "pending":
                break
            at += timedelta(seconds=1 + self.rng.random() * 3)
            self._event(at, device, from_version, "published", **common)
            if outcome == "published":
                break
            if outcome == "canceled":
                at += timedelta(seconds=5)
                self._event(at, device, from_version, "canceled", desc="canceled by operator", **common)
                break
            if outcome == "rejected":  # upgrade_reply with a code other than 200: no step
                at += timedelta(seconds=1)
                self._event(at, device, from_version, "failed", desc="upgrade rejected: 503 busy", **common)
                break
            if outcome == -5:  # declined straight away: a failing first progress report
                at += timedelta(seconds=1 + self.rng.random())
                self._event(at, device, from_version, "failed", step=-5, desc=FAILURE_TEXT[-5], **common)
                at += timedelta(seconds=30)  # retry interval
                continue
            at += timedelta(seconds=2 + self.rng.random() * 4)
            self._event(at, device, from_version, "upgrading", step=5, bytesDownloaded=0, **common)
            last_step = {"ok": 100, "unexpected": 100, -2: 25}.get(outcome, 50)
            for step in range(25, last_step + 1, 25):
                at += timedelta(seconds=3 + self.rng.random() * 6)
                downloaded = min(FIRMWARE_SIZE, FIRMWARE_SIZE * step // 50)
                self._event(at, device, from_version, "upgrading", kind="progress", step=step,
                            desc="downloading" if step <= 50 else "installing",
                            bytesDownloaded=downloaded, **common)  # fmt: skip
            if outcome == "upgrading":
                break
            at += timedelta(seconds=2 + self.rng.random() * 5)
            if outcome == "ok":
                self._event(at, device, from_version, "succeeded", **common)
                break
            if outcome == "timeout":
                at += timedelta(seconds=120)
                self._event(at, device, from_version, "timeout", desc="timed out", **common)
            elif outcome == "unexpected":
                self._event(at, device, from_version, "failed", desc="unexpected version 9.9.9", **common)
            else:
                step = int(outcome)
                self._event(at, device, from_version, "failed", step=step, desc=FAILURE_TEXT[step], **common)
            at += timedelta(seconds=30)  # retry interval
        return at

    def counts(self) -> dict[str, int]:
        """Task counts per final status, as the jobs snapshot reports them."""
        statuses = list(self.final.values())
        return {"total": len(statuses), **{s: statuses.count(s) for s in analysis.TASK_STATUSES}}


def write_synthetic_export(path: Path) -> Path:
    """Write a small, realistic export (CSV or JSONL by suffix) plus its snapshot files; return `path`.

    Two jobs on one product: job-a (1.x -> 2.0.0, two waves, every failure kind, retries, a
    timeout, a cancel) is finished; job-b (-> 2.1.0, no waves) is still running with tasks in
    pending, published and upgrading. d009 and d008 fail repeatedly, d009 in both jobs.
    """
    rng = random.Random(7)
    t0 = datetime(2026, 11, 26, 10, 0, 0, 123456, tzinfo=UTC)
    devices = {f"d{n:03d}": ("1.0.0" if n <= 20 else "1.1.0") for n in range(1, 31)}
    versions = dict(devices)

    job_a = _Job("job-a", "fw-200", "2.0.0", rng)
    wave1 = list(devices)[:6]
    plan_a: dict[str, list[str | int]] = {d: ["ok"] for d in devices}
    plan_a.update({
        "d003": [-2, "ok"], "d007": [-1], "d008": [-2, -2], "d009": [-3], "d010": [-4],
        "d011": [-5], "d012": [-7, "ok"], "d013": ["unexpected"], "d014": ["timeout"],
        "d015": ["canceled"], "d021": [-9],
    })  # fmt: skip
    wave_end = t0
    for i, device in enumerate(wave1):
        wave_end = max(wave_end, job_a.task(device, devices[device], t0 + timedelta(seconds=i), plan_a[device], 1))
    end_a = wave_end
    for i, device in enumerate(d for d in devices if d not in wave1):
        start = wave_end + timedelta(seconds=5 + i * 2)
        end_a = max(end_a, job_a.task(device, devices[device], start, plan_a[device], 2))
    for device, status in job_a.final.items():
        if status == "succeeded":
            versions[device] = "2.0.0"

    job_b = _Job("job-b", "fw-210", "2.1.0", rng)
    t1 = end_a + timedelta(minutes=2)
    plan_b: dict[str, list[str | int]] = {
        "d001": ["ok"], "d002": ["ok"], "d004": ["ok"], "d005": ["ok"], "d006": ["ok"], "d016": ["ok"],
        "d009": [-3, -3], "d017": ["timeout"], "d018": ["pending"], "d019": ["published"],
        "d020": ["upgrading"], "d022": [-7], "d023": ["rejected"],
    }  # fmt: skip
    end_b = t1
    for i, (device, outcomes) in enumerate(plan_b.items()):
        end_b = max(end_b, job_b.task(device, versions[device], t1 + timedelta(seconds=3 * i), outcomes, None))
    for device, status in job_b.final.items():
        if status == "succeeded":
            versions[device] = "2.1.0"

    events = sorted(job_a.events + job_b.events, key=lambda e: e["ts"])
    for seq, event in enumerate(events, start=1):
        event["seq"], event["ts"] = seq, _iso(event["ts"])
    _write_table(path, EVENT_COLUMNS, events)

    def sibling(table: str) -> Path:
        return path.with_name(f"{path.stem}.{table}{path.suffix}")

    waves = json.dumps([{"percent": 20, "successRatio": 0.6}, {"percent": 100}])
    job = {"type": "upgrade", "productKey": PRODUCT, "mode": "push"}
    jobs = [
        {"id": "job-a", "name": "roll 2.0.0", "firmwareId": "fw-200", **job, "status": "completed",
         "policy": "snapshot", "createdAt": _iso(t0 - timedelta(seconds=5)), "startedAt": _iso(t0),
         "finishedAt": _iso(end_a), **job_a.counts(), "currentWave": 2, "waves": waves},
        {"id": "job-b", "name": "roll 2.1.0", "firmwareId": "fw-210", **job, "status": "running",
         "policy": "incremental", "createdAt": _iso(t1), "startedAt": _iso(t1), **job_b.counts()},
    ]  # fmt: skip
    _write_table(sibling("jobs"), JOB_COLUMNS, jobs)
    firmware = [
        {"id": f"fw-{v.replace('.', '')}", "productKey": PRODUCT, "name": f"meter {v}", "version": v,
         "size": FIRMWARE_SIZE, "md5": f"{n:032x}", "sha256": f"{n:064x}", "signMethod": "md5",
         "status": "verified", "createdAt": _iso(t0 - timedelta(hours=1))}
        for n, v in enumerate(["2.0.0", "2.1.0"], start=1)
    ]  # fmt: skip
    _write_table(sibling("firmware"), FIRMWARE_COLUMNS, firmware)
    device_rows = [
        {"productKey": PRODUCT, "deviceKey": d, "version": versions[d], "online": n % 7 != 0,
         "lastSeen": _iso(end_b), "createdAt": _iso(t0 - timedelta(days=30)),
         "tags": json.dumps({"site": "east" if n % 2 else "west"})}
        for n, d in enumerate(devices, start=1)
    ]  # fmt: skip
    _write_table(sibling("devices"), DEVICE_COLUMNS, device_rows)
    return path


@pytest.fixture(scope="module")
def rollout_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of an export (events CSV plus snapshots) for the notebooks to read."""
    return write_synthetic_export(tmp_path_factory.mktemp("export") / "rollout.csv")


# --- running the notebooks -------------------------------------------------------------------------


def run_notebook(name: str, export: Path, **env: str) -> Any:
    """Execute one notebook in a fresh python3 kernel; raises CellExecutionError on any cell error."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    kernel_env = {key: value for key, value in os.environ.items() if not key.startswith("OTABOX_")}
    kernel_env.update(
        OTABOX_EXPORT=str(export),
        # The kernel imports otabox from this checkout whether or not it is installed.
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        # Inline figures become image/png outputs; Agg (common in CI) would show nothing.
        MPLBACKEND="module://matplotlib_inline.backend_inline",
        **env,
    )
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute(env=kernel_env)
    return notebook


def outputs(notebook: Any) -> Iterator[Any]:
    for cell in notebook.cells:
        yield from cell.get("outputs", [])


def headline_counts(notebook: Any) -> dict[str, int]:
    """The `name: N` lines printed by the cell tagged "headline"."""
    cells = [c for c in notebook.cells if "headline" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "notebook 01 needs exactly one cell tagged 'headline'"
    text = "".join(o.get("text", "") for o in cells[0].outputs if o.output_type == "stream")
    pattern = re.compile(rf"^({'|'.join(HEADLINE_KEYS)}): (\d+)$", re.MULTILINE)
    return {key: int(value) for key, value in pattern.findall(text)}


def expected_counts(export: Path, job_id: str) -> dict[str, int]:
    """Per-status task counts of one job, from each task's last event in the export."""
    events = analysis.load(export).events
    last = events[events["jobId"] == job_id].drop_duplicates(["jobId", "deviceKey"], keep="last")
    statuses = last["status"].astype(str).value_counts()
    return {"tasks": len(last), **{s: int(statuses.get(s, 0)) for s in analysis.TASK_STATUSES}}


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook_is_committed_without_outputs(name: str) -> None:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code
    assert all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook_runs_and_plots(name: str, rollout_export: Path) -> None:
    notebook = run_notebook(name, rollout_export)
    figures = [o for o in outputs(notebook) if "image/png" in o.get("data", {})]
    assert figures, f"{name} produced no figure"
    if name.startswith("01_"):
        job_id = analysis.busiest_job(analysis.load(rollout_export).events)
        assert headline_counts(notebook) == expected_counts(rollout_export, job_id)


def test_overview_follows_otabox_job(rollout_export: Path) -> None:
    events = analysis.load(rollout_export).events
    other = next(j for j in events["jobId"].unique() if j != analysis.busiest_job(events))
    notebook = run_notebook(NOTEBOOK_NAMES[0], rollout_export, OTABOX_JOB=str(other))
    assert headline_counts(notebook) == expected_counts(rollout_export, str(other))
