"""The embedded MQTT broker (amqtt 0.12.1 with its connection handling replaced), the device
gateway that logs devices in and routes their messages, and the outbox that delivers to them.

May import the store, `otabox.protocol` and amqtt; the job engine reaches devices only through
the outbox and hears them only through the gateway's `JobHooks`.
"""
