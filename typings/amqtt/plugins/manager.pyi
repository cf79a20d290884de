# Stub for amqtt 0.12.1 (pinned in pyproject.toml), only as far as otabox uses it.

import asyncio
from typing import Generic, TypeVar

from amqtt.contexts import BaseContext

C = TypeVar("C", bound=BaseContext)

class PluginManager(Generic[C]):
    def __init__(self, namespace: str, context: C | None, loop: asyncio.AbstractEventLoop | None = None) -> None: ...
