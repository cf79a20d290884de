"""Live pages over Server-Sent Events: one stream per page, a snapshot about once a second.

Each stream polls the store once per `Console.interval` and sends a named event only when the
HTML of that region changed; htmx's SSE extension swaps it in. Streams end when the client goes,
when the session ends, and at once on server shutdown (`Console.closing`): an open stream must
never hold the process up after Ctrl-C.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp_sse import sse_response

from otabox.server.http.console.render import SECURITY_HEADERS, console, fragment, otabox
from otabox.server.http.console.sessions import COOKIE
from otabox.server.http.console.views_jobs import job_fragments, snapshot, tasks_context
from otabox.server.http.console.views_main import dashboard_context, filtered_events, log_filters

log = logging.getLogger(__name__)

Produce = Callable[[], Awaitable[list[tuple[str, str]]]]


async def run_stream(request: web.Request, produce: Produce) -> web.StreamResponse:
    """Send what `produce` returns every interval until the client, the session or the server goes."""
    c = console(request)
    sid = request.cookies.get(COOKIE)
    async with sse_response(request, headers={**SECURITY_HEADERS, "Cache-Control": "no-store"}) as resp:
        c.streams += 1
        try:
            while not c.closing.is_set():
                transport = request.transport
                if transport is None or transport.is_closing():
                    break
                if c.sessions.get(sid, touch=False) is None:
                    break  # signed out or idle: the next click leads to the sign-in page
                for event, data in await produce():
                    await resp.send(data, event=event)
                try:
                    async with asyncio.timeout(c.interval):
                        await c.closing.wait()
                except TimeoutError:
                    pass
        except (ConnectionResetError, TimeoutError):
            pass  # the browser went away or stalled; it reconnects if it still wants the page
        finally:
            c.streams -= 1
    return resp


class Changes:
    """Remembers what each region last showed, so only changed regions are sent."""

    def __init__(self) -> None:
        self.last: dict[str, str] = {}

    def diff(self, regions: dict[str, str]) -> list[tuple[str, str]]:
        out = [(k, v) for k, v in regions.items() if self.last.get(k) != v]
        self.last.update(regions)
        return out


async def dashboard_stream(request: web.Request) -> web.StreamResponse:
    changes = Changes()

    async def produce() -> list[tuple[str, str]]:
        ctx = await dashboard_context(request)
        return changes.diff({"dashboard": fragment(request, "_dashboard.html", ctx)})

    return await run_stream(request, produce)


async def job_stream(request: web.Request) -> web.StreamResponse:
    """Status, progress, tab counts and the device table (of the page's tab, search and page) of one job."""
    store = otabox(request).store
    job_id = request.match_info["id"]
    changes = Changes()
    state: dict[str, object] = {"sig": None, "seq": -1}

    async def produce() -> list[tuple[str, str]]:
        job = await store.get_job(job_id)
        if job is None:
            return []
        seq = await store.last_event_seq(job_id)
        fw = await store.get_firmware(job.firmware_id)  # a verify job turns it verified after its last event
        sig = (job.status, job.status_reason, job.current_wave, seq, fw.status if fw else None)
        out: list[tuple[str, str]] = []
        if sig != state["sig"]:
            state["sig"] = sig
            out = changes.diff(job_fragments(request, await snapshot(request, job)))
        if seq != state["seq"]:
            if state["seq"] != -1:  # the page came with the table of its time
                out.append(("tasks", fragment(request, "_tasks.html", await tasks_context(request, job))))
            state["seq"] = seq
        return out

    return await run_stream(request, produce)


async def events_stream(request: web.Request) -> web.StreamResponse:
    """New rows of the event log (newest first), after the seq the page was rendered with."""
    f = log_filters(request)
    try:
        after = max(0, int(request.query.get("after", "0")))
    except ValueError:
        after = 0
    state = {"after": after}

    async def produce() -> list[tuple[str, str]]:
        rows = await filtered_events(request, f, state["after"])
        if not rows:
            return []
        state["after"] = rows[0]["seq"]
        return [("rows", fragment(request, "_event_rows.html", {"events": rows}))]

    return await run_stream(request, produce)


def add_routes(sub: web.Application) -> None:
    r = sub.router
    r.add_get("/stream/dashboard", dashboard_stream)
    r.add_get("/jobs/{id}/stream", job_stream)
    r.add_get("/events/stream", events_stream)
