"""The export's tables and their columns with types: the one definition the writer, the API's
CSV of the upgrade log and the analysis module (`otabox.analysis`) all read. Pure.

Types: "str", "int", "float", "bool", "time" (ISO 8601 UTC), "json", or a list of categories.
"""

from __future__ import annotations

from typing import Any

from otabox.models import EventKind, FirmwareStatus, JobEvent, JobMode, JobPolicy, JobStatus, JobType, TaskState

FORMATS = ("csv", "jsonl", "parquet")
TASK_STATUSES = [s.value for s in TaskState]
# The `status` of a job-level event row (kind "job", deviceKey empty).
JOB_EVENTS = [e.value for e in JobEvent]

EVENTS: dict[str, Any] = {
    "seq": "int",
    "ts": "time",
    "jobId": "str",
    "jobType": [t.value for t in JobType],
    "firmwareId": "str",
    "productKey": "str",
    "deviceKey": "str",
    "fromVersion": "str",
    "toVersion": "str",
    "status": list(dict.fromkeys(TASK_STATUSES + JOB_EVENTS)),
    "kind": [k.value for k in EventKind],
    "step": "int",
    "desc": "str",
    "attempt": "int",
    "wave": "int",
    "bytesDownloaded": "int",
    "actor": "str",
}
JOBS: dict[str, Any] = {
    "id": "str",
    "name": "str",
    "type": [t.value for t in JobType],
    "firmwareId": "str",
    "productKey": "str",
    "status": [s.value for s in JobStatus],
    "statusReason": "str",
    "mode": [m.value for m in JobMode],
    "policy": [p.value for p in JobPolicy],
    "createdAt": "time",
    "startedAt": "time",
    "finishedAt": "time",
    "total": "int",
    **{status: "int" for status in TASK_STATUSES},
    "currentWave": "int",
    "waves": "json",
}
FIRMWARE: dict[str, Any] = {
    "id": "str",
    "productKey": "str",
    "name": "str",
    "version": "str",
    "size": "int",
    "md5": "str",
    "sha256": "str",
    "signMethod": ["md5", "sha256"],
    "status": [s.value for s in FirmwareStatus],
    "createdAt": "time",
}
DEVICES: dict[str, Any] = {
    "productKey": "str",
    "deviceKey": "str",
    "version": "str",
    "online": "bool",
    "lastSeen": "time",
    "createdAt": "time",
    "tags": "json",
}
SCHEMAS: dict[str, dict[str, Any]] = {"events": EVENTS, "jobs": JOBS, "firmware": FIRMWARE, "devices": DEVICES}

EVENT_COLUMNS = tuple(EVENTS)
JOB_COLUMNS = tuple(JOBS)
FIRMWARE_COLUMNS = tuple(FIRMWARE)
DEVICE_COLUMNS = tuple(DEVICES)
