"""The command line: `otabox serve` and the admin commands (which talk to a server's API only).

May import the admin client (`client.py`), the pure modules, `otabox.export` and, for `serve`
alone and only when it runs, `otabox.server.app`. Public entry point: `otabox.cli:main`.
"""

from __future__ import annotations

from otabox.cli.main import main

__all__ = ["main"]
