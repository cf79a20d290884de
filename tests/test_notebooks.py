"""Run the notebooks headless against an export and check what they show."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")
analysis = pytest.importorskip("otabox.analysis")
from otabox.export import schema  # noqa: E402  (after the skips: the export schema is pure)

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
SAMPLE = NOTEBOOKS / "data" / "sample.csv"  # the shipped sample, made by notebooks/make_sample.py
NOTEBOOK_NAMES = ["01_rollout_overview.ipynb", "02_failures.ipynb", "03_compare_jobs.ipynb"]
CELL_TIMEOUT_S = 120  # generous: the first cell imports pandas and matplotlib in a cold kernel
HEADLINE_KEYS = ["tasks", *analysis.TASK_STATUSES]

# --- a small synthetic export in the export contract's format --------------------------------------
# Only for what a finished simulated rollout cannot show (a job still running, canceled tasks,
# device-defined step codes, a rejected push): the notebook tests proper run on real exports.

EVENT_COLUMNS = list(schema.EVENT_COLUMNS)
JOB_COLUMNS = list(schema.JOB_COLUMNS)
FIRMWARE_COLUMNS = list(schema.FIRMWARE_COLUMNS)
DEVICE_COLUMNS = list(schema.DEVICE_COLUMNS)

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


# --- a fresh export of a real, simulated rollout ---------------------------------------------------


@dataclass(frozen=True)
class Rollout:
    """An export written by notebooks/make_sample.py, and what the API said about its jobs."""

    export: Path
    first_job: str  # 1.0.0 -> 2.0.0 on every device, in waves: the job notebook 01 shows by default
    second_job: str  # 2.0.0 -> 2.1.0 on the devices the first job upgraded
    api_counts: dict[str, dict[str, int]]  # job id -> {"tasks": total, status: n} from GET /api/v1/jobs


def load_make_sample() -> Any:
    spec = importlib.util.spec_from_file_location("make_sample", NOTEBOOKS / "make_sample.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rollout_export(tmp_path_factory: pytest.TempPathFactory) -> Rollout:
    """A fresh export (JSONL; the shipped sample is CSV) of the sample's rollout with a smaller fleet.

    Same code path as the shipped sample: a real server, the simulator's fleet, three jobs run until
    the API calls them finished (the third aborted by its rule), then `otabox export`. The API's
    final counts come along.
    """
    out = tmp_path_factory.mktemp("export") / "rollout.jsonl"
    result = load_make_sample().main(["--devices", "48", "--seed", "3", "--out", str(out), "--quiet"])
    jobs = [entry["job"] for entry in result["jobs"]]
    statuses = [(j["id"], j["status"]) for j in jobs]
    assert [s for _, s in statuses[:2]] == ["completed", "completed"], statuses
    assert all(s == "aborted" for _, s in statuses[2:]), statuses
    counts = {job["id"]: {"tasks": job["total"], **job["counts"]} for job in jobs}
    return Rollout(out, jobs[0]["id"], jobs[1]["id"], counts)


# --- running the notebooks -------------------------------------------------------------------------


def run_notebook(name: str, export: Path | None, **env: str) -> Any:
    """Execute one notebook in a fresh python3 kernel; raises CellExecutionError on any cell error.

    `export` None leaves OTABOX_EXPORT unset: the notebook reads the shipped sample.
    """
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    kernel_env = {key: value for key, value in os.environ.items() if not key.startswith("OTABOX_")}
    kernel_env.update(
        # The kernel imports otabox from this checkout whether or not it is installed.
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        # Inline figures become image/png outputs; Agg (common in CI) would show nothing.
        MPLBACKEND="module://matplotlib_inline.backend_inline",
        **env,
    )
    if export is not None:
        kernel_env["OTABOX_EXPORT"] = str(export)
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


def figures(notebook: Any) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs(notebook))


def printed(notebook: Any) -> str:
    return "".join(o.get("text", "") for o in outputs(notebook) if o.output_type == "stream")


def headline_counts(notebook: Any) -> dict[str, int]:
    """The `name: N` lines printed by the cell tagged "headline"."""
    cells = [c for c in notebook.cells if "headline" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "notebook 01 needs exactly one cell tagged 'headline'"
    text = "".join(o.get("text", "") for o in cells[0].outputs if o.output_type == "stream")
    pattern = re.compile(rf"^({'|'.join(HEADLINE_KEYS)}): (\d+)$", re.MULTILINE)
    return {key: int(value) for key, value in pattern.findall(text)}


def shown_job(notebook: Any) -> str:
    """The job notebook 01 says it shows (its `job: ID` line)."""
    found = re.search(r"^job: (\S+)$", printed(notebook), re.MULTILINE)
    assert found, "notebook 01 prints no 'job: ID' line"
    return found.group(1)


def snapshot_counts(jobs: Any, job_id: str) -> dict[str, int]:
    """Per-status counts of one job as the jobs snapshot (the server at export time) has them."""
    row = jobs[jobs["id"] == job_id].iloc[0]
    return {"tasks": int(row["total"]), **{s: int(row[s]) for s in analysis.TASK_STATUSES}}


# Figures each notebook draws for a finished two-job rollout with waves, retries and every failure kind:
# 01 funnel, completion, waves, time to upgrade; 02 by step, version, attempt, repeat failures;
# 03 outcomes, per version, completion, time to upgrade, failure steps.
FIGURES = {"01_rollout_overview.ipynb": 4, "02_failures.ipynb": 4, "03_compare_jobs.ipynb": 5}


# --- tests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook_is_committed_without_outputs(name: str) -> None:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code
    assert all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook_runs_on_fresh_rollout(name: str, rollout_export: Rollout) -> None:
    notebook = run_notebook(name, rollout_export.export)
    assert figures(notebook) >= FIGURES[name], f"{name} drew {figures(notebook)} figures"
    if name.startswith("01_"):
        assert shown_job(notebook) == rollout_export.first_job
        # The figures show the rollout's real numbers: the notebook's counts are the API's.
        assert headline_counts(notebook) == rollout_export.api_counts[rollout_export.first_job]


def test_overview_follows_otabox_job(rollout_export: Rollout) -> None:
    job = rollout_export.second_job
    notebook = run_notebook(NOTEBOOK_NAMES[0], rollout_export.export, OTABOX_JOB=job)
    assert shown_job(notebook) == job
    assert headline_counts(notebook) == rollout_export.api_counts[job]
    assert figures(notebook) >= 3  # no waves in this job: funnel, completion, time to upgrade


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook_runs_on_shipped_sample(name: str) -> None:
    notebook = run_notebook(name, None)
    assert "export: data/sample.csv" in printed(notebook)
    assert figures(notebook) >= FIGURES[name], f"{name} drew {figures(notebook)} figures"
    jobs = analysis.load(SAMPLE).jobs
    names = dict(zip(jobs["id"], jobs["name"], strict=True))
    if name.startswith("01_"):
        assert headline_counts(notebook) == snapshot_counts(jobs, shown_job(notebook))
        # The job's own timeline (what happened to it as a whole, and who did it), named by name.
        text = printed(notebook)
        assert f"timeline of {names[shown_job(notebook)]}:" in text and "completed  by system" in text
    if name.startswith("03_"):
        assert all(f"{label} ({job_id})" in printed(notebook) for job_id, label in names.items())


def test_shipped_sample_is_a_consistent_export() -> None:
    """notebooks/data/ holds an untouched make_sample.py export: the snapshot agrees with the events.

    A stale or hand-edited sample fails here; regenerate it with `python notebooks/make_sample.py`.
    """
    export = analysis.load(SAMPLE)
    events, jobs = export.events, export.jobs
    assert len(jobs) >= 2, "the sample needs two jobs for notebook 03"
    assert set(events["jobId"]) == set(jobs["id"])
    assert events["seq"].is_monotonic_increasing and events["seq"].is_unique
    for job_id in jobs["id"]:
        derived = analysis.status_counts(events, job_id).iloc[0]
        assert {k: int(derived[k]) for k in HEADLINE_KEYS} == snapshot_counts(jobs, job_id), job_id
    assert set(jobs["status"].astype(str)) == {"completed", "aborted"}  # job 3's abort rule trips
    assert set(events["firmwareId"]) <= set(export.firmware["id"])
    assert set(analysis.task_events(events)["deviceKey"]) <= set(export.devices["deviceKey"])
    # What happened to the jobs as a whole is in the log too, and who did it.
    job_rows = analysis.job_events(events)
    by = {(str(r.status), str(r.actor)) for r in job_rows.itertuples()}
    assert {("paused", "admin"), ("resumed", "admin"), ("aborted", "system"), ("completed", "system")} <= by
    assert ("waveOpened", "system") in by or ("resumed", "admin") in by
    # The abort canceled the pending rest: each canceled task was logged once, and no failure twice.
    canceled = analysis.task_events(events)
    canceled = canceled[canceled["status"].astype(str) == "canceled"]
    assert not canceled.duplicated(["jobId", "deviceKey", "attempt"]).any()
    # Every failure kind the simulator plays shows up, so every notebook section has data.
    labels = set(analysis.failures(events)["step_label"].astype(str))
    assert {"download", "verify", "flash", "declined", "unexpected version", "timeout"} <= labels
    assert events["attempt"].max() >= 2 and events["wave"].max() == 2
    size = sum(f.stat().st_size for f in SAMPLE.parent.glob(f"{SAMPLE.stem}.*"))
    assert size < 1_000_000, f"the sample is {size} bytes; keep notebooks/data small"


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook_copes_with_unfinished_rollout(name: str, tmp_path: Path) -> None:
    """Mid-rollout exports: active and canceled tasks, device-defined codes (synthetic, see above)."""
    export = write_synthetic_export(tmp_path / "partial.csv")
    notebook = run_notebook(name, export)
    assert figures(notebook) >= 3
    if name.startswith("01_"):
        counts = headline_counts(notebook)
        assert counts == snapshot_counts(analysis.load(export).jobs, shown_job(notebook))
        assert counts["canceled"] == 1
