"""otabox: a self-contained firmware OTA upgrade server."""

__version__ = "0.1.0"
