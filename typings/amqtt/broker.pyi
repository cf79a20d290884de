# Stub for amqtt 0.12.1 (pinned in pyproject.toml), only as far as otabox uses it.

import asyncio
import ssl
from typing import Any, ClassVar

import websockets.asyncio.server
from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.contexts import Action, BaseContext, BrokerConfig, ListenerType
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.manager import PluginManager
from amqtt.session import ApplicationMessage, Session

class RetainedApplicationMessage(ApplicationMessage):
    source_session: Session | None
    def __init__(
        self, source_session: Session | None, topic: str, data: bytes | bytearray, qos: int | None = None
    ) -> None: ...

class Server:
    listener_name: str
    # amqtt annotates this without None, but its ExternalServer (an "external" listener) stores None.
    instance: asyncio.Server | websockets.asyncio.server.Server | None
    conn_count: int
    max_connections: int
    def __init__(
        self,
        listener_name: str,
        server_instance: asyncio.Server | websockets.asyncio.server.Server,
        max_connections: int = -1,
    ) -> None: ...
    async def acquire_connection(self) -> None: ...
    def release_connection(self) -> None: ...
    async def close_instance(self) -> None: ...

class BrokerContext(BaseContext):
    def __init__(self, broker: Broker) -> None: ...

class Broker:
    states: ClassVar[list[str]]
    config: BrokerConfig
    # A transitions.Machine; its triggers (start, shutdown, ...) are attached at runtime.
    transitions: Any
    plugins_manager: PluginManager[BrokerContext]
    _servers: dict[str, Server]
    _sessions: dict[str, tuple[Session, BrokerProtocolHandler]]
    _subscriptions: dict[str, list[tuple[Session, int]]]  # topic filter -> [(session, granted QoS)]
    _retained_messages: dict[str, RetainedApplicationMessage]
    def __init__(
        self,
        config: BrokerConfig | dict[str, Any] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        plugin_namespace: str | None = None,
    ) -> None: ...
    async def start(self) -> None: ...
    async def shutdown(self) -> None: ...
    async def _create_server_instance(
        self,
        listener_name: str,
        listener_type: ListenerType,
        address: str | None,
        port: int,
        ssl_context: ssl.SSLContext | None,
    ) -> asyncio.Server | websockets.asyncio.server.Server: ...
    async def _start_listeners(self) -> None: ...
    async def _cleanup_session(self, client_id: str) -> None: ...
    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None: ...
    async def _client_connected(self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter) -> None: ...
    async def _stop_handler(self, handler: BrokerProtocolHandler) -> None: ...
    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None: ...
    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int: ...
    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool: ...
    async def _del_all_subscriptions(self, session: Session) -> None: ...
    def _del_subscription(self, a_filter: str, session: Session) -> int: ...
    async def _publish_session_retained_messages(self, session: Session) -> None: ...
    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None: ...
    def _get_handler(self, session: Session) -> BrokerProtocolHandler | None: ...
    @property
    def subscriptions(self) -> dict[str, list[tuple[Session, int]]]: ...
    @property
    def retained_messages(self) -> dict[str, RetainedApplicationMessage]: ...
    @property
    def sessions(self) -> dict[str, tuple[Session, BrokerProtocolHandler]]: ...
