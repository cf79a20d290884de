"""`POST /api/v1/backup`: the same archive as `otabox backup`, streamed from a running server."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

from aiohttp import web

from otabox.errors import Conflict
from otabox.server import backup
from otabox.server.http.plumbing import API_PREFIX, services

# The archive holds the data dir's SQLite file; a server on PostgreSQL has none to hold.
POSTGRES_REFUSAL = (
    "this server keeps its database in PostgreSQL (--database-url): back the database up with "
    "PostgreSQL's own tools (pg_dump), and the data dir (firmware, server.key, ca/) with a file copy"
)


async def take_backup(request: web.Request) -> web.StreamResponse:
    """Written to a temporary file in a thread (never built in memory, never blocking the loop), then sent."""
    svc = services(request)
    if svc.store.dialect != "sqlite":
        raise Conflict(POSTGRES_REFUSAL, code="backup-unsupported")
    data_dir = svc.artifacts.root.parent
    tmp = svc.artifacts.tmp / f"backup-{secrets.token_hex(8)}.tar.gz"
    signing = Path(svc.settings.signing_key).expanduser() if svc.settings.signing_key else None
    try:
        await asyncio.to_thread(backup.write_file, data_dir, tmp, signing_key=signing)
        resp = web.StreamResponse(
            headers={
                "Content-Type": "application/gzip",
                "Content-Disposition": 'attachment; filename="otabox-backup.tar.gz"',
                "Content-Length": str(tmp.stat().st_size),
            }
        )
        await resp.prepare(request)
        with open(tmp, "rb") as fh:
            while chunk := await asyncio.to_thread(fh.read, 1024 * 1024):
                await resp.write(chunk)
        await resp.write_eof()
        return resp
    finally:
        tmp.unlink(missing_ok=True)


def add_routes(web_app: web.Application) -> None:
    web_app.router.add_post(f"{API_PREFIX}/backup", take_backup)
