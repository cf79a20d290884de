# Stub for amqtt 0.12.1 (pinned in pyproject.toml), only as far as otabox uses it.

from typing import Any

from amqtt.mqtt.packet import MQTTFixedHeader, MQTTPacket

# Raises AMQTTError for a packet type it does not know (RESERVED_0, RESERVED_15).
def packet_class(fixed_header: MQTTFixedHeader) -> type[MQTTPacket[Any, Any, Any]]: ...
