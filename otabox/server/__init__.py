"""The server: one asyncio process with the store, the MQTT broker, the job engine and the HTTP API.

`app.py` assembles it (the only place that does); `services.py` is what the HTTP layer sees;
`registry.py`, `firmware.py` and `jobs/service.py` hold the business rules the API and the
console share. Arrows point one way: app -> {http, mqtt, jobs} -> services -> store -> the pure
modules (`otabox.models`, `protocol`, `rollout`, `jobspec`). Nothing here imports the CLI, the
device SDK or the simulator.
"""
