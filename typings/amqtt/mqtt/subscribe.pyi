# Stub for amqtt 0.12.1 (pinned in pyproject.toml), only as far as otabox uses it.

import asyncio
from typing import Self

from amqtt.adapters import ReaderAdapter
from amqtt.mqtt.packet import MQTTFixedHeader, MQTTPacket, MQTTPayload, MQTTVariableHeader, PacketIdVariableHeader

class SubscribePayload(MQTTPayload[MQTTVariableHeader]):
    topics: list[tuple[str, int]]  # (filter, requested QoS)
    def __init__(self, topics: list[tuple[str, int]] | None = None) -> None: ...
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

class SubscribePacket(MQTTPacket[PacketIdVariableHeader, SubscribePayload, MQTTFixedHeader]):
    def __init__(
        self,
        fixed: MQTTFixedHeader | None = None,
        variable_header: PacketIdVariableHeader | None = None,
        payload: SubscribePayload | None = None,
    ) -> None: ...
