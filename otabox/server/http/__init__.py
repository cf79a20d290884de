"""HTTP: the management API (`api_*.py`), firmware downloads, /healthz and the web console.

Handlers see `otabox.server.services.Services` only (`plumbing.services(request)`) and present
records with `otabox.server.present`; they hold no business rules.
"""
