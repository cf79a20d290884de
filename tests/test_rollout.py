"""rollout.py: the decisions, as plain function calls (no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from otabox import rollout
from otabox.jobspec import parse_hhmm
from otabox.models import Device, JobStatus, PauseCause, Schedule, Scope, TaskState, Wave
from otabox.rollout import TokenBucket


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_absolute_window() -> None:
    s = Schedule(start=ts("2026-01-01T10:00:00"), end=ts("2026-01-01T12:00:00"))
    assert not rollout.window_open(s, ts("2026-01-01T09:59:59"))
    assert rollout.window_open(s, ts("2026-01-01T10:00:00"))
    assert not rollout.window_open(s, ts("2026-01-01T12:00:00"))
    assert rollout.window_ended(s, ts("2026-01-01T12:00:00"))
    assert not rollout.window_ended(Schedule(), ts("2030-01-01T00:00:00"))


def test_daily_window_with_timezone_and_midnight() -> None:
    s = Schedule(daily=(parse_hhmm("01:00"), parse_hhmm("05:00")), tz_offset_minutes=60)
    assert rollout.window_open(s, ts("2026-01-01T00:30:00"))  # 01:30 local
    assert not rollout.window_open(s, ts("2026-01-01T04:00:00"))  # 05:00 local
    night = Schedule(daily=(parse_hhmm("22:00"), parse_hhmm("02:00")))
    assert rollout.window_open(night, ts("2026-01-01T23:00:00"))
    assert rollout.window_open(night, ts("2026-01-01T01:59:00"))
    assert not rollout.window_open(night, ts("2026-01-01T12:00:00"))
    with pytest.raises(ValueError):
        parse_hhmm("24:30")


def test_wave_sizes_and_assignment() -> None:
    waves = (Wave(5, 0.95), Wave(50), Wave(100))
    assert rollout.wave_sizes(100, waves) == [5, 45, 50]
    assert rollout.wave_sizes(3, waves) == [1, 1, 1]
    assert rollout.wave_sizes(1, waves) == [1, 0, 0]
    assert rollout.assign_waves(4, (Wave(50), Wave(100))) == [1, 1, 2, 2]
    assert rollout.assign_waves(3, ()) == [0, 0, 0]


def test_wave_decision() -> None:
    w = Wave(50, 0.9)
    assert rollout.wave_decision({TaskState.SUCCEEDED: 9, TaskState.UPGRADING: 1}, w, 1).action == "wait"
    assert rollout.wave_decision({TaskState.SUCCEEDED: 9, TaskState.FAILED: 1}, w, 1).action == "advance"
    d = rollout.wave_decision({TaskState.SUCCEEDED: 8, TaskState.TIMEOUT: 2}, Wave(50, 0.95), 2)
    assert d.action == "pause" and d.reason == "wave 2 below 95 % success (80.0 %)"
    assert rollout.wave_decision({TaskState.FAILED: 5}, Wave(50), 1).action == "advance"  # no ratio: no gate


def test_abort_counts_timeouts_after_min_finished() -> None:
    assert not rollout.should_abort({TaskState.FAILED: 1}, 0.2, 20)
    assert rollout.should_abort({TaskState.FAILED: 2, TaskState.TIMEOUT: 2, TaskState.SUCCEEDED: 16}, 0.2, 20)
    assert not rollout.should_abort({TaskState.FAILED: 3, TaskState.SUCCEEDED: 17}, 0.2, 20)
    assert not rollout.should_abort({TaskState.FAILED: 100}, None, 1)
    assert not rollout.should_abort({TaskState.CANCELED: 50, TaskState.FAILED: 1, TaskState.SUCCEEDED: 1}, 0.6, 2)


def test_token_bucket_and_budget() -> None:
    b = TokenBucket(rate_per_minute=60)
    b.refill(100.0)
    assert b.available() == 1
    b.take(1)
    b.refill(100.5)
    assert b.available() == 0
    b.refill(101.0)
    assert b.available() == 1
    b.refill(1000.0)
    assert b.available() == 1  # burst capped at one second's worth
    fast = TokenBucket(rate_per_minute=600)
    fast.refill(0.1)
    assert fast.available() == 10
    assert rollout.push_budget(3, 1, 100) == 2
    assert rollout.push_budget(3, 5, 100) == 0
    assert rollout.push_budget(None, 10, 7) == 7


def test_retry_and_inform_outcome() -> None:
    assert rollout.retry_at(1, 2, 60, 1000.0) == 1060.0
    assert rollout.retry_at(3, 2, 60, 1000.0) is None
    assert rollout.inform_outcome("2.0", "1.0", "2.0") == ("succeeded", "running 2.0")
    assert rollout.inform_outcome("1.0", "1.0", "2.0") is None
    assert rollout.inform_outcome("9", "1.0", "2.0") == ("failed", "unexpected version 9")
    assert rollout.inform_outcome("9", None, "2.0") is None  # no known source: this is it
    assert rollout.inform_outcome("2.0", None, "2.0") == ("succeeded", "running 2.0")


def test_scope() -> None:
    dev = Device("pk", "d1", "1.0", True, None, {"site": "east"}, "sign", 0.0)
    assert rollout.in_scope(dev, Scope(), "2.0")
    assert not rollout.in_scope(dev, Scope(), "1.0")
    assert rollout.in_scope(dev, Scope(("1.0", "1.1"), (), {"site": ("east", "west")}), "2.0")
    assert not rollout.in_scope(dev, Scope(("1.0",), (), {"site": ("north",)}), "2.0")
    assert not rollout.in_scope(dev, Scope((), ("d2",)), "2.0")


def test_resume_after_a_wave_gate_opens_the_next_wave_and_after_an_operator_pause_stays() -> None:
    assert rollout.resume(JobStatus.RUNNING, PauseCause.NONE, 1, 3) is None
    gate = rollout.resume(JobStatus.PAUSED, PauseCause.WAVE_GATE, 1, 3)
    assert gate is not None and gate.wave == 2
    last = rollout.resume(JobStatus.PAUSED, PauseCause.WAVE_GATE, 3, 3)
    assert last is not None and last.wave == 3
    operator = rollout.resume(JobStatus.PAUSED, PauseCause.OPERATOR, 2, 3)
    assert operator is not None and operator.wave == 2
