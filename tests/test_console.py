"""Web console views over real HTTP against a real server (no browser): sign-in, CSRF, pages, forms, SSE."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from otabox.models import TaskState
from otabox.server.http.console import CONSOLE, charts
from otabox.server.http.console.render import CSP, STATIC, TEMPLATES
from otabox.server.http.console.views_jobs import plain_reason
from tests.conftest import TOKEN, Device, Server, start_server, wait_for

# On SQLite only by default: pages over the same store reads that test_api.py runs on both
# backends (OTABOX_TEST_BACKENDS=all runs these on PostgreSQL too; they pass there).


@pytest.fixture
def server_settings() -> dict[str, Any]:
    return {"scheduler_interval": 0.1}


class Console:
    """A signed-in browser stand-in: cookie jar plus the CSRF token of the session."""

    def __init__(self, server: Server, http: aiohttp.ClientSession) -> None:
        self.server, self.http, self.csrf = server, http, ""

    async def sign_in(self, token: str = TOKEN) -> aiohttp.ClientResponse:
        resp = await self.http.post(
            self.server.url + "/ui/login", data={"token": token, "next": "/ui/"}, allow_redirects=False
        )
        if resp.status == 303:
            page = await self.get("/ui/")
            self.csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
        return resp

    async def get(self, path: str, expect: int = 200, **kw: Any) -> str:
        async with self.http.get(self.server.url + path, **kw) as resp:
            text = await resp.text()
            assert resp.status == expect, (resp.status, text[:2000])
            return text

    async def post(self, path: str, data: Any = None, expect: int = 200, htmx: bool = False, **kw: Any) -> Any:
        headers = {"X-CSRF-Token": self.csrf, **({"HX-Request": "true"} if htmx else {}), **kw.pop("headers", {})}
        async with self.http.post(
            self.server.url + path, data=data, headers=headers, allow_redirects=False, **kw
        ) as resp:
            text = await resp.text()
            assert resp.status == expect, (resp.status, text[:2000])
            return resp.headers.get("Location") if resp.status == 303 else text


@pytest.fixture
async def ui(server: Server) -> AsyncIterator[Console]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        c = Console(server, http)
        assert (await c.sign_in()).status == 303
        yield c


async def firmware(server: Server, version: str = "2.0.0", **fields: str) -> dict[str, Any]:
    await server.product("pk1")
    return await server.firmware("pk1", version, b"firmware " + version.encode() * 1000, **fields)


async def online(server: Server, dk: str, version: str = "1.0.0") -> Device:
    d = await server.device(dk, "pk1", tags={"site": "east"})
    return await Device(server, "pk1", dk, d["deviceSecret"]).connect(version)


# ---------------------------------------------------------------- sign-in, sessions, CSRF, headers


async def test_signed_out_requests_go_to_sign_in(server: Server) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/", allow_redirects=False) as resp:
            assert (resp.status, resp.headers["Location"]) == (303, "/ui/")
        async with http.get(server.url + "/ui/devices?product=pk1", allow_redirects=False) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == "/ui/login?next=/ui/devices%3Fproduct%3Dpk1"
        async with http.get(server.url + "/ui/jobs", headers={"HX-Request": "true"}) as resp:
            assert (resp.status, resp.headers["HX-Redirect"]) == (401, "/ui/login")
        async with http.get(server.url + "/ui/stream/dashboard", headers={"Accept": "text/event-stream"}) as resp:
            assert resp.status == 401
        async with http.get(server.url + "/ui/static/console.css") as resp:
            assert resp.status == 200
        async with http.get(server.url + "/ui/login") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Security-Policy"] == CSP
            assert resp.headers["X-Frame-Options"] == "DENY"
            assert "script-src 'self'" in CSP and "'unsafe-inline'" not in CSP


async def test_sign_in_cookie_and_sign_out(server: Server) -> None:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        c = Console(server, http)
        resp = await c.sign_in("wrong-token")
        assert resp.status == 200 and "not valid" in await resp.text()
        assert "Set-Cookie" not in resp.headers
        resp = await c.sign_in()
        cookie = resp.headers["Set-Cookie"]
        assert "otabox_session=" in cookie
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui" in cookie
        assert "Dashboard" in await c.get("/ui/")
        assert await c.post("/ui/logout", {"csrf": c.csrf}, expect=303) == "/ui/login"
        await c.get("/ui/", allow_redirects=False, expect=303)


async def test_sign_in_goes_only_to_console_paths(server: Server) -> None:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        for nxt, where in (("/ui/jobs", "/ui/jobs"), ("//evil.example/", "/ui/"), ("https://evil.example/", "/ui/")):
            async with http.post(
                server.url + "/ui/login", data={"token": TOKEN, "next": nxt}, allow_redirects=False
            ) as resp:
                assert resp.headers["Location"] == where


async def test_failed_sign_ins_are_throttled(server: Server) -> None:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        c = Console(server, http)
        for _ in range(10):
            await c.sign_in("wrong")
        resp = await c.sign_in()
        assert resp.status == 429 and "Too many failed sign-ins" in await resp.text()


async def test_session_idle_timeout(server: Server, ui: Console) -> None:
    sessions = server.app._runner.app[CONSOLE].sessions  # type: ignore[union-attr]
    assert len(sessions) == 1
    sessions.idle = 0.0
    await ui.get("/ui/", allow_redirects=False, expect=303)
    assert len(sessions) == 0


async def test_state_changes_need_the_csrf_token(server: Server, ui: Console) -> None:
    fw = await firmware(server)
    await server.device("d1", "pk1")  # offline: its task stays pending and the job running
    job = await server.call("POST", "/jobs", 201, json={"firmwareId": fw["id"], "scope": {}})
    url = f"/ui/jobs/{job['id']}/pause"
    assert "stale" in await ui.post(url, headers={"X-CSRF-Token": "forged"}, expect=403)
    assert "stale" in await ui.post(url, {"csrf": "forged"}, headers={"X-CSRF-Token": ""}, expect=403)
    other_site = {"Origin": "http://evil.example"}
    assert "stale" in await ui.post(url, headers=other_site, expect=403)
    assert (await server.call("GET", f"/jobs/{job['id']}", 200))["status"] == "running"
    # The form field works as well as the header (forms without JavaScript).
    assert await ui.post(url, {"csrf": ui.csrf}, headers={"X-CSRF-Token": ""}, expect=303) == f"/ui/jobs/{job['id']}"
    assert (await server.call("GET", f"/jobs/{job['id']}", 200))["status"] == "paused"


async def test_session_cookie_does_not_open_the_api(server: Server, ui: Console) -> None:
    async with ui.http.get(server.url + "/api/v1/products") as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "unauthorized"


# ---------------------------------------------------------------- pages


async def test_pages_render(server: Server, ui: Console) -> None:
    fw = await firmware(server)
    await server.device("d1", "pk1", tags={"site": "east"})
    await server.device("d2", "pk1", tags={"site": "west"})
    job = await server.call("POST", "/jobs", 201, json={"firmwareId": fw["id"], "name": "east roll"})
    page = await ui.get("/ui/")
    assert "east roll" in page and "Firmware waiting for verification" in page and "fw-2.0.0" in page
    page = await ui.get("/ui/devices?product=pk1&tag=site:east&online=false")
    assert "d1" in page and "d2" not in page and "1 device(s) match" in page
    assert "key=value" in await ui.get("/ui/devices?product=pk1&tag=nonsense")
    page = await ui.get("/ui/devices/pk1/d1")
    assert "Task history" in page and "east roll" in page
    assert "east roll" in await ui.get("/ui/jobs?tab=running")
    assert "No finished job" in await ui.get("/ui/jobs?tab=finished")
    page = await ui.get(f"/ui/jobs/{job['id']}?tab=pending&q=d")
    assert "running: waiting for 2 offline device(s) to connect" in page and 'aria-current="page">Pending (2)' in page
    assert 'id="job-settings"' in page and "2 h 0 min per device" in page  # the job's settings are shown
    assert "d1" in page and "d2" in page
    page = await ui.get(f"/ui/jobs/{job['id']}?q=d2")
    assert ">d2<" in page and ">d1<" not in page
    assert "pending" in await ui.get("/ui/events?device=d1")
    assert "No such" not in await ui.get(f"/ui/firmware/{fw['id']}")
    page = await ui.get("/ui/jobs/job-nope", expect=404)
    assert "Not found" in page and "job-nope" in page


async def test_upload_shows_server_digests_and_refuses_duplicates(server: Server, ui: Console) -> None:
    await server.product("pk1")
    content = b"\x7fELF firmware" * 5000

    def form(name: str, version: str) -> aiohttp.FormData:
        f = aiohttp.FormData()
        f.add_field("name", name)
        f.add_field("version", version)
        f.add_field("file", content, filename="fw.bin", content_type="application/octet-stream")
        return f

    text = await ui.post("/ui/products/pk1/firmware", form("main", "2.0.0"), htmx=True)
    assert hashlib.sha256(content).hexdigest() in text and hashlib.md5(content).hexdigest() in text
    assert 'id="firmware-table" hx-swap-oob="true"' in text
    text = await ui.post("/ui/products/pk1/firmware", form("main", "2.0.0"), htmx=True)
    assert "Upload refused" in text and "already exists" in text
    # Without JavaScript: a plain multipart form with the token in its action URL.
    location = await ui.post(
        f"/ui/products/pk1/firmware?csrf={ui.csrf}", form("other", "3.0.0"), headers={"X-CSRF-Token": ""}, expect=303
    )
    assert location.startswith("/ui/firmware/fw-")
    assert hashlib.sha256(content).hexdigest() in await ui.get(location)


async def test_delete_is_refused_with_the_reason_while_a_job_uses_it(server: Server, ui: Console) -> None:
    fw = await firmware(server)
    await server.device("d1", "pk1")
    job = await server.call("POST", "/jobs", 201, json={"firmwareId": fw["id"]})
    page = await ui.post(f"/ui/firmware/{fw['id']}/delete", {"csrf": ui.csrf})
    assert f"Not deleted: firmware is used by active job(s) {job['id']}" in page
    await server.call("POST", f"/jobs/{job['id']}/cancel", 200)
    assert await ui.post(f"/ui/firmware/{fw['id']}/delete", {"csrf": ui.csrf}, expect=303) == "/ui/firmware?product=pk1"
    await server.call("GET", f"/firmware/{fw['id']}", 404)


async def test_verify_from_the_firmware_page(server: Server, ui: Console) -> None:
    fw = await firmware(server, enableVerification="true")
    dev = await online(server, "d1")
    for i in range(10):
        await server.device(f"x{i}", "pk1")
    eleven = [("csrf", ui.csrf), ("deviceKey", "d1")] + [("deviceKey", f"x{i}") for i in range(10)]
    assert "at most 10 devices" in await ui.post(f"/ui/firmware/{fw['id']}/verify", eleven)
    location = await ui.post(f"/ui/firmware/{fw['id']}/verify", {"csrf": ui.csrf, "deviceKey": "d1"}, expect=303)
    await dev.upgrade()

    async def verified() -> bool:
        status: str = (await server.call("GET", f"/firmware/{fw['id']}", 200))["status"]
        return status == "verified"

    await wait_for(verified)
    assert 'id="fw-verified">verified<' in await ui.get(location)
    await dev.close()


async def test_new_job_form_review_edit_and_start(server: Server, ui: Console) -> None:
    fw = await firmware(server)
    for dk in ("d1", "d2", "d3"):
        await server.device(dk, "pk1", tags={"site": "east" if dk != "d3" else "west"})
    preview = await ui.get(f"/ui/jobs/scope?firmwareId={fw['id']}&tags=site%3Deast")
    assert 'id="scope-count">2<' in preview and "d1" in preview and "d3" not in preview
    assert "key=value" in await ui.get(f"/ui/jobs/scope?firmwareId={fw['id']}&tags=site")
    form = {
        "csrf": ui.csrf,
        "firmwareId": fw["id"],
        "name": "east first",
        "tags": "site=east",
        "mode": "push",
        "policy": "incremental",
        "wave1_percent": "50",
        "wave1_success": "95",
        "wave2_percent": "100",
        "maxConcurrency": "5",
        "ratePerMinute": "60",
        "timeoutSeconds": "600",
        "retryCount": "2",
        "retryInterval": "30",
        "abortPercent": "20",
        "abortMinFinished": "5",
        "start": "2030-01-01T01:00",
        "dailyFrom": "01:00",
        "dailyTo": "05:00",
        "tzOffset": "60",
    }
    review = await ui.post("/ui/jobs/submit", {**form, "step": "review"})
    assert "Review: east first" in review and 'id="review-count">2<' in review
    assert "go on at 95 % success" in review and 'name="wave2_percent" value="100"' in review
    edit = await ui.post("/ui/jobs/submit", {**form, "step": "edit"})
    assert 'name="maxConcurrency" type="number" min="1" step="1" value="5"' in edit
    bad = await ui.post("/ui/jobs/submit", {**form, "wave2_percent": "90", "step": "review"})
    assert "the last wave must reach percent 100" in bad
    assert "Max concurrency must be a whole number" in await ui.post(
        "/ui/jobs/submit", {**form, "maxConcurrency": "2.5", "step": "start"}
    )
    location = await ui.post("/ui/jobs/submit", {**form, "step": "start"}, expect=303)
    job = await server.call("GET", "/jobs/" + location.rsplit("/", 1)[1], 200)
    assert job["name"] == "east first" and job["status"] == "scheduled" and job["total"] == 2
    assert job["policy"] == "incremental" and job["maxConcurrency"] == 5 and job["ratePerMinute"] == 60
    assert job["waves"] == [{"percent": 50, "successRatio": 0.95}, {"percent": 100}]
    assert job["retry"] == {"count": 2, "intervalSeconds": 30}
    assert job["abort"] == {"failureRatio": 0.2, "minFinished": 5}
    schedule = {"start": "2030-01-01T01:00", "dailyWindow": ["01:00", "05:00"], "timezoneOffsetMinutes": 60}
    assert job["schedule"] == schedule
    assert "scheduled: starts at 2030-01-01T01:00" in await ui.get(location)


async def test_pause_resume_cancel_and_retry(server: Server, ui: Console) -> None:
    fw = await firmware(server)
    dev = await online(server, "d1")
    await server.device("d2", "pk1")
    job = await server.call("POST", "/jobs", 201, json={"firmwareId": fw["id"], "retry": {"count": 0}})
    await dev.push()
    await dev.call("ota/device/progress", {"step": "-3", "desc": "signature check failed"})
    page = await ui.get(f"/ui/jobs/{job['id']}?tab=failed")
    assert "-3 verification failed" in page and "signature check failed" in page
    fragment = await ui.post(f"/ui/jobs/{job['id']}/pause", htmx=True)
    assert 'id="job-state">paused<' in fragment and "paused by admin" in fragment
    assert "cannot pause a paused job" in await ui.post(f"/ui/jobs/{job['id']}/pause", htmx=True)
    assert 'id="job-state">running<' in await ui.post(f"/ui/jobs/{job['id']}/resume", htmx=True)
    location = await ui.post(f"/ui/jobs/{job['id']}/retry", {"csrf": ui.csrf, "deviceKey": "d1"}, expect=303)
    assert location.endswith("?tab=pending")
    assert "1 device(s) will be retried" in await ui.get(location)
    await dev.upgrade()
    assert "1 pending or in-flight device task(s) will be canceled" in await ui.get(f"/ui/jobs/{job['id']}/cancel")
    await ui.post(f"/ui/jobs/{job['id']}/cancel", {"csrf": ui.csrf}, expect=303)
    page = await ui.get(f"/ui/jobs/{job['id']}")
    assert "canceled by admin" in page and "Cancel job" not in page
    csv_text = await ui.get(f"/ui/events/export?jobId={job['id']}&format=csv")
    assert csv_text.startswith("seq,ts,jobId") and "signature check failed" in csv_text
    await dev.close()


# ---------------------------------------------------------------- live updates (SSE)


async def read_events(resp: aiohttp.ClientResponse, names: set[str], timeout: float = 10) -> dict[str, str]:
    """Read SSE events until all `names` were seen; returns name -> data of the last of each."""
    seen: dict[str, str] = {}
    event, data = "message", []
    async with asyncio.timeout(timeout):
        while not names <= set(seen):
            line = (await resp.content.readline()).decode().rstrip("\r\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif line == "" and data:
                seen[event] = "\n".join(data)
                event, data = "message", []
    return seen


async def test_job_stream_sends_regions_and_device_table(server: Server, ui: Console) -> None:
    fw = await firmware(server)
    dev = await online(server, "d1")
    job = await server.call("POST", "/jobs", 201, json={"firmwareId": fw["id"]})
    async with ui.http.get(f"{server.url}/ui/jobs/{job['id']}/stream?tab=", timeout=aiohttp.ClientTimeout()) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["Content-Security-Policy"] == CSP
        first = await read_events(resp, {"status", "progress", "tabs"})
        assert 'id="job-state">running<' in first["status"] and "<svg" in first["progress"]
        await dev.upgrade()
        later = await read_events(resp, {"tasks", "progress"})
        assert 'id="count-succeeded">1<' in later["progress"] and "succeeded" in later["tasks"]
    await dev.close()


async def test_event_log_stream_tails_new_rows(server: Server, ui: Console) -> None:
    fw = await firmware(server)
    await server.device("d1", "pk1")
    after = await server.store.last_event_seq()
    async with ui.http.get(f"{server.url}/ui/events/stream?after={after}", timeout=aiohttp.ClientTimeout()) as resp:
        await server.call("POST", "/jobs", 201, json={"firmwareId": fw["id"]})
        rows = await read_events(resp, {"rows"})
        assert "d1" in rows["rows"] and "<tr>" in rows["rows"]


async def test_dashboard_stream(server: Server, ui: Console) -> None:
    await firmware(server)
    async with ui.http.get(f"{server.url}/ui/stream/dashboard", timeout=aiohttp.ClientTimeout()) as resp:
        assert "Running jobs" in (await read_events(resp, {"dashboard"}))["dashboard"]


async def test_shutdown_ends_open_streams_at_once(tmp_path: Path) -> None:
    app = await start_server(tmp_path)
    url = f"http://127.0.0.1:{app.http_port}"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        await http.post(url + "/ui/login", data={"token": TOKEN})
        resp = await http.get(url + "/ui/stream/dashboard", timeout=aiohttp.ClientTimeout())
        await read_events(resp, {"dashboard"})
        assert app._runner is not None and app._runner.app[CONSOLE].streams == 1
        began = time.monotonic()
        await app.stop()
        # Without the on_shutdown hook the open stream holds shutdown for the full shutdown_timeout (5 s).
        assert time.monotonic() - began < 2.0
        resp.close()


# ---------------------------------------------------------------- assets, templates, charts


def test_vendored_files_match_their_checksums() -> None:
    vendor = STATIC / "vendor"
    lines = (vendor / "SHA256SUMS").read_text().splitlines()
    assert len(lines) == 2
    for line in lines:
        digest, name = line.split()
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name
    base = (TEMPLATES / "base.html").read_text()
    for line in lines:
        assert f"/ui/static/vendor/{line.split()[1]}" in base


def test_templates_have_no_inline_script_style_or_handlers() -> None:
    for path in TEMPLATES.glob("*.html"):
        text = path.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)", text), path.name
        assert not re.search(r"<style|\sstyle=|\son[a-z]+=|hx-on|javascript:", text), path.name


def test_charts_are_svg_with_attributes_only() -> None:
    bar = charts.stacked_bar({TaskState.SUCCEEDED: 3, TaskState.FAILED: 1, TaskState.PENDING: 0})
    widths = [float(w) for w in re.findall(r'<rect x="[\d.]+" y="0" width="([\d.]+)"', bar)[1:]]
    assert widths == [750.0, 250.0]
    assert 'aria-label="Task states: succeeded 3, failed 1"' in bar and "style" not in bar
    ok, bad = charts.cumulative([(0, "succeeded", 2), (2, "failed", 1), (9, "succeeded", 1)], 4)
    assert (ok, bad) == ([2, 2, 2, 3], [0, 0, 1, 1])
    curve = charts.completion_curve(ok, bad, 5, 30.0)
    assert curve.count("<polyline") == 2 and "style" not in curve and "3 of 5 succeeded" in curve
    assert "no devices" in charts.stacked_bar({})


def test_plain_reasons() -> None:
    job = {"status": "paused", "statusReason": "wave 2 below 95 % success (80.0 %)", "currentWave": 2}
    assert plain_reason(job, {}) == "paused: wave 2 below 95 % success (80.0 %)"
    assert plain_reason({**job, "statusReason": "paused by operator"}, {}) == "paused by operator"
    running = {"status": "running", "statusReason": "", "currentWave": 1, "waves": [{}, {}], "mode": "push"}
    assert (
        plain_reason(running, {TaskState.PENDING: 4, TaskState.UPGRADING: 2})
        == "running: wave 1 of 2, 2 in flight, 4 waiting"
    )
    request = {**running, "waves": [], "mode": "request"}
    assert plain_reason(request, {TaskState.PENDING: 3}) == "running: waiting for 3 device(s) to ask for the upgrade"
    done = {"status": "completed", "statusReason": "", "currentWave": 0}
    assert plain_reason(done, {TaskState.SUCCEEDED: 9, TaskState.FAILED: 1}) == "completed: 9 of 10 succeeded"
    aborted = {"status": "aborted", "statusReason": "aborted: 3 of 5 finished tasks failed", "currentWave": 0}
    assert plain_reason(aborted, {}) == "aborted: 3 of 5 finished tasks failed"
