"""The upgrade-log export: the schema of its tables (`schema.py`, pure) and the writer (`writer.py`).

The writer reads a data dir through the server's store (read-only) or a server's API; the
analysis kit (`otabox.analysis`) reads what it writes, with the same schema.
"""
