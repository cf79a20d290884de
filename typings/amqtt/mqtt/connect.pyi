# Stub for amqtt 0.12.1 (pinned in pyproject.toml), only as far as otabox uses it.

import asyncio
from typing import Self

from amqtt.adapters import ReaderAdapter
from amqtt.mqtt.packet import MQTTFixedHeader, MQTTPacket, MQTTPayload, MQTTVariableHeader

class ConnectVariableHeader(MQTTVariableHeader):
    proto_name: str
    proto_level: int
    flags: int
    keep_alive: int
    def __init__(
        self, connect_flags: int = 0x00, keep_alive: int = 0, proto_name: str = "MQTT", proto_level: int = 0x04
    ) -> None: ...
    def to_bytes(self) -> bytes | bytearray: ...
    @classmethod
    async def from_stream(cls, reader: ReaderAdapter, _: MQTTFixedHeader) -> Self: ...
    @property
    def username_flag(self) -> bool: ...
    @property
    def password_flag(self) -> bool: ...
    @property
    def will_retain_flag(self) -> bool: ...
    @property
    def will_flag(self) -> bool: ...
    @property
    def clean_session_flag(self) -> bool: ...
    @property
    def reserved_flag(self) -> bool: ...
    @property
    def will_qos(self) -> int: ...

class ConnectPayload(MQTTPayload[ConnectVariableHeader]):
    client_id: str | None
    client_id_is_random: bool
    will_topic: str | None
    will_message: bytes | bytearray | None
    username: str | None
    password: str | None
    def __init__(
        self,
        client_id: str | None = None,
        will_topic: str | None = None,
        will_message: bytes | bytearray | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None: ...
    def to_bytes(
        self, fixed_header: MQTTFixedHeader | None = None, variable_header: ConnectVariableHeader | None = None
    ) -> bytes | bytearray: ...
    @classmethod
    async def from_stream(
        cls,
        reader: asyncio.StreamReader | ReaderAdapter,
        _: MQTTFixedHeader | None,
        variable_header: ConnectVariableHeader | None,
    ) -> Self: ...

# The properties below read the variable header or the payload and raise ValueError when it is None.
class ConnectPacket(MQTTPacket[ConnectVariableHeader, ConnectPayload, MQTTFixedHeader]):
    def __init__(
        self,
        fixed: MQTTFixedHeader | None = None,
        variable_header: ConnectVariableHeader | None = None,
        payload: ConnectPayload | None = None,
    ) -> None: ...
    @property
    def proto_name(self) -> str: ...
    @property
    def proto_level(self) -> int: ...
    @property
    def username_flag(self) -> bool: ...
    @property
    def password_flag(self) -> bool: ...
    @property
    def clean_session_flag(self) -> bool: ...
    @property
    def will_retain_flag(self) -> bool: ...
    @property
    def will_qos(self) -> int: ...
    @property
    def will_flag(self) -> bool: ...
    @property
    def reserved_flag(self) -> bool: ...
    @property
    def client_id(self) -> str | None: ...
    @property
    def client_id_is_random(self) -> bool: ...
    @property
    def will_topic(self) -> str | None: ...
    @property
    def will_message(self) -> bytes | bytearray | None: ...
    @property
    def username(self) -> str | None: ...
    @property
    def password(self) -> str | None: ...
    @property
    def keep_alive(self) -> int: ...
