"""The store on each backend: every test here runs on SQLite and on a real PostgreSQL.

What differs between the two dialects is pinned here: sort order of text (bytewise on both),
LIKE (case-insensitive on both), CAST to INTEGER (truncates on both), JSON tag filters, upserts,
integer sums (ints, not decimals), identity columns, unique violations (DuplicateError), and
the group commit's promise: ops of one batch fail alone and nothing is seen half-written.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from otabox.models import (
    ApiToken,
    AuditEntry,
    DeliveryStatus,
    Delta,
    DeltaStatus,
    DeviceCertificate,
    EventKind,
    Firmware,
    FirmwareStatus,
    Job,
    JobEvent,
    JobSpec,
    JobStatus,
    JobType,
    PauseCause,
    Role,
    Scope,
    TaskState,
    User,
    Webhook,
)
from otabox.server.store import DuplicateError, JobLogEntry, Store
from otabox.server.store.base import IntegrityError, Tx
from otabox.server.store.dialect import postgres
from otabox.server.store.migrations import MIGRATIONS
from otabox.server.store.webhooks import CURSOR_KEY


@pytest.fixture
async def store(store_target: str | Path) -> AsyncIterator[Store]:
    opened = await Store.open(store_target)
    try:
        yield opened
    finally:
        await opened.close()


def firmware(fid: str, version: str, name: str = "fw", pk: str = "pk1") -> Firmware:
    return Firmware(
        id=fid, product_key=pk, name=name, version=version, desc="d", size=3_000_000_000, md5="m" * 32,
        sha256=fid * 4, sign_method="sha256", file_name="fw.bin", status=FirmwareStatus.UNVERIFIED,
        enable_verification=False, min_success_for_verified=1, signature=None, created_at=time.time(),
    )  # fmt: skip


def job(jid: str, fw: Firmware, spec: JobSpec | None = None) -> Job:
    return Job(
        id=jid, name=jid, type=JobType.UPGRADE, firmware_id=fw.id, product_key=fw.product_key,
        to_version=fw.version, status=JobStatus.RUNNING, status_reason="", pause_cause=PauseCause.NONE,
        current_wave=0, skipped=0, created_at=time.time(), started_at=time.time(), finished_at=None,
        spec=spec or JobSpec(),
    )  # fmt: skip


async def fleet(store: Store, keys: list[str], pk: str = "pk1", tags: dict[str, str] | None = None) -> None:
    if await store.get_product(pk) is None:
        await store.create_product(pk, pk)
    await store.create_devices(pk, [(dk, "enc", "sign", tags or {}) for dk in keys])


async def test_migrations_apply_once(store_target: str | Path, store: Store) -> None:
    rows = await store._all("SELECT name FROM migrations ORDER BY name")
    assert [r["name"] for r in rows] == [name for name, _ in MIGRATIONS]
    again = await Store.open(store_target)
    try:
        assert await again.migrate() == []
    finally:
        await again.close()


async def test_kv(store: Store) -> None:
    assert await store.get_kv("k") is None
    await store.set_kv("k", "1")
    await store.set_kv("k", "2")
    assert await store.get_kv("k") == "2"


async def test_products_and_devices(store: Store) -> None:
    product = await store.create_product("pk1", "Product", product_secret_enc="sec")
    assert product.dynamic_activation
    with pytest.raises(DuplicateError):
        await store.create_product("pk1", "again")
    await fleet(store, ["b", "a", "B", "_x", "a%"], tags={"site": "lab", "rack": "1"})
    with pytest.raises(DuplicateError):
        await fleet(store, ["c", "a"])
    assert await store.get_device("pk1", "c") is None  # the whole batch of devices or none
    got = await store.get_product("pk1")
    assert got is not None and got.devices == 5 and type(got.devices) is int
    listed, total = await store.list_devices("pk1")
    assert total == 5
    assert [d.device_key for d in listed] == ["B", "_x", "a", "a%", "b"]  # bytewise, as SQLite sorts
    page, _ = await store.list_devices("pk1", limit=2, offset=1)
    assert [d.device_key for d in page] == ["_x", "a"]
    assert await store.existing_device_keys("pk1", ["a", "zz", "B"]) == {"a", "B"}
    await store.set_device_tags("pk1", "a", {"site": "home", "rack": "2"})
    found, n = await store.list_devices("pk1", tags={"site": "home"})
    assert n == 1 and found[0].device_key == "a" and found[0].tags == {"site": "home", "rack": "2"}
    _, n = await store.list_devices("pk1", tags={"site": "lab", "rack": "1"})
    assert n == 4
    await store.set_device_online("pk1", "b", True)
    online, n = await store.list_devices("pk1", online=True)
    assert n == 1 and online[0].online and online[0].last_seen is not None
    assert await store.device_counts() == {"pk1": {"online": 1, "offline": 4}}
    assert await store.mark_all_offline() == 1
    await store.set_device_version("pk1", "a", "1.0")
    _, n = await store.list_devices("pk1", version="1.0")
    assert n == 1
    creds = await store.device_credentials("pk1", "a")
    assert creds is not None and creds.dynamic_activation and not creds.activated and not creds.require_certificate
    assert await store.set_device_secret("pk1", "a", "enc2")
    assert not await store.set_device_secret("pk1", "nobody", "x")
    assert await store.delete_device("pk1", "b")
    assert not await store.delete_device("pk1", "b")


async def test_identity(store: Store) -> None:
    await fleet(store, ["d1"])
    cert = DeviceCertificate("01ab", "pk1", "d1", "f" * 64, time.time() + 3600, time.time())
    await store.add_certificate(cert)
    with pytest.raises(DuplicateError):
        await store.add_certificate(cert)
    assert await store.get_certificate("01ab") == cert
    assert await store.revoke_certificate("pk1", "d1", "01ab")
    first = await store.get_certificate("01ab")
    assert first is not None and first.revoked_at is not None
    assert await store.revoke_certificate("pk1", "d1", "01ab")
    again = await store.get_certificate("01ab")
    assert again is not None and again.revoked_at == first.revoked_at
    assert [c.serial for c in await store.list_certificates("pk1", "d1")] == ["01ab"]
    assert await store.set_require_certificate("pk1", "d1", True)
    assert await store.product_secret("pk1") is None
    assert await store.set_product_activation("pk1", "psec")
    assert await store.product_secret("pk1") == "psec"
    assert await store.mark_activated("pk1", "d1")
    assert not await store.mark_activated("pk1", "d1")
    creds = await store.device_credentials("pk1", "d1")
    assert creds is not None and creds.require_certificate and creds.activated


async def test_firmware_and_downloads(store: Store) -> None:
    await store.create_product("pk1", "p")
    fw = await store.create_firmware(firmware("f1", "1.0"))
    with pytest.raises(DuplicateError):
        await store.create_firmware(firmware("f2", "1.0"))
    with pytest.raises(DuplicateError):  # a bundle: all or none
        await store.create_firmware_many([firmware("f3", "3.0"), firmware("f4", "1.0")])
    assert await store.get_firmware("f3") is None
    got = await store.get_firmware("f1")
    assert got == fw and got.size == 3_000_000_000  # past 32 bits
    assert await store.firmware_conflict("pk1", "fw", "1.0")
    assert await store.sha256_in_use(fw.sha256)
    await store.add_download("pk1", "d1", "f1", 2_000_000_000)
    await store.add_download("pk1", "d1", "f1", 2_000_000_000)
    assert await store.downloaded_bytes("pk1", "d1", "f1") == 4_000_000_000
    total = await store.download_bytes_total()
    assert total == 4_000_000_000 and type(total) is int
    await store.put_delta(Delta("f0", "f1", "0.9", "detools", DeltaStatus.FAILED, error="too big"))
    await store.put_delta(Delta("f0", "f1", "0.9", "detools", DeltaStatus.READY, size=10, sha256="ab", seconds=0.5))
    delta = await store.get_delta("f0", "f1")
    assert delta is not None and delta.status == DeltaStatus.READY and delta.error == "" and delta.seconds == 0.5
    assert await store.stored_digests() == {fw.sha256, "ab"}
    assert [d.to_id for d in await store.deltas_of("f1")] == ["f1"]
    await store.delete_deltas_of("f1")
    assert await store.deltas_of("f1") == []
    publisher = await store.create_publisher("acme", "key")
    with pytest.raises(DuplicateError):
        await store.create_publisher("other", "key")
    assert await store.list_publishers() == [publisher]
    assert await store.delete_firmware("f1")


async def test_publishing_a_batch_moves_only_its_pending_tasks(store: Store) -> None:
    """One statement for the batch: tasks already published, unknown devices and repeated keys
    are left out of what it returns and of the log; the order of the keys given is kept."""
    await fleet(store, [f"d{i}" for i in range(5)])
    fw = await store.create_firmware(firmware("f1", "2.0"))
    await store.create_job(job("j1", fw), [(f"d{i}", "1.0", 0) for i in range(5)])
    assert await store.publish_tasks("j1", "pk1", ["d1"], 1.0, 2.0) == ["d1"]
    moved = await store.publish_tasks("j1", "pk1", ["d3", "d1", "nobody", "d0", "d3"], 1.0, 2.0)
    assert moved == ["d3", "d0"]
    assert await store.publish_tasks("j1", "pk1", ["d1", "d0"], 1.0, 2.0) == []
    assert await store.job_counts("j1") == {TaskState.PUBLISHED: 3, TaskState.PENDING: 2}
    published = [e.device_key async for e in store.iter_events(job_id="j1") if e.status == TaskState.PUBLISHED]
    assert sorted(published) == ["d0", "d1", "d3"]
    task = await store.active_task("pk1", "d3")
    assert task is not None and (task.published_at, task.due_at) == (1.0, 2.0)
    # Every size up to a full batch (the key lists are padded to a power of two).
    await fleet(store, [f"e{i}" for i in range(1000)])
    await store.create_job(job("j2", fw), [(f"e{i}", "1.0", 0) for i in range(1000)])
    keys = [f"e{i}" for i in range(1000)]
    start = 0
    for n in (1, 2, 3, 5, 64, 65, 860):
        assert await store.publish_tasks("j2", "pk1", keys[start : start + n], 1.0, 2.0) == keys[start : start + n]
        start += n
    assert start == 1000 and await store.job_counts("j2") == {TaskState.PUBLISHED: 1000}


async def test_a_job_and_its_tasks(store: Store) -> None:
    await fleet(store, [f"d{i}" for i in range(6)])
    fw = await store.create_firmware(firmware("f1", "2.0"))
    j = job("j1", fw)
    await store.create_job(j, [(f"d{i}", "1.0", 1 if i < 3 else 2) for i in range(6)])
    assert await store.get_job("j1") == j
    assert await store.job_counts("j1") == {TaskState.PENDING: 6}
    assert await store.wave_counts("j1") == {1: {TaskState.PENDING: 3}, 2: {TaskState.PENDING: 3}}
    await store.set_device_online("pk1", "d0", True)
    assert await store.pending_in_waves("j1", 1) == 3 and await store.pending_in_waves("j1", 2) == 6
    assert type(await store.pending_in_waves("j1", 2)) is int
    assert await store.pending_online("j1", 1)
    await store.set_device_online("pk1", "d0", False)
    await store.set_device_online("pk1", "d4", True)
    assert not await store.pending_online("j1", 1) and await store.pending_online("j1", 2)
    await store.set_device_online("pk1", "d4", False)
    await store.set_device_online("pk1", "d0", True)
    assert [t.device_key for t in await store.pushable_tasks("j1", 2, 10)] == ["d0"]
    moved = await store.publish_tasks("j1", "pk1", ["d0", "d1"], time.time(), time.time() - 1)
    assert moved == ["d0", "d1"]
    assert {t.device_key for t in await store.due_tasks(time.time())} == {"d0", "d1"}
    # expect= guards the transition: a second one from the same state writes nothing
    assert await store.transition("j1", "pk1", "d0", expect=[TaskState.PUBLISHED], status=TaskState.UPGRADING)
    assert not await store.transition("j1", "pk1", "d0", expect=[TaskState.PUBLISHED], status=TaskState.UPGRADING)
    assert await store.transition("j1", "pk1", "d0", kind=EventKind.PROGRESS, progress=50, step=2, desc="half way")
    finished = time.time()
    assert await store.transition("j1", "pk1", "d0", status=TaskState.SUCCEEDED, finished_at=finished, due_at=None)
    assert await store.transition("j1", "pk1", "d1", status=TaskState.FAILED, finished_at=finished, retry_at=0.0)
    assert [t.device_key for t in await store.due_retries(time.time())] == ["d1"]
    assert await store.retries_pending("j1") == 1
    assert await store.succeeded_count("j1") == 1
    done = await store.last_succeeded("pk1", "d0")
    assert done is not None and done.desc == "half way" and done.progress == 50
    # A live job's successes may come at any moment: watched until now + its watch.
    now = time.time()
    assert await store.rollback_watch_until(now) == pytest.approx(now + j.spec.rollback_watch_seconds)
    active = await store.active_task("pk1", "d2")
    assert active is not None and active.status == TaskState.PENDING
    tasks, total = await store.list_tasks("j1", None, 10, 0)
    assert total == 6 and [t.device_key for t in tasks][:2] == ["d0", "d1"]
    assert tasks[0].bytes_downloaded is None
    assert await store.jobs_using_firmware("f1") == ["j1"]
    assert [x.id for x in await store.live_jobs()] == ["j1"]
    jobs, n = await store.list_jobs([JobStatus.RUNNING], 10, 0)
    assert n == 1 and jobs[0].id == "j1"
    assert await store.job_status_counts() == {JobStatus.RUNNING: 1}
    states = await store.task_state_counts()
    assert states == {TaskState.SUCCEEDED: 1, TaskState.FAILED: 1, TaskState.PENDING: 4}


async def test_a_progress_report_decides_on_the_task_as_it_is_when_written(store: Store) -> None:
    """`report_progress` reads nothing before its write: one op finds the device's task in the
    write's own transaction, so a cancel or a retry committed just before is what it sees."""
    await fleet(store, ["d1", "d2", "d3"])
    fw = await store.create_firmware(firmware("f1", "2.0"))
    await store.create_job(job("j1", fw, JobSpec(timeout_seconds=600.0)), [(dk, "1.0", 0) for dk in ("d1", "d2")])

    async def log_of(dk: str) -> list[tuple[str, str, int | None]]:
        rows = await store._all("SELECT status, kind, step FROM events WHERE device_key = ? ORDER BY seq", (dk,))
        return [(r["status"], r["kind"], r["step"]) for r in rows]

    assert not await store.report_progress("pk1", "d3", 10, None)  # no task at all
    assert not await store.report_progress("pk1", "d1", 10, None)  # pending: not in flight
    assert await log_of("d1") == [("pending", "state", None)]
    await store.publish_tasks("j1", "pk1", ["d1", "d2"], time.time(), time.time() + 60)
    before = time.time()
    # The first report confirms the push: upgrading, the job's timeout from now, a state row.
    assert await store.report_progress("pk1", "d1", 10, "downloading")
    t = await store.active_task("pk1", "d1")
    assert t is not None and t.status == TaskState.UPGRADING and (t.progress, t.step, t.desc) == (10, 10, "downloading")
    assert t.upgrading_at is not None and t.upgrading_at >= before
    assert t.due_at == pytest.approx(t.upgrading_at + 600.0)
    # Later ones keep the highest step (a late lower one does not move it back), each a progress row.
    assert await store.report_progress("pk1", "d1", 50, "half")
    assert await store.report_progress("pk1", "d1", 30, None)
    t = await store.active_task("pk1", "d1")
    assert t is not None and (t.progress, t.step, t.desc) == (50, 50, None)
    assert t.due_at == pytest.approx(before + 600, abs=5)  # not restarted by later reports
    assert await log_of("d1") == [
        ("pending", "state", None),
        ("published", "state", None),
        ("upgrading", "state", 10),
        ("upgrading", "progress", 50),
        ("upgrading", "progress", 50),
    ]
    # Canceled (e.g. through the API) between two reports: the next one is refused, nothing written.
    await store.bulk_transition("j1", (TaskState.UPGRADING,), ["d1"], status=TaskState.CANCELED, finished_at=1.0)
    assert not await store.report_progress("pk1", "d1", 60, None)
    assert (await log_of("d1"))[-1] == ("canceled", "state", 50)
    # Retried: a new pending attempt is not in flight either; once pushed again it starts afresh.
    await store.transition("j1", "pk1", "d2", status=TaskState.FAILED, finished_at=1.0)
    assert await store.retry_task("j1", "pk1", "d2") == 1
    assert not await store.report_progress("pk1", "d2", 70, None)
    await store.publish_tasks("j1", "pk1", ["d2"], time.time(), time.time() + 60)
    assert await store.report_progress("pk1", "d2", 0, None)
    t = await store.active_task("pk1", "d2")
    assert t is not None and (t.status, t.progress, t.attempt) == (TaskState.UPGRADING, 0, 2)
    e = (await store.recent_events(1, device_key="d2"))[0]
    assert (e.status, e.kind, e.attempt, e.job_type, e.firmware_id, e.to_version) == (
        "upgrading", EventKind.STATE, 2, JobType.UPGRADE, "f1", "2.0"
    )  # fmt: skip


async def test_a_device_has_one_active_task(store: Store) -> None:
    await fleet(store, ["d1", "d2"])
    fw = await store.create_firmware(firmware("f1", "2.0"))
    await store.create_job(job("j1", fw), [("d1", None, 0)])
    other = job("j2", fw)
    await store.create_job(other, [("d2", None, 0)])
    assert not await store.add_job_task(other, "d1", None, 0)  # d1 is busy in j1
    assert await store.transition("j2", "pk1", "d2", status=TaskState.FAILED, finished_at=time.time())
    assert await store.add_job_task(job("j1", fw), "d2", None, 0)
    assert await store.retry_task("j2", "pk1", "d2") == 0  # busy in j1 meanwhile: refused, not raised
    devices, busy = await store.scope_devices("pk1", Scope(), "2.0")
    assert devices == [] and busy == 2


async def test_end_job_is_one_transaction(store: Store) -> None:
    await fleet(store, ["d1", "d2", "d3"])
    fw = await store.create_firmware(firmware("f1", "2.0"))
    await store.create_job(job("j1", fw), [("d1", None, 0), ("d2", None, 0), ("d3", None, 0)])
    await store.transition("j1", "pk1", "d3", status=TaskState.FAILED, retry_at=time.time() + 60)
    entry = JobLogEntry(JobEvent.ABORTED, "alice", "too many failures")
    ended_at = time.time()
    canceled = await store.end_job("j1", JobStatus.ABORTED, entry, (TaskState.PENDING,), ended_at)
    assert canceled == 2
    # Its successes all came before it ended: watched until then + its watch (from the spec).
    assert await store.rollback_watch_until(ended_at + 5) == pytest.approx(ended_at + 600)
    await store.create_job(job("j2", fw, JobSpec(rollback_watch_seconds=7200)), [])
    await store.end_job(
        "j2", JobStatus.CANCELED, JobLogEntry(JobEvent.CANCELED, "a"), (TaskState.PENDING,), ended_at + 1
    )
    assert await store.rollback_watch_until(ended_at + 5) == pytest.approx(ended_at + 1 + 7200)
    assert await store.job_counts("j1") == {TaskState.CANCELED: 2, TaskState.FAILED: 1}
    assert await store.retries_pending("j1") == 0
    ended = await store.get_job("j1")
    assert ended is not None and ended.status == JobStatus.ABORTED and ended.finished_at is not None
    logged = [e for e in await store.recent_events(10, job_id="j1") if e.kind == EventKind.JOB]
    assert [(e.status, e.actor, e.device_key) for e in logged] == [("aborted", "alice", "")]
    await store.set_job("j1", status=JobStatus.RUNNING, reopen=True, event=JobLogEntry(JobEvent.RESUMED, "bob"))
    reopened = await store.get_job("j1")
    assert reopened is not None and reopened.finished_at is None and reopened.status == JobStatus.RUNNING


async def test_the_upgrade_log(store: Store) -> None:
    await fleet(store, [f"d{i}" for i in range(5)])
    fw = await store.create_firmware(firmware("f1", "2.0"))
    await store.create_job(job("j1", fw), [(f"d{i}", "1.0", 0) for i in range(5)])
    assert await store.count_events("j1", None, None) == 5
    events = [e async for e in store.iter_events(job_id="j1", batch=2)]
    assert [e.seq for e in events] == sorted(e.seq for e in events) and len(events) == 5
    assert all(type(e.seq) is int for e in events)
    assert await store.last_event_seq() == events[-1].seq
    start = time.time()
    # finish times 0.2, 1.7 and 2.9 buckets after start: CAST(... AS INTEGER) truncates (0, 1, 2)
    for dk, offset, state in (("d0", 0.2, TaskState.SUCCEEDED), ("d1", 1.7, TaskState.FAILED),
                              ("d2", 2.9, TaskState.SUCCEEDED)):  # fmt: skip
        await store.transition("j1", "pk1", dk, status=state, finished_at=start + offset)
    rows = await store._all("SELECT seq, ts FROM events WHERE status IN ('succeeded', 'failed') ORDER BY seq")
    for (dk, offset), row in zip((("d0", 0.2), ("d1", 1.7), ("d2", 2.9)), rows, strict=True):
        await store._write("UPDATE events SET ts = ? WHERE seq = ?", (start + offset, row["seq"]))
        assert dk
    histogram = await store.finish_histogram("j1", start, 1.0)
    assert histogram == [(0, "succeeded", 1), (1, "failed", 1), (2, "succeeded", 1)]
    recent = await store.recent_events(2, statuses=["failed", "succeeded"])
    assert [e.device_key for e in recent] == ["d2", "d1"]
    found, n = await store.find_tasks("j1", None, "D1", 10, 0)  # case-insensitive, as in SQLite
    assert n == 1 and found[0].device_key == "d1"
    _, n = await store.find_tasks("j1", None, "%", 10, 0)  # wildcards are literal
    assert n == 0


async def test_webhooks_and_deliveries(store: Store) -> None:
    hook = Webhook("w1", "http://127.0.0.1/hook", ("job.completed",), "enc", time.time(), 0)
    await store.create_webhook(hook)
    assert await store.get_webhook("w1") == hook
    await store.enqueue_deliveries([("w1", "job.completed", "{}"), ("w1", "job.completed", "{}")], 42)
    assert await store.get_kv(CURSOR_KEY) == "42"
    due = await store.due_deliveries(time.time() + 1, 10)
    assert len(due) == 2 and due[0].id < due[1].id and type(due[0].id) is int
    await store.record_attempt(due[0].id, DeliveryStatus.DELIVERED, 200, "", None)
    page, total = await store.list_deliveries("w1", 10, 0)
    assert total == 2 and page[1].status == DeliveryStatus.DELIVERED and page[1].delivered_at is not None
    assert page[0].delivered_at is None
    assert await store.delete_webhook("w1")
    assert await store.list_deliveries("w1", 10, 0) == ([], 0)


async def test_accounts_and_audit(store: Store) -> None:
    await store.create_user(User("alice", Role.OPERATOR, "hash", time.time()))
    with pytest.raises(DuplicateError):
        await store.create_user(User("alice", Role.ADMIN, "hash", time.time()))
    assert await store.update_user("alice", Role.ADMIN, None)
    assert not await store.update_user("bob", Role.ADMIN, None)
    await store.create_token(ApiToken("t1", "alice", "ci", "th", time.time(), None, None))
    await store.token_used("t1", 5.0)
    await store.revoke_token("t1")
    token = await store.token_by_hash("th")
    assert token is not None and token.last_used_at == 5.0 and token.revoked_at is not None
    for i in range(7):
        await store.append_audit(AuditEntry(float(i), "alice", "admin", f"a{i % 2}", "t", "127.0.0.1", 200))
    entries = [e async for e in store.iter_audit(None, "alice", "a0", batch=2)]
    assert [e.ts for e in entries] == [0.0, 2.0, 4.0, 6.0]
    page, total = await store.audit_page(3.0, None, None, 2, 0)
    assert total == 4 and [e.ts for e in page] == [6.0, 5.0]
    assert await store.delete_user("alice")
    assert await store.list_tokens(None) == []


async def test_group_commit_fails_ops_alone(store: Store) -> None:
    """Ops of one batch: each in its own savepoint; a failing one changes nothing, fails only its caller."""
    await store.create_product("pk1", "p")
    before = store.commits

    async def half_then_fail(tx: Tx) -> None:
        await tx.execute("INSERT INTO kv (key, value) VALUES (?, ?)", ("half", "1"))
        await tx.execute("INSERT INTO products (product_key, name, created_at) VALUES (?, ?, ?)", ("pk1", "x", 0.0))

    results = await asyncio.gather(
        store.set_kv("a", "1"),
        store.batched(half_then_fail),
        store.create_product("pk1", "dup"),
        store.set_kv("b", "2"),
        return_exceptions=True,
    )
    assert results[0] is None and results[3] is None
    assert isinstance(results[1], IntegrityError) and isinstance(results[2], DuplicateError)
    assert (await store.get_kv("a"), await store.get_kv("half"), await store.get_kv("b")) == ("1", None, "2")
    assert store.commits - before == 1  # the four writes were one transaction


async def test_a_reader_never_sees_half_a_batch(store: Store) -> None:
    await fleet(store, [f"d{i:03}" for i in range(200)])
    fw = await store.create_firmware(firmware("f1", "2.0"))
    seen: list[int] = []

    async def read() -> None:
        for _ in range(20):
            row = await store._one("SELECT COUNT(*) AS n FROM tasks")
            assert row is not None
            seen.append(row["n"])
            await asyncio.sleep(0)

    await asyncio.gather(read(), store.create_job(job("j1", fw), [(f"d{i:03}", None, 0) for i in range(200)]), read())
    assert set(seen) <= {0, 200}
    assert await store.count_events("j1", None, None) == 200


def test_the_dialect() -> None:
    """What the PostgreSQL backend is given for the SQLite-dialect text (the store tests run it for real)."""
    assert postgres("SELECT ?, '?', \"a?\" FROM t WHERE x = ?") == "SELECT $1, '?', \"a?\" FROM t WHERE x = $2"
    assert postgres("UPDATE tasks SET desc = ? ORDER BY x DESC") == 'UPDATE tasks SET "desc" = $1 ORDER BY x DESC'
    assert postgres("SELECT CAST((ts - ?) / ? AS INTEGER)") == "SELECT TRUNC((ts - $1) / $2)::BIGINT"
    assert postgres("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL, s TEXT)") == (
        "CREATE TABLE t (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,"
        ' ts DOUBLE PRECISION, s TEXT COLLATE "C")'
    )
    assert postgres("WHERE k LIKE ? ESCAPE '\\'") == "WHERE k ILIKE $1 ESCAPE '\\'"


async def test_postgresql_restarting_under_the_store() -> None:
    """The database restarts (a failover, an upgrade): the store's next write and reads reconnect;
    nothing acknowledged before is lost."""
    started = await asyncio.to_thread(_script, "start")
    info = json.loads(started.strip().splitlines()[-1])
    try:
        store = await Store.open(info["url"])
        try:
            await store.set_kv("before", "1")
            assert await store.get_kv("before") == "1"
            await asyncio.to_thread(_restart, info)
            await store.set_kv("after", "2")  # the write connection was lost: a new one
            assert await store.get_kv("before") == "1"
            assert await store.get_kv("after") == "2"
        finally:
            await store.close()
    finally:
        await asyncio.to_thread(_script, "stop", info["dir"])


def _script(*args: str) -> str:
    script = Path(__file__).resolve().parent.parent / "scripts" / "postgres"
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, check=True, timeout=120)
    return done.stdout


def _restart(info: dict[str, Any]) -> None:
    folder = Path(info["dir"])
    owner = (folder / "data").stat()
    pg_ctl = [str(Path(info["bin"]) / "pg_ctl"), "-D", str(folder / "data"), "-l", str(folder / "log")]
    # No pipes: the restarted server would hold them open, and run() would wait for it to end.
    subprocess.run(
        [*pg_ctl, "-m", "fast", "-w", "restart"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=60,
        user=owner.st_uid if os.geteuid() == 0 else None, group=owner.st_gid if os.geteuid() == 0 else None,
    )  # fmt: skip


async def test_postgresql_plans_a_bulk_grown_table_with_its_new_statistics(postgres_url: str) -> None:
    """A job's creation adds thousands of tasks at once. PostgreSQL keeps a prepared statement's
    generic plan, made with the statistics of the time: made before the table was analyzed, the
    push walked a job's pending tasks one by one for each device (index tasks_job_status: a
    50,000-device push became quadratic) until autovacuum's next analyze."""
    store = await Store.open(postgres_url)
    try:
        keys = [f"d{i:05d}" for i in range(3000)]
        await fleet(store, keys)
        fw = firmware("f1", "2.0")
        await store.create_firmware(fw)
        await store.create_job(job("j1", fw), [(dk, "1.0", 0) for dk in keys])
        publish = (
            "UPDATE tasks SET status = 'published', published_at = $1 WHERE job_id = $2 AND product_key = $3"
            " AND device_key = $4 AND status = 'pending'"
        )
        conn = await asyncpg.connect(postgres_url)
        try:
            await conn.execute("SET plan_cache_mode = force_generic_plan")  # what a prepared statement ends on
            await conn.execute(f"PREPARE publish(float8, text, text, text) AS {publish}")
            plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN EXECUTE publish(1, 'j1', 'pk1', 'd00005')"))
        finally:
            await conn.close()
        assert "tasks_one_active" in plan, plan
    finally:
        await store.close()
