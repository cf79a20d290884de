"""The job-spec table drives the API's validation, the CLI flags, the console form and the README;
the export schema drives the writer, the API's events CSV and the analysis kit. These fail on drift."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest

from otabox import analysis, jobspec
from otabox.cli.main import build_parser
from otabox.errors import BadRequest
from otabox.export import schema
from otabox.models import Event, JobMode, JobPolicy
from otabox.server import present
from otabox.server.http.console import views_new_job
from tests.test_console import Console, ui  # noqa: F401  (the signed-in console fixture)

README = Path(__file__).resolve().parent.parent / "README.md"
FULL_BODY: dict[str, Any] = {
    "firmwareId": "fw-1",
    "type": "upgrade",
    "name": "all of it",
    "scope": {"versionNumbers": ["1.0"], "deviceKeys": ["d1", "d2"], "tags": {"site": ["east", "west"]}},
    "mode": "request",
    "policy": "incremental",
    "maxConcurrency": 5,
    "ratePerMinute": 30.0,
    "timeoutSeconds": 600.0,
    "retry": {"count": 2, "intervalSeconds": 60.0},
    "abort": {"failureRatio": 0.2, "minFinished": 20},
    "waves": [{"percent": 5.0, "successRatio": 0.95}, {"percent": 100.0}],
    "schedule": {
        "start": "2030-01-01T00:00:00Z",
        "end": "2030-01-02T00:00:00Z",
        "dailyWindow": ["01:00", "05:00"],
        "timezoneOffsetMinutes": 60,
    },
    "allowDowngrade": True,
    "rollbackWatchSeconds": 120.0,
    "delta": "off",
}


def _get(body: dict[str, Any], path: str) -> Any:
    node: Any = body
    for part in path.split("."):
        node = node[part]
    return node


def test_every_body_field_is_in_the_table_and_round_trips() -> None:
    paths = {f.path for f in jobspec.JOB_FIELDS}
    leaves = {
        f"{k}.{k2}" if isinstance(v, dict) else k
        for k, v in FULL_BODY.items()
        for k2 in (v if isinstance(v, dict) else [None])
    }
    assert leaves == paths
    spec = jobspec.validate(FULL_BODY)
    assert spec.mode == JobMode.REQUEST and spec.policy == JobPolicy.INCREMENTAL
    shown = jobspec.to_json(spec)
    for path in paths - {"firmwareId", "type", "name"}:
        assert _get(shown, path) == _get(FULL_BODY, path), path
    assert jobspec.from_json(shown) == spec


@pytest.mark.parametrize("f", [f for f in jobspec.JOB_FIELDS if f.kind in ("int", "number")], ids=lambda f: f.path)
def test_numeric_limits_of_the_table_are_enforced(f: jobspec.JobField) -> None:
    below = (f.minimum if f.minimum is not None else 0) - (0 if f.exclusive_minimum else 1)
    body: dict[str, Any] = {"abort": {"failureRatio": 0.5}, "schedule": {"dailyWindow": ["01:00", "02:00"]}}
    node = body
    *parents, key = f.path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[key] = below
    with pytest.raises(BadRequest, match=key):
        jobspec.validate(body)


def _subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub: argparse.ArgumentParser = action.choices[name]
    return sub


def test_cli_flags_are_the_table() -> None:
    parser = build_parser()
    flags = (
        "job create --firmware fw-1 --type upgrade --versions 1.0 --devices d1,d2 --tag site=east,west"
        " --mode request --policy incremental --max-concurrency 5 --rate 30 --timeout 600 --retry 2"
        " --retry-interval 60 --abort-ratio 0.2 --abort-min 20 --waves 5:0.95,100 --start 2030-01-01T00:00:00Z"
        " --end 2030-01-02T00:00:00Z --daily-window 01:00-05:00 --tz-offset 60 --allow-downgrade"
        " --rollback-watch 120 --delta off"
    )
    args = parser.parse_args([*flags.split(), "--name", "all of it"])
    assert jobspec.body_from_args(args) == FULL_BODY
    help_text = _subcommand(_subcommand(parser, "job"), "create").format_help()
    for f in jobspec.JOB_FIELDS:
        assert f.cli in help_text, f.path


async def test_console_form_has_an_input_per_table_field(ui: Console) -> None:  # noqa: F811
    page = await ui.get("/ui/jobs/new")
    for f in jobspec.JOB_FIELDS:
        if f.form:
            assert re.search(rf'name="{re.escape(f.form)}"', page), f.path
    for f in (*views_new_job.PACE, *views_new_job.RETRY_ABORT):
        assert f"{f.label}" in page and f'name="{f.form}" type="number"{f.input_attrs()}' in page, f.path


def test_readme_job_reference_is_the_table() -> None:
    assert jobspec.reference_markdown() in README.read_text(encoding="utf-8")


def test_one_export_schema_for_writer_api_and_analysis() -> None:
    event = Event(1, 0.0, "j", "upgrade", "fw", "pk", "dk", None, "2", "pending", "state", None, None, 1, None, None)
    assert tuple(present.event(event)) == schema.EVENT_COLUMNS
    assert analysis.SCHEMAS is schema.SCHEMAS
    assert analysis.TASK_STATUSES == schema.TASK_STATUSES
