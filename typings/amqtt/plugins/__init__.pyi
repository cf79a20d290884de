# Stub for amqtt 0.12.1 (pinned in pyproject.toml), only as far as otabox uses it.
