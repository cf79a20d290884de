"""The web console in a real headless Chromium against a real otabox server with simulated devices.

One story in order (the tests of this module share the server, the browser context and its page):
sign in, upload firmware, create a push job from the form and watch it live, pause and resume,
read a failed device's step code, verify firmware, follow the event log; then every main page is
checked for console errors, CSP violations and serious accessibility violations (axe-core).
Screenshots of the main screens go to docs/screenshots/.
"""

from __future__ import annotations

import hashlib
import io
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
from playwright.sync_api import expect

from tests.browser.harness import LiveServer, PageWatch
from tests.conftest import TOKEN

PK = "thermo"
FIRMWARE = b"".join(b"otabox test firmware 2.0.0 block %06d\n" % i for i in range(40_000))  # ~1.4 MB
FAILING = "th-007"
FAIL_DESC = "download failed: sha256 mismatch"
DEVICES = [f"th-{i:03d}" for i in range(12)]


def test_sign_in(live: LiveServer, watch: PageWatch, context: Any) -> None:
    live.api("POST", "/products", 201, json={"productKey": PK, "name": "Thermostat"})
    page = watch.page
    page.goto(live.url + "/")
    expect(page).to_have_url(re.compile(r"/ui/login"))
    page.get_by_label("Token", exact=True).fill("not-the-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("not valid")
    page.get_by_label("Token", exact=True).fill(TOKEN)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Dashboard")
    cookie = next(c for c in context.cookies() if c["name"] == "otabox_session")
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/ui"
    watch.assert_clean()


def test_upload_firmware_shows_server_digests(live: LiveServer, watch: PageWatch, screenshots: Path) -> None:
    page = watch.page
    page.goto(live.url + "/ui/firmware")
    page.get_by_label("Name", exact=True).fill("main-fw")
    page.get_by_label("Version", exact=True).fill("2.0.0")
    page.get_by_label("Firmware file").set_input_files(
        {"name": "main-fw-2.0.0.bin", "mimeType": "application/octet-stream", "buffer": FIRMWARE}
    )
    page.get_by_role("button", name="Upload").click()
    expect(page.locator("#result-sha256")).to_have_text(hashlib.sha256(FIRMWARE).hexdigest())
    expect(page.locator("#result-md5")).to_have_text(hashlib.md5(FIRMWARE).hexdigest())
    expect(page.locator("#upload-progress-text")).to_have_text("done")
    assert page.eval_on_selector("#upload-progress", "e => e.value") == 100
    expect(page.locator("#firmware-table")).to_contain_text("main-fw 2.0.0")
    page.screenshot(path=str(screenshots / "firmware.png"), full_page=True)
    watch.assert_clean()


def _count(page: Any, state: str) -> int:
    return int(page.locator(f"#count-{state}").inner_text())


def test_push_job_from_the_form_live(live: LiveServer, watch: PageWatch, context: Any, screenshots: Path) -> None:
    live.add_devices(PK, DEVICES, "1.0.0", fail={FAILING: (-2, FAIL_DESC)})
    fw = live.api("GET", f"/products/{PK}/firmware", 200)["items"][0]
    page = watch.page
    page.goto(live.url + "/ui/jobs/new")
    page.get_by_label("Firmware to roll out").select_option(fw["id"])
    expect(page.locator("#scope-count")).to_have_text("12")  # the live count, before any scope filter
    page.get_by_label("Job name").fill("roll 2.0 to the east site")
    page.get_by_label("From versions").fill("1.0.0")
    page.get_by_label("Tags").fill("site=east")
    page.get_by_label("Max concurrency").fill("3")
    page.get_by_label("Wave 1: up to percent").fill("50")
    page.get_by_label("Wave 2: up to percent").fill("100")
    expect(page.locator("#scope-count")).to_have_text("12")
    expect(page.locator("#scope-preview")).to_contain_text("th-000")
    page.screenshot(path=str(screenshots / "job-new.png"), full_page=True)
    page.get_by_role("button", name="Review…").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Review: roll 2.0 to the east site")
    expect(page.locator("#review-count")).to_have_text("12")
    page.get_by_role("button", name="Start job").click()
    expect(page).to_have_url(re.compile(r"/ui/jobs/job-[0-9a-f]+$"))
    page.evaluate("window.__sameDocument = 'yes'")  # gone if anything reloads the page

    # Counts move while devices upgrade, through SSE only.
    expect(page.locator("#count-succeeded")).not_to_have_text("0", timeout=20_000)
    assert _count(page, "total") == 12
    page.screenshot(path=str(screenshots / "job-live.png"), full_page=True)
    other = PageWatch(context.new_page())  # the dashboard, live too, in a second tab
    other.page.goto(live.url + "/ui/")
    expect(other.page.locator("#dashboard")).to_contain_text("roll 2.0 to the east site")
    other.page.screenshot(path=str(screenshots / "dashboard.png"), full_page=True)
    other.assert_clean()
    other.page.close()

    page.get_by_role("button", name="Pause").click()
    expect(page.locator("#job-state")).to_have_text("paused")
    expect(page.locator("#job-reason")).to_have_text("paused by admin")
    # In-flight devices finish; nothing new is pushed while paused.
    expect(page.locator("#count-upgrading")).to_have_text("0")
    expect(page.locator("#count-published")).to_have_text("0")
    pending = _count(page, "pending")
    assert pending > 0
    # Absence of pushes can only be shown over time: three scheduler intervals of the page's stream.
    time.sleep(1.5)
    assert _count(page, "pending") == pending
    page.get_by_role("button", name="Resume").click()
    expect(page.locator("#job-state")).not_to_have_text("paused")
    expect(page.locator("#job-state")).to_have_text("completed", timeout=40_000)
    assert _count(page, "succeeded") == 11
    assert _count(page, "failed") == 1
    expect(page.locator("#job-reason")).to_have_text("completed: 11 of 12 succeeded")
    assert page.evaluate("window.__sameDocument") == "yes"

    page.get_by_role("link", name=re.compile(r"^Failed \(1\)")).click()
    row = page.locator("#tasks tbody tr", has_text=FAILING)
    expect(row.locator("td.step")).to_have_text("-2 download failed")
    expect(row).to_contain_text(FAIL_DESC)
    watch.assert_clean()


def test_verify_firmware_turns_verified(live: LiveServer, watch: PageWatch) -> None:
    form = aiohttp.FormData({"name": "main-fw-next", "version": "2.1.0", "enableVerification": "true"})
    form.add_field("file", io.BytesIO(b"firmware 2.1.0" * 1000), filename="fw-2.1.0.bin")
    fw = live.api("POST", f"/products/{PK}/firmware", 201, data=form)
    page = watch.page
    page.goto(live.url + f"/ui/firmware/{fw['id']}")
    expect(page.locator("#fw-status")).to_have_text("unverified")
    page.get_by_label("th-001").check()
    page.get_by_label("th-002").check()
    page.get_by_role("button", name="Run verify job").click()
    expect(page).to_have_url(re.compile(r"/ui/jobs/job-"))
    expect(page.locator("#fw-verified")).to_have_text("verified", timeout=20_000)
    watch.assert_clean()


def test_event_log_tails_live(live: LiveServer, watch: PageWatch) -> None:
    page = watch.page
    page.goto(live.url + f"/ui/events?device={FAILING}")
    first = page.locator("#event-rows tr").first
    expect(first).to_contain_text("failed")
    page.evaluate("window.__sameDocument = 'log'")
    job = live.api("GET", "/jobs?status=completed", 200)["items"][-1]
    live.api("POST", f"/jobs/{job['id']}/tasks:retry", 200, json={"deviceKeys": [FAILING]})
    expect(page.locator("#event-rows")).to_contain_text("retry requested")
    expect(first).to_contain_text("failed")  # the retry failed again and tops the log
    assert page.evaluate("window.__sameDocument") == "log"
    watch.assert_clean()


def test_pages_are_clean_and_accessible(live: LiveServer, watch: PageWatch, axe_source: str, screenshots: Path) -> None:
    page = watch.page
    job = live.api("GET", "/jobs?limit=1000", 200)["items"][-1]
    fw = live.api("GET", f"/products/{PK}/firmware", 200)["items"][0]
    pages = {
        "/ui/": None,
        "/ui/devices": None,
        f"/ui/devices/{PK}/{FAILING}": None,
        "/ui/firmware": None,
        f"/ui/firmware/{fw['id']}": None,
        "/ui/jobs?tab=finished": "jobs",
        "/ui/jobs/new": None,
        f"/ui/jobs/{job['id']}": "job",
        f"/ui/jobs/{job['id']}/cancel": None,
        "/ui/events": "events",
        "/ui/tokens": None,
        "/ui/users": None,
        "/ui/audit": None,
    }
    problems = {}
    for path, shot in pages.items():
        page.goto(live.url + path)
        expect(page.get_by_role("heading", level=1)).to_be_visible()
        if shot:
            page.screenshot(path=str(screenshots / f"{shot}.png"))
        page.evaluate(axe_source)
        found = page.evaluate(
            """async () => (await axe.run(document, {resultTypes: ['violations']})).violations
                 .filter(v => v.impact === 'serious' || v.impact === 'critical')
                 .map(v => v.id + ': ' + v.nodes.slice(0, 3).map(n => n.target.join(' ')).join(' | '))"""
        )
        if found:
            problems[path] = found
    assert problems == {}
    watch.assert_clean()
