# Stub for amqtt 0.12.1 (pinned in pyproject.toml), only as far as otabox uses it.

import asyncio
from typing import Self

from amqtt.adapters import ReaderAdapter
from amqtt.mqtt.packet import MQTTFixedHeader, MQTTPacket, MQTTPayload, MQTTVariableHeader

class PublishVariableHeader(MQTTVariableHeader):
    topic_name: str
    packet_id: int | None
    # Raises MQTTError when topic_name holds a wildcard.
    def __init__(self, topic_name: str, packet_id: int | None = None) -> None: ...
    def to_bytes(self) -> bytes | bytearray: ...
    # otabox.server.mqtt.broker replaces this classmethod process-wide (_read_publish_header).
    @classmethod
    async def from_stream(cls, reader: ReaderAdapter | asyncio.StreamReader, fixed_header: MQTTFixedHeader) -> Self: ...

class PublishPayload(MQTTPayload[MQTTVariableHeader]):
    data: bytes | None
    def __init__(self, data: bytes | None = None) -> None: ...
    def to_bytes(
        self, fixed_header: MQTTFixedHeader | None = None, variable_header: MQTTVariableHeader | None = None
    ) -> bytes: ...
    @classmethod
    async def from_stream(
        cls,
        reader: asyncio.StreamReader | ReaderAdapter,
        fixed_header: MQTTFixedHeader | None,
        variable_header: MQTTVariableHeader | None,
    ) -> Self: ...

class PublishPacket(MQTTPacket[PublishVariableHeader, PublishPayload, MQTTFixedHeader]):
    def __init__(
        self,
        fixed: MQTTFixedHeader | None = None,
        variable_header: PublishVariableHeader | None = None,
        payload: PublishPayload | None = None,
    ) -> None: ...
    @classmethod
    def build(
        cls, topic_name: str, message: bytes, packet_id: int | None, dup_flag: bool, qos: int | None, retain: bool
    ) -> Self: ...
    @property
    def dup_flag(self) -> bool: ...
    @property
    def retain_flag(self) -> bool: ...
    @property
    def qos(self) -> int | None: ...
    @property
    def packet_id(self) -> int | None: ...
    @property
    def data(self) -> bytes | None: ...
    @property
    def topic_name(self) -> str | None: ...
