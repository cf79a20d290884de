"""A real PostgreSQL for the tests (a pytest plugin, registered in conftest.py).

`postgres_server`, once per session: the server `scripts/postgres` starts (initdb in a temp
folder, a free port of 127.0.0.1), or the one `OTABOX_TEST_DATABASE_URL` names. When it cannot
be started the tests that need it fail, loudly: they are never skipped.
`postgres_url`: a new, empty database on it for one test, dropped after.
`store_target`: the store of one test, on each backend in turn (params "sqlite", "postgresql").
`server_database`: the `server` fixture's database settings; a module marked
`pytest.mark.both_backends` runs each of its `server` tests on SQLite and on PostgreSQL;
`pytest.mark.sqlite_only` keeps a module on SQLite even with OTABOX_TEST_BACKENDS=all (what it
tests exists only there, e.g. backups of the SQLite file).
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "postgres"
# The first start on a clean machine installs the Debian package: minutes, not seconds.
START_TIMEOUT = 600
BACKENDS = ("sqlite", "postgresql")

_names = itertools.count(1)


def pytest_sessionstart(session: pytest.Session) -> None:
    """On a clean machine, install PostgreSQL before any test runs: apt-get takes longer than
    one test's timeout, and the fixture's own start then takes ~1 s."""
    if os.environ.get("OTABOX_TEST_DATABASE_URL") or glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        return
    subprocess.run([sys.executable, str(SCRIPT), "install"], timeout=START_TIMEOUT, check=False)


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """The URL of a running PostgreSQL (its own database `otabox`) for this test session."""
    given = os.environ.get("OTABOX_TEST_DATABASE_URL")
    if given:
        yield given
        return
    try:
        started = subprocess.run(
            # --owner-pid: stopped also when this run is killed (pytest-timeout ends it with os._exit).
            [sys.executable, str(SCRIPT), "start", "--owner-pid", str(os.getpid())],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"scripts/postgres start took over {START_TIMEOUT} s: {exc.stderr!r}")
    if started.returncode:
        pytest.fail(f"PostgreSQL could not be started (scripts/postgres start):\n{started.stderr}")
    info = json.loads(started.stdout.strip().splitlines()[-1])
    try:
        yield info["url"]
    finally:
        subprocess.run([sys.executable, str(SCRIPT), "stop", info["dir"]], timeout=60, check=False)


@pytest.fixture
async def postgres_url(postgres_server: str) -> AsyncIterator[str]:
    """A fresh database for one test (CREATE DATABASE from template0: ~50 ms), dropped after."""
    name = f"t{os.getpid()}_{next(_names)}"
    admin = await asyncpg.connect(postgres_server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    finally:
        await admin.close()
    yield with_database(postgres_server, name)
    admin = await asyncpg.connect(postgres_server)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Which backend this test's store is on."""
    name: str = request.param
    return name


@pytest.fixture
def store_target(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    """What `Store.open` is given: a SQLite file, or the URL of a fresh PostgreSQL database."""
    if backend == "sqlite":
        return tmp_path / "otabox.db"
    url: str = request.getfixturevalue("postgres_url")
    return url


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "both_backends: run the module's `server` tests on SQLite and on PostgreSQL")
    config.addinivalue_line("markers", "sqlite_only: SQLite only, even with OTABOX_TEST_BACKENDS=all")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # OTABOX_TEST_BACKENDS=all: every `server` test on both (the whole suite against PostgreSQL).
    marked = metafunc.definition.get_closest_marker("both_backends") or os.environ.get("OTABOX_TEST_BACKENDS") == "all"
    if metafunc.definition.get_closest_marker("sqlite_only"):
        marked = False
    if marked and "server_database" in metafunc.fixturenames:
        metafunc.parametrize("server_backend", BACKENDS, indirect=True)


@pytest.fixture
def server_backend(request: pytest.FixtureRequest) -> str:
    """The `server` fixture's backend: SQLite, unless the module is marked both_backends."""
    name: str = getattr(request, "param", "sqlite")
    return name


@pytest.fixture
def server_database(server_backend: str, request: pytest.FixtureRequest) -> dict[str, str]:
    """Settings for the `server` fixture's database: none for SQLite, a fresh database's URL for PostgreSQL."""
    if server_backend == "sqlite":
        return {}
    return {"database_url": request.getfixturevalue("postgres_url")}
