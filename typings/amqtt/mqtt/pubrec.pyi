# Stub for amqtt 0.12.1 (pinned in pyproject.toml), only as far as otabox uses it.

from amqtt.mqtt.packet import MQTTFixedHeader, MQTTPacket, PacketIdVariableHeader

class PubrecPacket(MQTTPacket[PacketIdVariableHeader, None, MQTTFixedHeader]):
    def __init__(
        self, fixed: MQTTFixedHeader | None = None, variable_header: PacketIdVariableHeader | None = None
    ) -> None: ...
    @property
    def packet_id(self) -> int: ...
