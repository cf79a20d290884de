"""Rows -> records: the one place where a database row becomes a `otabox.models` record."""

from __future__ import annotations

import json
from functools import lru_cache

from otabox import jobspec
from otabox.models import (
    Delivery,
    DeliveryStatus,
    Delta,
    DeltaStatus,
    Device,
    DeviceCertificate,
    Event,
    Firmware,
    FirmwareStatus,
    Job,
    JobSpec,
    JobStatus,
    JobType,
    PauseCause,
    Product,
    Publisher,
    Task,
    TaskState,
    Webhook,
)
from otabox.server.store.base import Row


def product(row: Row) -> Product:
    return Product(row["product_key"], row["name"], row["created_at"], row["devices"], bool(row["dynamic_activation"]))


def device(row: Row) -> Device:
    return Device(
        product_key=row["product_key"],
        device_key=row["device_key"],
        version=row["version"],
        online=bool(row["online"]),
        last_seen=row["last_seen"],
        tags=json.loads(row["tags"]) if row["tags"] else {},
        auth=row["auth"],
        created_at=row["created_at"],
        require_certificate=bool(row["require_certificate"]),
        activated_at=row["activated_at"],
    )


def certificate(row: Row) -> DeviceCertificate:
    return DeviceCertificate(
        row["serial"],
        row["product_key"],
        row["device_key"],
        row["fingerprint"],
        row["not_after"],
        row["created_at"],
        row["revoked_at"],
    )


def firmware(row: Row) -> Firmware:
    return Firmware(
        id=row["id"],
        product_key=row["product_key"],
        name=row["name"],
        version=row["version"],
        desc=row["desc"],
        size=row["size"],
        md5=row["md5"],
        sha256=row["sha256"],
        sign_method=row["sign_method"],
        file_name=row["file_name"],
        status=FirmwareStatus(row["status"]),
        enable_verification=bool(row["enable_verification"]),
        min_success_for_verified=row["min_success_for_verified"],
        signature=row["signature"],
        created_at=row["created_at"],
        publisher=row["publisher"],
    )


def publisher(row: Row) -> Publisher:
    return Publisher(row["name"], row["public_key"], row["created_at"])


@lru_cache(maxsize=256)
def _spec(text: str) -> JobSpec:
    # A job's spec never changes after creation, and jobs are read on every device report.
    return jobspec.from_json(json.loads(text))


def job(row: Row) -> Job:
    return Job(
        id=row["id"],
        name=row["name"],
        type=JobType(row["type"]),
        firmware_id=row["firmware_id"],
        product_key=row["product_key"],
        to_version=row["to_version"],
        status=JobStatus(row["status"]),
        status_reason=row["status_reason"],
        pause_cause=PauseCause(row["pause_cause"]),
        current_wave=row["current_wave"],
        skipped=row["skipped"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        spec=_spec(row["spec"]),
    )


def task(row: Row) -> Task:
    return Task(
        job_id=row["job_id"],
        product_key=row["product_key"],
        device_key=row["device_key"],
        status=TaskState(row["status"]),
        wave=row["wave"],
        progress=row["progress"],
        step=row["step"],
        desc=row["desc"],
        from_version=row["from_version"],
        to_version=row["to_version"],
        attempt=row["attempt"],
        due_at=row["due_at"],
        retry_at=row["retry_at"],
        published_at=row["published_at"],
        upgrading_at=row["upgrading_at"],
        finished_at=row["finished_at"],
        updated_at=row["updated_at"],
        bytes_downloaded=row["bytes_downloaded"] if "bytes_downloaded" in row.keys() else None,  # noqa: SIM118
    )


def event(r: Row) -> Event:
    return Event(
        seq=r["seq"],
        ts=r["ts"],
        job_id=r["job_id"],
        job_type=r["job_type"],
        firmware_id=r["firmware_id"],
        product_key=r["product_key"],
        device_key=r["device_key"],
        from_version=r["from_version"],
        to_version=r["to_version"],
        status=r["status"],
        kind=r["kind"],
        step=r["step"],
        desc=r["desc"],
        attempt=r["attempt"],
        wave=r["wave"],
        bytes_downloaded=r["bytes_downloaded"],
        actor=r["actor"],
    )


def delta(r: Row) -> Delta:
    return Delta(
        from_id=r["from_id"],
        to_id=r["to_id"],
        from_version=r["from_version"],
        algorithm=r["algorithm"],
        status=DeltaStatus(r["status"]),
        size=r["size"],
        md5=r["md5"],
        sha256=r["sha256"],
        seconds=r["seconds"],
        error=r["error"],
        created_at=r["created_at"],
    )


def webhook(r: Row) -> Webhook:
    return Webhook(r["id"], r["url"], tuple(json.loads(r["events"])), r["secret"], r["created_at"], r["created_seq"])


def delivery(r: Row) -> Delivery:
    return Delivery(
        id=r["id"],
        webhook_id=r["webhook_id"],
        type=r["type"],
        body=r["body"],
        status=DeliveryStatus(r["status"]),
        attempts=r["attempts"],
        next_at=r["next_at"],
        last_status=r["last_status"],
        last_error=r["last_error"],
        created_at=r["created_at"],
        delivered_at=r["delivered_at"],
    )
