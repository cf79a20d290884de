"""Records as the API (and the export) show them: camelCase keys, ISO 8601 times. The one place for that JSON shape.

Pure: used by the HTTP layer and by `otabox.export` reading a data dir.
"""

from __future__ import annotations

import json
from typing import Any

from otabox import jobspec
from otabox.models import (
    TASK_STATES,
    ApiToken,
    AuditEntry,
    Delivery,
    DeliveryStatus,
    Delta,
    Device,
    DeviceCertificate,
    Event,
    Firmware,
    Job,
    NodeState,
    Product,
    Publisher,
    Task,
    TaskState,
    User,
    Webhook,
    iso,
)
from otabox.rollout import WaitState


def product(p: Product) -> dict[str, Any]:
    return {
        "productKey": p.product_key,
        "name": p.name,
        "createdAt": iso(p.created_at),
        "devices": p.devices,
        "dynamicActivation": p.dynamic_activation,
    }


def device(d: Device) -> dict[str, Any]:
    return {
        "productKey": d.product_key,
        "deviceKey": d.device_key,
        "version": d.version,
        "online": d.online,
        "lastSeen": iso(d.last_seen),
        "tags": d.tags,
        "auth": d.auth,
        "createdAt": iso(d.created_at),
        "requireCertificate": d.require_certificate,
        "activatedAt": iso(d.activated_at),
    }


def certificate(c: DeviceCertificate) -> dict[str, Any]:
    return {
        "serial": c.serial,
        "productKey": c.product_key,
        "deviceKey": c.device_key,
        "fingerprint": c.fingerprint,
        "notAfter": iso(c.not_after),
        "createdAt": iso(c.created_at),
        "revokedAt": iso(c.revoked_at),
        "status": "revoked" if c.revoked_at is not None else "valid",
    }


def firmware(fw: Firmware) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": fw.id,
        "productKey": fw.product_key,
        "name": fw.name,
        "version": fw.version,
        "desc": fw.desc,
        "size": fw.size,
        "md5": fw.md5,
        "sha256": fw.sha256,
        "signMethod": fw.sign_method,
        "sign": fw.sign,
        "fileName": fw.file_name,
        "status": fw.status.value,
        "enableVerification": fw.enable_verification,
        "minSuccessForVerified": fw.min_success_for_verified,
        "createdAt": iso(fw.created_at),
    }
    if fw.signature is not None:
        out["signature"] = fw.signature
    out["publisher"] = fw.publisher
    return out


def publisher(p: Publisher) -> dict[str, Any]:
    return {"name": p.name, "publicKey": p.public_key, "createdAt": iso(p.created_at)}


def job(j: Job, counts: dict[TaskState, int], retries_pending: int) -> dict[str, Any]:
    full = {s.value: counts.get(s, 0) for s in TASK_STATES}
    return {
        "id": j.id,
        "name": j.name,
        "type": j.type.value,
        "firmwareId": j.firmware_id,
        "productKey": j.product_key,
        "toVersion": j.to_version,
        "status": j.status.value,
        "statusReason": j.status_reason,
        "currentWave": j.current_wave,
        "skipped": j.skipped,
        "createdAt": iso(j.created_at),
        "startedAt": iso(j.started_at),
        "finishedAt": iso(j.finished_at),
        **jobspec.to_json(j.spec),
        "counts": full,
        "total": sum(full.values()),
        "retriesPending": retries_pending,
    }


def waiting(w: WaitState | None) -> dict[str, Any] | None:
    if w is None:
        return None
    return {"reason": w.reason.value, **({"until": iso(w.until)} if w.until is not None else {})}


def delta(d: Delta) -> dict[str, Any]:
    return {
        "fromId": d.from_id,
        "fromVersion": d.from_version,
        "toId": d.to_id,
        "algorithm": d.algorithm,
        "status": d.status.value,
        "fileSize": d.size,
        "sha256": d.sha256 or None,
        "seconds": d.seconds,
        "error": d.error or None,
        "createdAt": iso(d.created_at),
    }


def webhook(w: Webhook) -> dict[str, Any]:
    """A webhook as the API shows it: never its secret."""
    return {"id": w.id, "url": w.url, "events": list(w.events), "createdAt": iso(w.created_at)}


def delivery(d: Delivery) -> dict[str, Any]:
    return {
        "id": d.id,
        "webhookId": d.webhook_id,
        "type": d.type,
        "status": d.status.value,
        "attempts": d.attempts,
        "nextAt": iso(d.next_at) if d.status == DeliveryStatus.PENDING else None,
        "lastStatus": d.last_status,
        "lastError": d.last_error or None,
        "createdAt": iso(d.created_at),
        "deliveredAt": iso(d.delivered_at),
        "body": json.loads(d.body),
    }


def task(t: Task) -> dict[str, Any]:
    return {
        "jobId": t.job_id,
        "productKey": t.product_key,
        "deviceKey": t.device_key,
        "status": t.status.value,
        "wave": t.wave,
        "progress": t.progress,
        "step": t.step,
        "desc": t.desc,
        "fromVersion": t.from_version,
        "toVersion": t.to_version,
        "attempt": t.attempt,
        "dueAt": iso(t.due_at),
        "retryAt": iso(t.retry_at),
        "publishedAt": iso(t.published_at),
        "upgradingAt": iso(t.upgrading_at),
        "finishedAt": iso(t.finished_at),
        "updatedAt": iso(t.updated_at),
        "bytesDownloaded": t.bytes_downloaded,
    }


def event(e: Event) -> dict[str, Any]:
    return {
        "seq": e.seq,
        "ts": iso(e.ts),
        "jobId": e.job_id,
        "jobType": e.job_type,
        "firmwareId": e.firmware_id,
        "productKey": e.product_key,
        "deviceKey": e.device_key,
        "fromVersion": e.from_version,
        "toVersion": e.to_version,
        "status": e.status,
        "kind": e.kind,
        "step": e.step,
        "desc": e.desc,
        "attempt": e.attempt,
        "wave": e.wave,
        "bytesDownloaded": e.bytes_downloaded,
        "actor": e.actor,
    }


def node(n: NodeState) -> dict[str, Any]:
    return {
        "nodeId": n.node_id,
        "status": "up" if n.up else "down",
        "devicesConnected": n.devices_connected,
        "lastHeartbeat": iso(n.last_heartbeat),
        "leader": n.leader,
    }


def user(u: User) -> dict[str, Any]:
    """A user as the API shows it: never its password hash."""
    return {"username": u.username, "role": u.role.value, "createdAt": iso(u.created_at)}


def token(t: ApiToken) -> dict[str, Any]:
    """A personal token as the API lists it: never the token itself."""
    return {
        "id": t.id,
        "name": t.name,
        "username": t.username,
        "createdAt": iso(t.created_at),
        "expiresAt": iso(t.expires_at),
        "revokedAt": iso(t.revoked_at),
        "lastUsedAt": iso(t.last_used_at),
    }


def audit_entry(e: AuditEntry) -> dict[str, Any]:
    return {
        "ts": iso(e.ts),
        "actor": e.actor,
        "role": e.role,
        "action": e.action,
        "target": e.target,
        "remoteAddr": e.remote_addr,
        "status": e.status,
        "details": e.details,
    }
