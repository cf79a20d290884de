"""Server -> device delivery: the connected devices' handlers by `{pk}/{dk}`, and `deliver`.

Built before the broker and the job engine, which both hold it: the broker attaches a device's
handler once its connection is fully served and detaches it when it ends; the engine and the
device hooks send through it. Nothing is queued for an offline device: the store is the source
of truth and the engine pushes again when the device connects.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from amqtt.errors import AMQTTError, MQTTError, ProtocolHandlerError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

from otabox import protocol
from otabox.server.mqtt.connection import Handler

log = logging.getLogger(__name__)


def session_key(product_key: str, device_key: str) -> str:
    return f"{product_key}/{device_key}"


async def publish(handler: BrokerProtocolHandler, topic: str, payload: bytes, qos: int) -> None:
    """One PUBLISH at QoS 1/2 (waits for the acknowledgement); a vanished device is not an error."""
    try:
        await handler.mqtt_publish(topic, payload, qos, retain=False)
    # amqtt gives up on a missing acknowledgement with a plain TimeoutError, and raises
    # ProtocolHandlerError when the connection closes mid-send.
    except (AMQTTError, MQTTError, ProtocolHandlerError, ConnectionError, TimeoutError, asyncio.CancelledError) as exc:
        # The device went away mid-flight; the store still knows what it was owed.
        log.debug("publish to %s not completed: %r", topic, exc)


class Outbox:
    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.messages_out = 0  # read by /metrics

    def attach(self, key: str, handler: Handler) -> None:
        """Only once handler.start() has finished: stock start() re-sends in-flight messages and
        waits for their PUBACK, so a message added earlier would be sent twice."""
        self._handlers[key] = handler

    def detach(self, key: str, handler: Handler) -> None:
        if self._handlers.get(key) is handler:
            del self._handlers[key]

    async def disconnect(self, product_key: str, device_key: str, certificate: str | None = None) -> bool:
        """Close a device's live connection (it was deleted, its secret changed, or with `certificate`:
        the connection that logged in with that certificate, which was revoked). False when none."""
        handler = self._handlers.get(session_key(product_key, device_key))
        if handler is None or (certificate is not None and handler.certificate != certificate):
            return False
        await handler.handle_connection_closed()
        return True

    def is_connected(self, product_key: str, device_key: str) -> bool:
        return session_key(product_key, device_key) in self._handlers

    def connected_count(self) -> int:
        return len(self._handlers)

    def deliver(self, product_key: str, device_key: str, suffix: str, payload: bytes, qos: int = 1) -> bool:
        """Send a message to a connected device's own topic, O(1). False when it is not connected."""
        return self.deliver_to(
            product_key, device_key, protocol.topic_for(product_key, device_key, suffix), payload, qos
        )

    def deliver_to(self, product_key: str, device_key: str, topic: str, payload: bytes, qos: int = 1) -> bool:
        """`deliver` on any topic of the device's (its session topics: activation)."""
        handler = self._handlers.get(session_key(product_key, device_key))
        if handler is None:
            return False
        self.messages_out += 1
        if qos == 0:
            return handler.send_qos0(topic, payload)
        task = asyncio.create_task(publish(handler, topic, payload, qos))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True
