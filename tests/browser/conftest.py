"""Fixtures for the browser tests: Debian's chromium driven by sync Playwright, a live otabox server.

Run in their own pytest invocation, without pytest-asyncio (sync Playwright and an asyncio test
plugin in one run broke each other):

    tests/browser/setup.sh && python -m pytest -p no:asyncio tests/browser

Chromium comes from apt (setup.sh installs it); Playwright is pointed at it with executable_path
and never downloads a browser. When chromium or axe-core is missing these tests fail in CI
(CI=true) and skip elsewhere, naming the setup script.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.harness import LiveServer, PageWatch

ROOT = Path(__file__).resolve().parents[2]
AXE = ROOT / ".cache" / "browser-assets" / "axe-core-4.14.1.min.js"
SCREENSHOTS = ROOT / "docs" / "screenshots"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
# Collects CSP violations in the page; init scripts run through the DevTools protocol, not under the CSP.
CSP_PROBE = """
window.__csp = [];
document.addEventListener('securitypolicyviolation', (e) => {
  window.__csp.push(
    e.violatedDirective + ' ' + (e.blockedURI || 'inline') + ' ' + (e.sourceFile || '') + ':' + e.lineNumber);
});
"""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # In a run that also loaded pytest-asyncio (e.g. a bare `pytest`), these tests do not run:
    # they have their own invocation (see the module docstring), which the README's command makes.
    if config.pluginmanager.has_plugin("asyncio"):
        mark = pytest.mark.skip(reason="browser tests run in their own invocation: pytest -p no:asyncio tests/browser")
        for item in items:
            if item.path.is_relative_to(Path(__file__).parent):
                item.add_marker(mark)


def _missing(what: str) -> None:
    msg = f"{what} is missing: run tests/browser/setup.sh"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        _missing("Debian's chromium")
    assert path is not None
    return path


@pytest.fixture(scope="session")
def axe_source() -> str:
    if not AXE.exists():
        _missing(f"axe-core ({AXE.relative_to(ROOT)})")
    return AXE.read_text()


@pytest.fixture(scope="session")
def browser(chromium_path: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path_factory.mktemp("otabox"), scheduler_interval=0.2)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def context(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-US")
    ctx.add_init_script(CSP_PROBE)
    ctx.set_default_timeout(15_000)
    yield ctx
    ctx.close()


@pytest.fixture(scope="module")
def watch(context: Any) -> Iterator[PageWatch]:
    page = context.new_page()
    yield PageWatch(page)
    page.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
