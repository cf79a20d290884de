"""The docs stay true to the code: docs/api.md and docs/protocol.md are checked against the routes,
topics, states, error slugs, payload shapes and log columns the code defines. No server, no network.

In docs/api.md every endpoint is a heading such as "### `POST /api/v1/jobs`"; an example a check
reads follows an HTML comment "<!-- example: name -->".
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from otabox import errors, jobspec, models, protocol
from otabox.export.schema import EVENT_COLUMNS
from otabox.models import JobEvent, JobStatus, JobType, TaskState, Waiting
from otabox.server import present
from otabox.server.http.app import build_app
from otabox.server.http.plumbing import API_PREFIX, error_middleware
from otabox.server.jobs.engine import JobEngine
from otabox.server.services import Services

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
API_DOC = DOCS / "api.md"
PROTOCOL_DOC = DOCS / "protocol.md"
README = ROOT / "README.md"

# Endpoints of the management-API contract whose routes are still being written: the doc may
# describe them before the code has them. Empty: every documented endpoint exists.
CONTRACT_ONLY: set[tuple[str, str]] = set()

ENDPOINT_HEADING = re.compile(r"^#{2,4} `(GET|POST|PUT|PATCH|DELETE) (/\S*)`\s*$", re.MULTILINE)


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def routes() -> set[tuple[str, str]]:
    """(method, path) of every route `build_app` registers; the app is built, never started."""
    app = build_app(cast(Services, SimpleNamespace()))  # no handler runs, so no service is needed
    out = set()
    for route in app.router.routes():
        if route.method != "HEAD" and route.resource is not None:
            out.add((route.method, route.resource.canonical))
    return out


def documented_routes() -> set[tuple[str, str]]:
    return {(m, p) for m, p in routes() if p.startswith(API_PREFIX + "/") or p in ("/healthz", "/metrics", "/ca.pem")}


def endpoint_headings(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in ENDPOINT_HEADING.finditer(text)]


def path_pattern(path: str) -> re.Pattern[str]:
    """A route path as a regex: `{name}` matches itself, or one concrete segment (`{action}` -> `pause`)."""
    out = ""
    for part in re.split(r"(\{[^}]+\})", path):
        out += f"(?:{re.escape(part)}|[A-Za-z0-9_.-]+)" if part.startswith("{") else re.escape(part)
    return re.compile(out)


def matches(route: tuple[str, str], endpoint: tuple[str, str]) -> bool:
    return route[0] == endpoint[0] and path_pattern(route[1]).fullmatch(endpoint[1]) is not None


def example(text: str, name: str) -> Any:
    """The JSON of the ```json block that follows `<!-- example: name -->`."""
    found = re.search(rf"<!-- example: {re.escape(name)} -->\s*```json\n(.*?)\n```", text, re.DOTALL)
    assert found, f"no `<!-- example: {name} -->` json block"
    return json.loads(found.group(1))


def table_cells(text: str) -> set[str]:
    """The first cell of every table row, without backticks: "| `pending` | waiting |" -> "pending"."""
    return {m.group(1) for m in re.finditer(r"^\| `?([^`|]+?)`? \|", text, re.MULTILINE)}


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = unicodedata.normalize("NFC", heading.strip().lower())
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6} (.+?)\s*$", re.sub(r"```.*?```", "", text, flags=re.DOTALL), re.MULTILINE):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


# ---------------------------------------------------------------- the API


def test_every_route_is_documented() -> None:
    documented = endpoint_headings(read(API_DOC))
    missing = [r for r in sorted(documented_routes()) if not any(matches(r, e) for e in documented)]
    assert not missing, f"routes without a heading in docs/api.md: {missing}"


def test_every_documented_endpoint_exists() -> None:
    known = documented_routes()
    stray = [
        e for e in endpoint_headings(read(API_DOC)) if e not in CONTRACT_ONLY and not any(matches(r, e) for r in known)
    ]
    assert not stray, f"docs/api.md documents endpoints the server does not have: {stray}"


def test_states_and_reasons_are_documented() -> None:
    cells = table_cells(read(API_DOC))
    for enum in (TaskState, JobStatus, Waiting, JobEvent):
        missing = [s.value for s in enum if s.value not in cells]
        assert not missing, f"{enum.__name__} values without a table row in docs/api.md: {missing}"
    protocol_cells = table_cells(read(PROTOCOL_DOC))
    assert not [s.value for s in TaskState if s.value not in protocol_cells]


async def _slug_of(exc: web.HTTPException) -> str:
    async def handler(request: web.Request) -> web.StreamResponse:
        raise exc

    resp = await error_middleware(make_mocked_request("GET", "/api/v1/x"), handler)
    assert isinstance(resp, web.Response) and resp.text is not None
    code: str = json.loads(resp.text)["error"]["code"]
    return code


async def test_every_error_slug_is_documented() -> None:
    classes: list[type[errors.OtaboxError]] = [errors.OtaboxError, *errors.OtaboxError.__subclasses__()]
    slugs = {cls.code for cls in classes}
    for path in (ROOT / "otabox").rglob("*.py"):
        slugs.update(re.findall(r'\bcode="([a-z][a-z-]*)"', read(path)))
    for exc in (
        web.HTTPNotFound(),
        web.HTTPMethodNotAllowed("PUT", ["GET"]),
        web.HTTPRequestEntityTooLarge(1, 2),
        web.HTTPBadRequest(),
    ):
        slugs.add(await _slug_of(exc))
    text = read(API_DOC)
    missing = sorted(s for s in slugs if not re.search(rf"^\| \d\S* \| `{re.escape(s)}` \|", text, re.MULTILINE))
    assert not missing, f"error codes missing from the table in docs/api.md: {missing}"


NULLABLE_TASK_FIELDS = (
    "bytes_downloaded",
    "progress",
    "step",
    "desc",
    "from_version",
    "due_at",
    "retry_at",
    "published_at",
    "upgrading_at",
    "finished_at",
)


def test_examples_have_the_shapes_the_server_sends() -> None:
    text = read(API_DOC)
    device = models.Device("p", "d", None, False, None, {}, "sign", 0)
    assert set(example(text, "device")) == {*present.device(device), "deviceSecret"}, "device example"
    fw = SimpleNamespace(
        id="f",
        product_key="p",
        name="n",
        version="1",
        desc="",
        size=1,
        md5="m",
        sha256="s",
        sign_method="sha256",
        sign="s",
        file_name="x.bin",
        status=SimpleNamespace(value="unverified"),
        enable_verification=False,
        min_success_for_verified=1,
        created_at=0,
        signature="sig",
        publisher=None,
    )
    assert set(example(text, "firmware")) == set(present.firmware(cast(Any, fw))), "firmware example"
    task = SimpleNamespace(
        **dict.fromkeys(NULLABLE_TASK_FIELDS),
        job_id="j",
        product_key="p",
        device_key="d",
        status=TaskState.PENDING,
        wave=0,
        to_version="2",
        attempt=1,
        updated_at=0,
    )
    assert set(example(text, "task")) == set(present.task(cast(Any, task))), "task example"
    assert list(example(text, "event")) == list(EVENT_COLUMNS), "event example"
    node = models.NodeState("n", True, 0, 0.0)
    assert set(example(text, "node")) == set(present.node(node)), "node example"


def test_job_body_example_is_valid() -> None:
    body = example(read(API_DOC), "job-body")
    jobspec.validate(body)  # raises BadRequest naming the field
    assert set(body) == jobspec.BODY_KEYS, "the example body should show every top-level field"


def test_job_example_is_what_the_api_shows_for_its_settings() -> None:
    shown = example(read(API_DOC), "job")
    spec = jobspec.validate({k: v for k, v in shown.items() if k in jobspec.BODY_KEYS})
    job = SimpleNamespace(
        id="j",
        name="n",
        type=JobType.UPGRADE,
        firmware_id="f",
        product_key="p",
        to_version="2",
        status=JobStatus.RUNNING,
        status_reason="",
        current_wave=1,
        skipped=0,
        created_at=0,
        started_at=0,
        finished_at=None,
        spec=spec,
    )
    expected = present.job(cast(Any, job), {}, 0)
    assert set(shown) == {*expected, "waiting"}, "job example: fields"
    settings = jobspec.to_json(spec)
    assert {k: shown[k] for k in settings} == settings, "job example: settings as the API shows them"
    assert set(shown["counts"]) == {s.value for s in TaskState}


def test_event_columns_are_documented_in_order() -> None:
    text = read(API_DOC).partition("\n## The upgrade log\n")[2]
    assert text, "docs/api.md has no section '## The upgrade log'"
    rows = [m.group(1) for m in re.finditer(r"^\| `([A-Za-z]+)` \| [^|]+ \|", text, re.MULTILINE)]
    columns = [r for r in rows if r in EVENT_COLUMNS]
    assert columns == list(EVENT_COLUMNS), "docs/api.md's upgrade-log column table differs from EVENTS"


# ---------------------------------------------------------------- the device protocol


def test_every_topic_is_documented() -> None:
    text = read(PROTOCOL_DOC)
    # Every topic constant of the protocol module, whether or not a tuple lists it yet.
    suffixes = {v for v in vars(protocol).values() if isinstance(v, str) and v.startswith("ota/")}
    assert {*protocol.DEVICE_TOPICS, protocol.UPGRADE} <= suffixes
    for suffix in sorted(suffixes):
        assert f"`/sys/{{pk}}/{{dk}}/{suffix}`" in text, suffix
    for suffix in (protocol.INFORM, protocol.PROGRESS, protocol.GETVERSION, protocol.REQUEST):
        assert f"`/sys/{{pk}}/{{dk}}/{suffix}_reply`" in text, suffix


def test_codes_and_steps_are_documented() -> None:
    cells = table_cells(read(PROTOCOL_DOC))
    consts = {name: value for name, value in vars(protocol).items() if name.startswith(("CODE_", "STEP_"))}
    missing = [name for name, value in consts.items() if str(value) not in cells]
    assert not missing, f"reply codes or progress steps without a table row in docs/protocol.md: {missing}"
    assert not [m for m in protocol.SIGN_METHODS if m not in cells]


def test_login_example_is_right() -> None:
    text = read(PROTOCOL_DOC)
    head = re.search(r"<!-- login-example dk=(\S+) pk=(\S+) ts=(\S+) secret=(\S+) -->\n((?:\|.*\n)+)", text)
    assert head, "no login-example table in docs/protocol.md"
    dk, pk, ts, secret, table = head.groups()
    rows = dict(re.findall(r"^\| `(\w+)` \| `(\w+)` \|$", table, re.MULTILINE))
    assert set(rows) == set(protocol.SIGN_METHODS)
    for method, password in rows.items():
        assert password == protocol.sign(protocol.login_params(dk, pk, ts), secret, method), method
    # The client id and user name templates, as the code builds them.
    assert protocol.client_id_for("{dk}", "{method}", "{ts}").replace("|", "\\|") in text
    assert "`{dk}&{pk}`" in text


def test_push_example_has_the_fields_the_server_sends() -> None:
    text = read(PROTOCOL_DOC)
    push = example(text, "upgrade-push")
    assert push["method"] == "ota.device.upgrade" and isinstance(push["id"], str)
    engine = SimpleNamespace(urls=SimpleNamespace(file_url=lambda fw, dk: "http://x/firmware/f/x.bin?token=t"))
    fw = SimpleNamespace(
        version="2", sign="s", sign_method="sha256", size=1, name="n", desc="", signature="sig", id="f"
    )
    params = JobEngine.offer(cast(JobEngine, engine), cast(Any, SimpleNamespace(id="j")), cast(Any, fw), "d")
    assert set(push["params"]) == set(params), "push example: params"
    cells = table_cells(text)
    assert not [k for k in params if k not in cells], "push params without a row in docs/protocol.md"


# ---------------------------------------------------------------- all docs


def test_json_examples_parse() -> None:
    for path in (API_DOC, PROTOCOL_DOC):
        for block in re.findall(r"```json\n(.*?)\n```", read(path), re.DOTALL):
            json.loads(block)


@pytest.mark.parametrize("path", [README, *sorted(DOCS.rglob("*.md"))], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pointer_to_the_private_spec(path: Path) -> None:
    # Readers of the repository cannot see ../shared: the docs are the project's own.
    assert "shared/spec" not in read(path)


@pytest.mark.parametrize("path", [README, API_DOC, PROTOCOL_DOC], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    text = read(path)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"```.*?```", "", text, flags=re.DOTALL)):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        # An anchor into a Markdown file must name one of its headings.
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(read(linked))):
            broken.append(target)
    assert not broken, f"broken links in {path.name}: {broken}"
