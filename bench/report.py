"""The output of a run: the results table with otabox ÷ reference ratios, and bench/results.json.

`table` renders the rows as a Markdown table with targets, notes and the CPU load during each
figure; `meta` describes the run (date, machine, commit, plan); `write_json` writes meta, rows
and details to the JSON file and `print_summary` prints the header line and the table.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from bench.harness import Run, source_state


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit in ("s", "ms"):
        return f"{value:,.2f} {unit}"
    if unit == "MB" or unit == "MB/s":
        return f"{value:,.0f} {unit}"
    return f"{value:,.0f} {unit}"


def table(run: Run) -> str:
    n = run.plan.devices
    head = ["figure", "otabox", "reference", "ratio", "target", "met?"]
    lines = []
    for r in run.rows.values():
        if not r.name:
            continue
        ref = f"{fmt(r.reference, r.unit)} ({r.ref_name})" if r.reference is not None else "—"
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "—"
        target = "—"
        if r.target is not None:
            target = ("≤ " if r.better == "lower" else "≥ ") + fmt(r.target, r.unit)
        met = r.met(n)
        arrow = "↓" if r.better == "lower" else "↑"
        lines.append(
            [
                f"{r.name} {arrow}",
                fmt(r.otabox, r.unit),
                ref,
                ratio,
                target,
                "—" if met is None else ("yes" if met else "NO"),
            ]
        )
    widths = [max(len(row[i]) for row in [head, *lines]) for i in range(len(head))]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |"]
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in lines]
    notes = [f"- {r.name}: {r.note}" for r in run.rows.values() if r.note and r.name]
    if notes:
        out += ["", "notes:", *notes]
    loads = load_notes(run)
    if loads:
        out += ["", "load during each figure (CPU % of one core; listen-queue overflows):", *loads]
    out += ["", "ratio = otabox ÷ reference (↓ lower is better, ↑ higher is better); targets are for 10,000 devices."]
    return "\n".join(out)


PHASES = (  # figure -> (otabox phase, reference section, reference phase)
    ("storm", "storm", "mosquitto", "storm"),
    ("inform", "inform", "", ""),
    ("push / own topic", "push", "mosquitto", "own-topic"),
    ("progress", "progress", "mosquitto", "progress"),
    ("storm over TLS", "storm-tls", "", ""),
    ("storm over two-way TLS", "storm-mtls", "", ""),
    ("device certificates issued", "certificates", "", ""),
    ("rollout", "rollout", "", ""),
    ("download", "download", "nginx", "download"),
)


def _load(name: str, ph: dict[str, Any] | None) -> str:
    if not ph:
        return ""
    text = f"{name} {ph['serverCpuPercent']}%, load generator {ph['harnessCpuPercent']}%"
    if ph.get("listenOverflows"):
        text += f", {ph['listenOverflows']} overflows"
    if ph["harnessCpuPercent"] >= 90:
        text += " (bound by the load generator)"
    return text


def load_notes(run: Run) -> list[str]:
    out = []
    ota = run.details.get("otabox", {}).get("phases", {})
    for label, phase, ref, ref_phase in PHASES:
        parts = [_load("otabox", ota.get(phase))]
        if ref:
            parts.append(_load(ref, run.details.get(ref, {}).get("phases", {}).get(ref_phase)))
        parts = [p for p in parts if p]
        if parts:
            out.append(f"- {label}: " + "; ".join(parts))
    return out


def meta(run: Run, started: float) -> dict[str, Any]:
    mem = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1]) * 1024
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "durationSeconds": round(time.monotonic() - started, 1),
        "devices": run.plan.devices,
        "quick": run.plan.quick,
        "figures": sorted(run.only),
        "commit": run.source["commit"],
        "uncommitted": run.source["uncommitted"],
        "sourceAtEnd": None if source_state() == run.source else source_state(),
        "cpus": os.cpu_count(),
        "memoryGB": round(mem / 1024**3, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "plan": run.plan.__dict__,
    }


def write_json(run: Run, started: float, path: str) -> dict[str, Any]:
    """Write meta, figures and details of the run to `path`; returns what was written."""
    result: dict[str, Any] = {
        "meta": meta(run, started),
        "figures": [r.as_json(run.plan.devices) for r in run.rows.values() if r.name],
    }
    result["details"] = run.details
    Path(path).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def print_summary(run: Run, result: dict[str, Any]) -> None:
    """Print a blank line, the run's header line (N, date, CPUs, commit) and the table."""
    print()
    m = result["meta"]
    print(
        f"otabox benchmark, N={run.plan.devices}, {m['date']}, {m['cpus']} CPUs, commit {m['commit']}"
        + (" (+ uncommitted changes in otabox/)" if m["uncommitted"] else "")
        + (f"; the source changed during the run (now {m['sourceAtEnd']['commit']})" if m["sourceAtEnd"] else "")
    )
    print(table(run))
