"""The fleet simulator: thousands of simulated devices in one process (`otabox simulate`, the benchmark).

May import the device SDK's pieces (`otabox.device.mqtt`, `otabox.device.download`) and the pure
modules; never the server.
"""
