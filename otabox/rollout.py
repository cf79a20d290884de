"""Pure rollout decisions over plain data: windows, waves, abort, rate, retry, outcomes.

No I/O here (no aiohttp, amqtt or aiosqlite): the job engine reads the store, asks these
functions, and acts. Times are epoch seconds.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache

from otabox.models import (
    ACTIVE,
    FAILURES,
    IN_FLIGHT,
    Device,
    JobMode,
    JobSpec,
    JobStatus,
    PauseCause,
    Schedule,
    Scope,
    TaskState,
    Waiting,
    Wave,
)

# ---------------------------------------------------------------- schedule window


def window_open(s: Schedule, now: float) -> bool:
    """True when pushes/offers are allowed at `now`."""
    if s.start is not None and now < s.start:
        return False
    if s.end is not None and now >= s.end:
        return False
    if s.daily is None:
        return True
    local = datetime.fromtimestamp(now, UTC) + timedelta(minutes=s.tz_offset_minutes)
    minute = local.hour * 60 + local.minute
    lo, hi = s.daily
    if lo <= hi:
        return lo <= minute < hi
    return minute >= lo or minute < hi  # the window spans midnight


def window_ended(s: Schedule, now: float) -> bool:
    return s.end is not None and now >= s.end


# ---------------------------------------------------------------- waves


def wave_sizes(n: int, waves: tuple[Wave, ...]) -> list[int]:
    """Devices per wave for cumulative percents; the last wave takes the rest."""
    if not waves:
        return [n]
    sizes, assigned = [], 0
    for i, w in enumerate(waves):
        upto = n if i == len(waves) - 1 else min(n, math.ceil(n * w.percent / 100.0))
        sizes.append(max(0, upto - assigned))
        assigned = max(assigned, upto)
    return sizes


def joiner_wave(per_wave: list[int], waves: tuple[Wave, ...]) -> int:
    """The wave (1-based) of a device joining an incremental job whose waves hold `per_wave` devices.

    Joiners fill the waves in order by the same cumulative percents as a snapshot job's devices:
    the first wave whose share of the job, counting the joiner, is not yet reached. So the first
    joiner of an empty job is a canary, and the waves keep their proportions as the job grows.
    """
    if not waves:
        return 0
    n = sum(per_wave) + 1
    held = 0
    for i, w in enumerate(waves):
        held += per_wave[i] if i < len(per_wave) else 0
        if i == len(waves) - 1 or held < math.ceil(n * w.percent / 100.0):
            return i + 1
    return len(waves)


def assign_waves(n: int, waves: tuple[Wave, ...]) -> list[int]:
    """Wave number (1-based) for each of n devices in order; 0 when the job has no waves."""
    if not waves:
        return [0] * n
    out: list[int] = []
    for i, size in enumerate(wave_sizes(n, waves), start=1):
        out.extend([i] * size)
    return out


@dataclass(frozen=True, slots=True)
class WaveDecision:
    action: str  # "wait" | "advance" | "pause"
    reason: str = ""


def wave_decision(counts: dict[TaskState, int], wave: Wave, number: int) -> WaveDecision:
    """Whether the current wave is done and good enough for the next one to start."""
    total = sum(counts.values())
    if any(counts.get(s, 0) for s in ACTIVE):
        return WaveDecision("wait")
    if total == 0 or wave.success_ratio is None:
        return WaveDecision("advance")
    ratio = counts.get(TaskState.SUCCEEDED, 0) / total
    if ratio + 1e-9 >= wave.success_ratio:
        return WaveDecision("advance")
    return WaveDecision("pause", f"wave {number} below {wave.success_ratio * 100:g} % success ({ratio * 100:.1f} %)")


# ---------------------------------------------------------------- abort, completion


def failures(counts: dict[TaskState, int]) -> tuple[int, int]:
    """(failures, finished) as the abort rule counts them: timeouts and rollbacks are failures,
    cancels are neither."""
    failed = sum(counts.get(s, 0) for s in FAILURES)
    return failed, failed + counts.get(TaskState.SUCCEEDED, 0)


def should_abort(counts: dict[TaskState, int], ratio: float | None, min_finished: int) -> bool:
    """failures / finished >= ratio after at least min_finished finished tasks."""
    if ratio is None:
        return False
    failed, finished = failures(counts)
    return finished >= max(1, min_finished) and failed / finished >= ratio


def snapshot_done(counts: dict[TaskState, int], retries_pending: int) -> bool:
    return not any(counts.get(s, 0) for s in ACTIVE) and retries_pending == 0


# ---------------------------------------------------------------- rate and concurrency


@dataclass(slots=True)
class TokenBucket:
    """New pushes per minute. Starts with one second's worth so a restart cannot burst."""

    rate_per_minute: float | None
    tokens: float = 0.0
    at: float = 0.0

    def refill(self, now: float) -> None:
        if self.rate_per_minute is None:
            return
        per_second = self.rate_per_minute / 60.0
        if self.at == 0.0:
            self.tokens, self.at = max(1.0, per_second), now
            return
        # Burst capacity: one second's worth (at least one push).
        cap = max(1.0, per_second)
        self.tokens = min(cap, self.tokens + (now - self.at) * per_second)
        self.at = now

    def available(self) -> int:
        return 1_000_000 if self.rate_per_minute is None else int(self.tokens)

    def take(self, n: int) -> None:
        if self.rate_per_minute is not None:
            self.tokens -= n


def push_budget(max_concurrency: int | None, in_flight: int, tokens: int) -> int:
    """How many new pushes/offers may go out now."""
    room = 1_000_000 if max_concurrency is None else max(0, max_concurrency - in_flight)
    return max(0, min(room, tokens))


# ---------------------------------------------------------------- device reports


def retry_at(attempt: int, retry_count: int, interval: float, now: float) -> float | None:
    """When a device-reported failure on `attempt` (1-based) is retried, or None."""
    if attempt <= retry_count:
        return now + interval
    return None


def rolled_back(
    version: str, from_version: str | None, to_version: str, finished_at: float | None, watch_seconds: float, now: float
) -> bool:
    """A succeeded task's device reports `version`: is that a rollback to the image it left?"""
    return (
        watch_seconds > 0
        and finished_at is not None
        and now - finished_at <= watch_seconds
        and from_version is not None
        and version == from_version
        and version != to_version
    )


def inform_outcome(version: str, from_version: str | None, to_version: str) -> tuple[TaskState, str] | None:
    """(status, desc) an inform causes for an in-flight task, or None for no change.

    A task whose source version is unknown (the device had not reported one when the job was
    made) takes the first other version reported as its source: a device that has just
    connected reports what it runs, and that report can cross the push it is about to get.
    """
    if version == to_version:
        return TaskState.SUCCEEDED, f"running {version}"
    if from_version is None or version == from_version:
        return None
    return TaskState.FAILED, f"unexpected version {version}"


def step_label(step: int | None) -> str:
    return {
        -1: "upgrade failed",
        -2: "download failed",
        -3: "verification failed",
        -4: "flash write failed",
        -5: "declined",
    }.get(step if step is not None else 0, "device-defined failure")


def in_scope(device: Device, scope: Scope, target_version: str) -> bool:
    """Scope filters (all given must match); devices on the target version never are."""
    version = device.version
    if version == target_version:
        return False
    if scope.version_numbers and version not in scope.version_numbers:
        return False
    if scope.device_keys and device.device_key not in scope.device_keys:
        return False
    return all(device.tags.get(k) in values for k, values in scope.tags.items())


# ---------------------------------------------------------------- operator actions


@dataclass(frozen=True, slots=True)
class Resume:
    """What `resume` of a paused job does: run again, from `wave` on."""

    wave: int


def resume(status: JobStatus, cause: PauseCause, current_wave: int, waves: int) -> Resume | None:
    """Resume of a paused job, or None when the job is not paused.

    A job paused at a wave gate goes on to the next wave anyway (the operator overrides the
    gate); one paused by an operator carries on in the wave it was in.
    """
    if status != JobStatus.PAUSED:
        return None
    if cause == PauseCause.WAVE_GATE and current_wave < waves:
        return Resume(current_wave + 1)
    return Resume(current_wave)


# ---------------------------------------------------------------- versions


@lru_cache(maxsize=1024)
def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    # Natural order: digit runs compare as numbers, other runs as text, separators are ignored.
    parts = re.findall(r"\d+|[A-Za-z]+", version)
    return tuple((0, int(p)) if p.isdigit() else (1, p.lower()) for p in parts)


def is_downgrade(current: str | None, target: str) -> bool:
    """True when a device on `current` would move to a lower `target` (natural version order).

    Unknown versions and versions that compare equal are never downgrades.
    """
    if not current or current == target:
        return False
    return _version_key(target) < _version_key(current)


# ---------------------------------------------------------------- why a job is not moving


@dataclass(frozen=True, slots=True)
class WaitState:
    """Why no task of a live job can move now (`waiting` in the API), and until when if known."""

    reason: Waiting
    until: float | None = None


def next_window_open(s: Schedule, now: float) -> float | None:
    """When the daily window next opens after `now` (None without a daily window)."""
    if s.daily is None:
        return None
    local = datetime.fromtimestamp(now, UTC) + timedelta(minutes=s.tz_offset_minutes)
    start = local.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(minutes=s.daily[0])
    if start <= local:
        start += timedelta(days=1)
    return (start - timedelta(minutes=s.tz_offset_minutes)).timestamp()


def waiting(
    status: JobStatus,
    cause: PauseCause,
    spec: JobSpec,
    counts: dict[TaskState, int],
    *,
    open_wave_pending: int,
    any_online_pending: bool,
    tokens: int,
    now: float,
) -> WaitState | None:
    """Why nothing moves, or None while something can (or nothing is left to do).

    `open_wave_pending` counts pending tasks in the waves already open, `any_online_pending`
    says whether the device of one of them is online; `tokens` is what the rate limit allows now.
    """
    if status == JobStatus.PAUSED:
        return WaitState(Waiting.WAVE_GATE if cause == PauseCause.WAVE_GATE else Waiting.PAUSED)
    if status == JobStatus.SCHEDULED or (spec.schedule.start is not None and now < spec.schedule.start):
        return WaitState(Waiting.BEFORE_START, spec.schedule.start)
    if status != JobStatus.RUNNING or not counts.get(TaskState.PENDING, 0):
        return None
    if not window_open(spec.schedule, now):
        return WaitState(Waiting.OUTSIDE_WINDOW, next_window_open(spec.schedule, now))
    if not open_wave_pending:
        return None  # the rest waits for a later wave, which opens as the current one finishes
    in_flight = sum(counts.get(s, 0) for s in IN_FLIGHT)
    if spec.max_concurrency is not None and in_flight >= spec.max_concurrency:
        return WaitState(Waiting.CONCURRENCY_FULL)
    if tokens <= 0:
        return WaitState(Waiting.RATE_LIMITED)
    if spec.mode == JobMode.REQUEST:
        return WaitState(Waiting.AWAITING_REQUESTS)
    if not any_online_pending:
        return WaitState(Waiting.DEVICES_OFFLINE)
    return None
