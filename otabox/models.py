"""The domain's words as types: task and job states, and the records the server keeps.

Pure (no aiohttp, amqtt or aiosqlite): the store builds these records from rows in one place
(`otabox.server.store.rows`), the job engine and services work on them, and the HTTP layer
presents them as JSON (`otabox.server.http.present`). States are `StrEnum`s, so a state is
stored, sent and compared as its plain string and defined only here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


class TaskState(StrEnum):
    """One device in one job. The first three are active; a device has at most one active task."""

    PENDING = "pending"
    PUBLISHED = "published"
    UPGRADING = "upgrading"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    TIMEOUT = "timeout"
    # After succeeded: the device reported its previous version again within the job's watch period.
    ROLLED_BACK = "rolledBack"


class JobStatus(StrEnum):
    SCHEDULED = "scheduled"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    CANCELED = "canceled"
    ABORTED = "aborted"


class JobType(StrEnum):
    UPGRADE = "upgrade"
    VERIFY = "verify"


class JobMode(StrEnum):
    PUSH = "push"
    REQUEST = "request"


class JobPolicy(StrEnum):
    SNAPSHOT = "snapshot"
    INCREMENTAL = "incremental"


class DeltaMode(StrEnum):
    """Job option `delta`: offer devices a binary delta beside the full image, or never."""

    AUTO = "auto"
    OFF = "off"


class DeltaStatus(StrEnum):
    READY = "ready"
    FAILED = "failed"  # not made (too large, too slow, no saving): pushes carry the full image only


class PauseCause(StrEnum):
    """Why a paused job is paused: what `resume` then does depends on it (`rollout.resume`)."""

    NONE = ""
    OPERATOR = "operator"
    WAVE_GATE = "waveGate"


class FirmwareStatus(StrEnum):
    UNVERIFIED = "unverified"
    VERIFIED = "verified"


class EventKind(StrEnum):
    """A row of the upgrade log: a task state change, a progress report within a state, or
    something that happened to the job as a whole (device key empty)."""

    STATE = "state"
    PROGRESS = "progress"
    JOB = "job"


class JobEvent(StrEnum):
    """The `status` of a job-level row of the upgrade log."""

    PAUSED = "paused"
    RESUMED = "resumed"
    CANCELED = "canceled"
    ABORTED = "aborted"
    WAVE_OPENED = "waveOpened"
    COMPLETED = "completed"
    # A verify job's successes reached its firmware's minSuccessForVerified: the firmware is verified.
    FIRMWARE_VERIFIED = "firmwareVerified"


class Role(StrEnum):
    """What a user may do: each role may do everything of the ones before it."""

    VIEWER = "viewer"  # read
    OPERATOR = "operator"  # + firmware upload/delete, jobs, task retry/cancel
    ADMIN = "admin"  # + products, devices, users, tokens of others, webhooks, backups, bundles

    def allows(self, needed: Role) -> bool:
        order = list(Role)
        return order.index(self) >= order.index(needed)


BUILTIN_ADMIN = "admin"  # the user the first-start admin token belongs to


class DeliveryStatus(StrEnum):
    PENDING = "pending"  # not yet sent, or to be sent again at `next_at`
    DELIVERED = "delivered"
    FAILED = "failed"  # every attempt failed; no more are made


# What a webhook can subscribe to: the job-level rows of the upgrade log as `job.<status>`, the
# end of a task as `task.succeeded` or `task.failed` (failed, timeout or rolledBack: the
# delivery's event says which), and `firmware.verified` (a verify job's `firmwareVerified` row).
WEBHOOK_EVENTS = (
    *(f"job.{e.value}" for e in JobEvent if e != JobEvent.FIRMWARE_VERIFIED),
    "task.succeeded",
    "task.failed",
    "firmware.verified",
)


def webhook_event(kind: str, status: str) -> str | None:
    """The webhook event type of an upgrade-log row (its `kind` and `status`), or None."""
    if kind == EventKind.JOB:
        return "firmware.verified" if status == JobEvent.FIRMWARE_VERIFIED else f"job.{status}"
    if kind != EventKind.STATE:
        return None
    if status == TaskState.SUCCEEDED:
        return "task.succeeded"
    if status in (TaskState.FAILED, TaskState.TIMEOUT, TaskState.ROLLED_BACK):
        return "task.failed"
    return None


class Waiting(StrEnum):
    """Why no task of a live job can move right now (`waiting.reason` in the API)."""

    BEFORE_START = "beforeStart"
    OUTSIDE_WINDOW = "outsideWindow"
    RATE_LIMITED = "rateLimited"
    CONCURRENCY_FULL = "concurrencyFull"
    AWAITING_REQUESTS = "awaitingRequests"
    WAVE_GATE = "waveGate"
    PAUSED = "paused"
    DEVICES_OFFLINE = "devicesOffline"


ACTIVE: tuple[TaskState, ...] = (TaskState.PENDING, TaskState.PUBLISHED, TaskState.UPGRADING)
IN_FLIGHT: tuple[TaskState, ...] = (TaskState.PUBLISHED, TaskState.UPGRADING)
FINISHED: tuple[TaskState, ...] = (
    TaskState.SUCCEEDED,
    TaskState.FAILED,
    TaskState.CANCELED,
    TaskState.TIMEOUT,
    TaskState.ROLLED_BACK,
)
# Finished without the new version running: what abort and wave rules count against a job.
FAILURES: tuple[TaskState, ...] = (TaskState.FAILED, TaskState.TIMEOUT, TaskState.ROLLED_BACK)
# What an operator's retry may restart.
RETRYABLE: tuple[TaskState, ...] = (TaskState.FAILED, TaskState.TIMEOUT, TaskState.CANCELED, TaskState.ROLLED_BACK)
TASK_STATES: tuple[TaskState, ...] = tuple(TaskState)
LIVE_JOBS: tuple[JobStatus, ...] = (JobStatus.SCHEDULED, JobStatus.RUNNING, JobStatus.PAUSED)
JOB_DONE: tuple[JobStatus, ...] = (JobStatus.COMPLETED, JobStatus.CANCELED, JobStatus.ABORTED)
JOB_STATES: tuple[JobStatus, ...] = tuple(JobStatus)


# Actor of what the server's own rules do (abort, wave gates, completion) in the upgrade log.
SYSTEM = "system"


def sql_list(states: tuple[StrEnum, ...]) -> str:
    """`('pending', 'published')`: a state set as an SQL literal list, from the one definition above."""
    return "(" + ", ".join(f"'{s.value}'" for s in states) + ")"


# ---------------------------------------------------------------- times on the wire


def iso(ts: float | None) -> str | None:
    """Epoch seconds -> ISO 8601 UTC with microseconds and a Z (the API's and the export's time format)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(value: str) -> float:
    """ISO 8601 (naive = UTC) -> epoch seconds. Raises ValueError."""
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


# ---------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class Product:
    product_key: str
    name: str
    created_at: float
    devices: int = 0
    # EnOS dynamic activation (secure mode 3): devices log in once with the product secret.
    dynamic_activation: bool = False


@dataclass(frozen=True, slots=True)
class Device:
    product_key: str
    device_key: str
    version: str | None
    online: bool
    last_seen: float | None
    tags: dict[str, str]
    auth: str
    created_at: float
    # May log in only with a device certificate (on the TLS listener).
    require_certificate: bool = False
    # When it received its secret by dynamic activation (secure mode 3 is refused from then on).
    activated_at: float | None = None


@dataclass(frozen=True, slots=True)
class DeviceCertificate:
    """A certificate otabox's CA issued to a device; it identifies the device by its serial."""

    serial: str
    product_key: str
    device_key: str
    fingerprint: str  # sha256 of the DER, hex
    not_after: float
    created_at: float
    revoked_at: float | None = None


@dataclass(frozen=True, slots=True)
class Firmware:
    id: str
    product_key: str
    name: str
    version: str
    desc: str
    size: int
    md5: str
    sha256: str
    sign_method: str
    file_name: str
    status: FirmwareStatus
    enable_verification: bool
    min_success_for_verified: int
    signature: str | None
    created_at: float
    # The trusted publisher whose signed bundle brought it; None for an operator's upload.
    publisher: str | None = None

    @property
    def sign(self) -> str:
        """The digest devices check, in the firmware's sign method."""
        return self.md5 if self.sign_method == "md5" else self.sha256


@dataclass(frozen=True, slots=True)
class Publisher:
    """A vendor whose signed bundles this server trusts (Ed25519 key, base64 of the raw 32 bytes)."""

    name: str
    public_key: str
    created_at: float


@dataclass(frozen=True, slots=True)
class Wave:
    percent: float
    success_ratio: float | None = None


@dataclass(frozen=True, slots=True)
class Scope:
    version_numbers: tuple[str, ...] = ()
    device_keys: tuple[str, ...] = ()
    tags: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Schedule:
    start: float | None = None
    end: float | None = None
    daily: tuple[int, int] | None = None  # minutes after local midnight: [from, to)
    tz_offset_minutes: int = 0


@dataclass(frozen=True, slots=True)
class JobSpec:
    """Everything that steers a job, as validated from the API body (`otabox.jobspec`)."""

    scope: Scope = field(default_factory=Scope)
    mode: JobMode = JobMode.PUSH
    policy: JobPolicy = JobPolicy.SNAPSHOT
    max_concurrency: int | None = None
    rate_per_minute: float | None = None
    timeout_seconds: float = 7200.0
    retry_count: int = 0
    retry_interval: float = 0.0
    abort_ratio: float | None = None
    abort_min_finished: int = 1
    waves: tuple[Wave, ...] = ()
    schedule: Schedule = field(default_factory=Schedule)
    allow_downgrade: bool = False
    rollback_watch_seconds: float = 600.0
    delta: DeltaMode = DeltaMode.AUTO
    # The schedule as the operator gave it (ISO strings, "HH:MM" pairs), shown back unchanged.
    schedule_text: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    name: str
    type: JobType
    firmware_id: str
    product_key: str
    to_version: str
    status: JobStatus
    status_reason: str
    pause_cause: PauseCause
    current_wave: int
    skipped: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    spec: JobSpec

    @property
    def live(self) -> bool:
        return self.status in LIVE_JOBS


@dataclass(frozen=True, slots=True)
class Task:
    job_id: str
    product_key: str
    device_key: str
    status: TaskState
    wave: int
    progress: int | None
    step: int | None
    desc: str | None
    from_version: str | None
    to_version: str
    attempt: int
    due_at: float | None
    retry_at: float | None
    published_at: float | None
    upgrading_at: float | None
    finished_at: float | None
    updated_at: float
    # Bytes of this task's firmware (full image or delta) served to the device; listings only.
    bytes_downloaded: int | None = None


@dataclass(frozen=True, slots=True)
class Delta:
    """A binary delta that rebuilds firmware `to_id` from firmware `from_id` (`otabox.delta`)."""

    from_id: str
    to_id: str
    from_version: str
    algorithm: str
    status: DeltaStatus
    size: int = 0
    md5: str = ""
    sha256: str = ""
    seconds: float = 0.0  # server time spent making it
    error: str = ""
    created_at: float = 0.0

    def sign(self, sign_method: str) -> str:
        return self.md5 if sign_method == "md5" else self.sha256


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts as: a user and the role it has now."""

    username: str
    role: Role
    token_id: str | None = None  # the personal token it came with (None: admin token, password, console)


@dataclass(frozen=True, slots=True)
class User:
    username: str
    role: Role
    password_hash: str  # scrypt, salted ("" for the built-in admin, who signs in with its token)
    created_at: float


@dataclass(frozen=True, slots=True)
class ApiToken:
    id: str
    username: str
    name: str
    token_hash: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None = None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    ts: float
    actor: str
    role: str
    action: str
    target: str
    remote_addr: str
    status: int
    details: str = ""
    seq: int = 0


@dataclass(frozen=True, slots=True)
class Webhook:
    id: str
    url: str
    events: tuple[str, ...]
    secret: str  # key of each delivery's HMAC, as stored: encrypted with the server key
    created_at: float
    created_seq: int  # the log's last seq when it was made: it gets only what came after


@dataclass(frozen=True, slots=True)
class Delivery:
    id: int
    webhook_id: str
    type: str
    body: str
    status: DeliveryStatus
    attempts: int
    next_at: float | None
    last_status: int | None
    last_error: str
    created_at: float
    delivered_at: float | None


@dataclass(frozen=True, slots=True)
class Event:
    """One line of the upgrade log."""

    seq: int
    ts: float
    job_id: str
    job_type: str
    firmware_id: str
    product_key: str
    device_key: str
    from_version: str | None
    to_version: str | None
    status: str
    kind: str
    step: int | None
    desc: str | None
    attempt: int
    wave: int | None
    bytes_downloaded: int | None
    actor: str | None = None


@dataclass(frozen=True, slots=True)
class NodeState:
    """One otabox node sharing the database: up while its heartbeat is younger than the timeout."""

    node_id: str
    up: bool
    devices_connected: int
    last_heartbeat: float
    leader: bool = False  # the one making the job decisions (otabox.server.cluster)
