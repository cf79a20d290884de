# Stub for amqtt 0.12.1 (pinned in pyproject.toml), only as far as otabox uses it.

from amqtt.mqtt.packet import MQTTFixedHeader, MQTTPacket

class PingReqPacket(MQTTPacket[None, None, MQTTFixedHeader]):
    def __init__(self, fixed: MQTTFixedHeader | None = None) -> None: ...
