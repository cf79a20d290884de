# Stub for amqtt 0.12.1 (pinned in pyproject.toml), only as far as otabox uses it.

from typing import Self

from amqtt.adapters import ReaderAdapter
from amqtt.mqtt.packet import MQTTFixedHeader, MQTTPacket, MQTTPayload, MQTTVariableHeader

CONNECTION_ACCEPTED: int
UNACCEPTABLE_PROTOCOL_VERSION: int
IDENTIFIER_REJECTED: int
SERVER_UNAVAILABLE: int
BAD_USERNAME_PASSWORD: int
NOT_AUTHORIZED: int

class ConnackVariableHeader(MQTTVariableHeader):
    session_parent: int | None
    return_code: int | None
    def __init__(self, session_parent: int | None = None, return_code: int | None = None) -> None: ...
    def to_bytes(self) -> bytes | bytearray: ...
    @classmethod
    async def from_stream(cls, reader: ReaderAdapter, _: MQTTFixedHeader | None) -> Self: ...

class ConnackPacket(MQTTPacket[ConnackVariableHeader, MQTTPayload[MQTTVariableHeader], MQTTFixedHeader]):
    def __init__(
        self,
        fixed: MQTTFixedHeader | None = None,
        variable_header: ConnackVariableHeader | None = None,
        payload: MQTTPayload[MQTTVariableHeader] | None = None,
    ) -> None: ...
    @classmethod
    def build(cls, session_parent: int | None = None, return_code: int | None = None) -> Self: ...
