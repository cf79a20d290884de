# Stub for amqtt 0.12.1 (pinned in pyproject.toml), only as far as otabox uses it.

import ssl
from asyncio import Queue
from collections import OrderedDict
from typing import Any, ClassVar

from amqtt.mqtt.publish import PublishPacket

OUTGOING: int
INCOMING: int

class ApplicationMessage:
    packet_id: int | None
    topic: str
    qos: int | None
    data: bytes | bytearray
    retain: bool
    publish_packet: PublishPacket | None
    puback_packet: Any | None
    pubrec_packet: Any | None
    pubrel_packet: Any | None
    pubcomp_packet: Any | None
    def __init__(
        self, packet_id: int | None, topic: str, qos: int | None, data: bytes | bytearray, retain: bool
    ) -> None: ...
    def build_publish_packet(self, dup: bool = False) -> PublishPacket: ...

class IncomingApplicationMessage(ApplicationMessage):
    direction: int
    def __init__(self, packet_id: int | None, topic: str, qos: int | None, data: bytes, retain: bool) -> None: ...

class OutgoingApplicationMessage(ApplicationMessage):
    direction: int

class Session:
    states: ClassVar[list[str]]
    # A transitions.Machine whose triggers (connect, disconnect) and state checks (is_connected)
    # are attached at runtime; otabox's LightSession puts its own small state object here.
    transitions: Any
    remote_address: str | None
    remote_port: int | None
    client_id: str | None
    clean_session: bool | None
    will_flag: bool
    will_message: bytes | bytearray | None
    will_qos: int | None
    will_retain: bool | None
    will_topic: str | None
    keep_alive: int
    publish_retry_delay: int
    broker_uri: str | None
    username: str | None
    password: str | None
    parent: int
    last_connect_time: int | None
    last_disconnect_time: int | None
    ssl_object: ssl.SSLObject | None
    attributes: dict[str, Any]
    inflight_out: OrderedDict[int, OutgoingApplicationMessage]
    inflight_in: OrderedDict[int, IncomingApplicationMessage]
    retained_messages: Queue[ApplicationMessage]
    delivered_message_queue: Queue[ApplicationMessage]
    is_anonymous: bool
    def __init__(self) -> None: ...
    def _init_states(self) -> None: ...
    def _on_enter_connected(self) -> None: ...
    def _on_enter_disconnected(self) -> None: ...
    @property
    def next_packet_id(self) -> int: ...
    def clear_queues(self) -> None: ...
