# Stub for amqtt 0.12.1 (pinned in pyproject.toml), only as far as otabox uses it.

from enum import StrEnum
from typing import Any

# The bound of the plugin manager's context type; otabox uses none of its attributes.
class BaseContext:
    def __init__(self) -> None: ...

class Action(StrEnum):
    SUBSCRIBE = "subscribe"
    PUBLISH = "publish"
    RECEIVE = "receive"

class ListenerType(StrEnum):
    TCP = "tcp"
    WS = "ws"
    EXTERNAL = "external"

# A dataclass in amqtt; otabox passes Broker a plain dict and never reads the result.
class BrokerConfig:
    listeners: dict[str, Any]  # listener name -> amqtt ListenerConfig (not described here)
    sys_interval: int | None
    timeout_disconnect_delay: int | None
    session_expiry_interval: int | None
    auth: dict[str, Any] | None
    topic_check: dict[str, Any] | None
    plugins: dict[str, Any] | list[str | dict[str, Any]] | None
    def __init__(
        self,
        listeners: dict[str, Any] = ...,
        sys_interval: int | None = None,
        timeout_disconnect_delay: int | None = 0,
        session_expiry_interval: int | None = None,
        auth: dict[str, Any] | None = None,
        topic_check: dict[str, Any] | None = None,
        plugins: dict[str, Any] | list[str | dict[str, Any]] | None = ...,
    ) -> None: ...
    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> BrokerConfig: ...
