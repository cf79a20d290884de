"""`GET /metrics`: the server's state and counters in the Prometheus text format (prometheus-client).

Who counts what (plain integers on the hot paths, read at scrape time; nothing here runs per
message): the broker counts logins and device messages in, the outbox messages out, the store
its commits and their time, `LoopLag` the event loop's lateness. States (devices connected,
tasks by state, jobs by status, download bytes) are read fresh at each scrape: one GROUP BY per
table, so a scrape costs the same with 10 or 10,000 devices connected (bench: `metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily

from otabox.models import JobStatus, TaskState
from otabox.server.mqtt.broker import OtaBroker
from otabox.server.mqtt.outbox import Outbox
from otabox.server.store import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LAG_PERIOD = 0.5  # seconds between the loop-lag probe's wake-ups


class LoopLag:
    """How late the event loop wakes a sleeper: the latest lateness and the worst since the last scrape."""

    def __init__(self) -> None:
        self.last = 0.0
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._probe(), name="otabox-loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def take_worst(self) -> float:
        worst, self.worst = self.worst, self.last
        return worst

    async def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + LAG_PERIOD
            await asyncio.sleep(LAG_PERIOD)
            self.last = max(0.0, loop.time() - due)
            self.worst = max(self.worst, self.last)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one scrape reports, read at one moment."""

    connected: int
    logins_accepted: int
    logins_refused: int
    messages_in: int
    messages_out: int
    tasks: dict[TaskState, int]
    jobs: dict[JobStatus, int]
    download_bytes: int
    commits: int
    commit_seconds: float
    lag: float
    lag_worst: float
    asyncio_tasks: int

    def families(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("otabox_devices_connected", "Devices with a live MQTT connection.", self.connected)
        logins = CounterMetricFamily("otabox_mqtt_logins", "MQTT logins by outcome.", labels=["outcome"])
        logins.add_metric(["accepted"], self.logins_accepted)
        logins.add_metric(["refused"], self.logins_refused)
        yield logins
        messages = CounterMetricFamily("otabox_mqtt_messages", "MQTT messages by direction.", labels=["direction"])
        messages.add_metric(["in"], self.messages_in)
        messages.add_metric(["out"], self.messages_out)
        yield messages
        tasks = GaugeMetricFamily("otabox_tasks", "Tasks (one device in one job) by state.", labels=["state"])
        for state in TaskState:
            tasks.add_metric([state.value], self.tasks.get(state, 0))
        yield tasks
        jobs = GaugeMetricFamily("otabox_jobs", "Jobs by status.", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], self.jobs.get(status, 0))
        yield jobs
        yield CounterMetricFamily(
            "otabox_download_bytes", "Firmware bytes served to devices (full images and deltas).", self.download_bytes
        )
        yield SummaryMetricFamily(
            "otabox_store_commit_seconds",
            "Time of the store's group commits (each commits every write that arrived meanwhile).",
            count_value=self.commits,
            sum_value=self.commit_seconds,
        )
        yield GaugeMetricFamily(
            "otabox_event_loop_lag_seconds", "How late the event loop woke its probe, lately.", self.lag
        )
        yield GaugeMetricFamily(
            "otabox_asyncio_tasks", "Tasks alive on the event loop (a leak grows it).", self.asyncio_tasks
        )
        yield GaugeMetricFamily(
            "otabox_event_loop_lag_max_seconds", "The worst event-loop lag since the previous scrape.", self.lag_worst
        )


class _Collector:
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        return self.snapshot.families()


class Metrics:
    def __init__(self, store: Store, outbox: Outbox, broker: OtaBroker, lag: LoopLag) -> None:
        self.store = store
        self.outbox = outbox
        self.broker = broker
        self.lag = lag

    async def snapshot(self) -> Snapshot:
        return Snapshot(
            connected=self.outbox.connected_count(),
            logins_accepted=self.broker.logins_accepted,
            logins_refused=self.broker.logins_refused,
            messages_in=self.broker.messages_in,
            messages_out=self.outbox.messages_out,
            tasks=await self.store.task_state_counts(),
            jobs=await self.store.job_status_counts(),
            download_bytes=await self.store.download_bytes_total(),
            commits=self.store.commits,
            commit_seconds=self.store.commit_seconds,
            lag=self.lag.last,
            lag_worst=self.lag.take_worst(),
            asyncio_tasks=len(asyncio.all_tasks()),
        )

    async def scrape(self) -> bytes:
        """The text a Prometheus server scrapes: our families and the process's (CPU, memory, files)."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(await self.snapshot()))
        with contextlib.suppress(Exception):  # /proc is Linux-only; the rest stands without it
            ProcessCollector(registry=registry)
        return generate_latest(registry)
