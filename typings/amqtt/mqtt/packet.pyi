# Stub for amqtt 0.12.1 (pinned in pyproject.toml), only as far as otabox uses it.

import asyncio
from abc import ABC, abstractmethod
from datetime import datetime
from typing import Any, ClassVar, Generic, Self, TypeVar

from amqtt.adapters import ReaderAdapter, WriterAdapter

RESERVED_0: int
CONNECT: int
CONNACK: int
PUBLISH: int
PUBACK: int
PUBREC: int
PUBREL: int
PUBCOMP: int
SUBSCRIBE: int
SUBACK: int
UNSUBSCRIBE: int
UNSUBACK: int
PINGREQ: int
PINGRESP: int
DISCONNECT: int
RESERVED_15: int

class MQTTFixedHeader:
    packet_type: int
    flags: int
    remaining_length: int
    def __init__(self, packet_type: int, flags: int = 0, length: int = 0) -> None: ...
    def to_bytes(self) -> bytes: ...
    @classmethod
    async def from_stream(cls, reader: ReaderAdapter) -> Self | None: ...  # None at EOF

class MQTTVariableHeader(ABC):
    @abstractmethod
    def to_bytes(self) -> bytes | bytearray: ...
    @property
    def bytes_length(self) -> int: ...
    @classmethod
    @abstractmethod
    async def from_stream(cls, reader: ReaderAdapter, fixed_header: MQTTFixedHeader) -> Self: ...

class PacketIdVariableHeader(MQTTVariableHeader):
    packet_id: int
    def __init__(self, packet_id: int) -> None: ...
    def to_bytes(self) -> bytes: ...
    @classmethod
    async def from_stream(cls, reader: ReaderAdapter, _: MQTTFixedHeader | None = None) -> Self: ...

_VH = TypeVar("_VH", bound=MQTTVariableHeader | None)

class MQTTPayload(ABC, Generic[_VH]):
    @abstractmethod
    def to_bytes(
        self, fixed_header: MQTTFixedHeader | None = None, variable_header: _VH | None = None
    ) -> bytes | bytearray: ...
    @classmethod
    @abstractmethod
    async def from_stream(
        cls,
        reader: asyncio.StreamReader | ReaderAdapter,
        fixed_header: MQTTFixedHeader | None,
        variable_header: _VH | None,
    ) -> Self: ...

_P = TypeVar("_P", bound=MQTTPayload[Any] | None)
_FH = TypeVar("_FH", bound=MQTTFixedHeader)

class MQTTPacket(Generic[_VH, _P, _FH]):
    VARIABLE_HEADER: ClassVar[type[MQTTVariableHeader] | None]
    PAYLOAD: ClassVar[type[MQTTPayload[Any]] | None]
    FIXED_HEADER: ClassVar[type[MQTTFixedHeader]]
    fixed_header: _FH
    variable_header: _VH | None
    payload: _P | None
    protocol_ts: datetime | None
    def __init__(self, fixed: _FH, variable_header: _VH | None = None, payload: _P | None = None) -> None: ...
    async def to_stream(self, writer: WriterAdapter) -> None: ...
    def to_bytes(self) -> bytes: ...
    @classmethod
    async def from_stream(
        cls, reader: ReaderAdapter, fixed_header: _FH | None = None, variable_header: _VH | None = None
    ) -> Self: ...
