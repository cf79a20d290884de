"""The typed services object the HTTP layer (API and console) sees instead of the whole process.

Built by `server.app` in dependency order once every part exists; handlers reach it as
`request.app[SERVICES]`. Business rules live in the services it holds, never in handlers.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from otabox.server.accounts import AccountService
from otabox.server.artifacts import Artifacts
from otabox.server.bundles import BundleService
from otabox.server.deltas import DeltaService
from otabox.server.firmware import FirmwareService
from otabox.server.jobs.engine import JobEngine
from otabox.server.jobs.service import JobService
from otabox.server.keys import FileUrls, Keys, Signer
from otabox.server.metrics import Metrics
from otabox.server.mqtt.outbox import Outbox
from otabox.server.nodes import NodeService
from otabox.server.registry import Registry
from otabox.server.settings import Settings
from otabox.server.store import Store
from otabox.server.webhooks import WebhookService


@dataclass(frozen=True, slots=True)
class Status:
    """What /healthz tells: the version, the bound ports and whether start-up finished."""

    version: str
    http_port: int | None  # None: that listener is off
    mqtt_port: int | None
    https_port: int | None = None
    mqtts_port: int | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def ports(self) -> dict[str, int]:
        """The listeners that run, as ports.json has them: {"http", "mqtt", "https", "mqtts"}."""
        ports = {"http": self.http_port, "mqtt": self.mqtt_port, "https": self.https_port, "mqtts": self.mqtts_port}
        return {name: port for name, port in ports.items() if port is not None}


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    status: Status
    store: Store
    keys: Keys
    signer: Signer | None
    artifacts: Artifacts
    urls: FileUrls
    outbox: Outbox
    registry: Registry
    firmware: FirmwareService
    bundles: BundleService
    jobs: JobService
    engine: JobEngine
    deltas: DeltaService
    metrics: Metrics
    webhooks: WebhookService
    accounts: AccountService
    nodes: NodeService
    admin_token_hash: str
