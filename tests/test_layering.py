"""The package's layering, checked on the source: no import cycles (lazy imports count), the pure
modules import no I/O library, the SDK and the simulator never import the server, few top-level modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import otabox

ROOT = Path(otabox.__file__).resolve().parent
PURE = ("otabox.models", "otabox.protocol", "otabox.rollout", "otabox.jobspec", "otabox.errors", "otabox.export.schema")
IO_LIBRARIES = ("aiohttp", "amqtt", "aiosqlite", "asyncpg", "aiomqtt")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Module -> every module it imports, anywhere in its body (functions and TYPE_CHECKING too)."""
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        name = module_name(path)
        out: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.add(node.module)
                # `from otabox.server import present` imports the module otabox.server.present
                out.update(f"{node.module}.{a.name}" for a in node.names)
        graph[name] = out
    return graph


def internal(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items()}


def test_no_import_cycles() -> None:
    graph = internal(imports())
    # A package importing its own submodules (re-exports) is not a cycle between modules.
    edges = {m: {t for t in ts if not (t.startswith(m + ".") and m in graph)} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(t) :], t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_pure_modules_import_no_io_library() -> None:
    graph = imports()
    for name in PURE:
        bad = {t for t in graph[name] if t.split(".")[0] in IO_LIBRARIES}
        assert not bad, f"{name} imports {bad}"
        assert not any(t.startswith("otabox.server") for t in graph[name]), name


def test_sdk_and_simulator_never_import_the_server() -> None:
    for name, targets in imports().items():
        if name.startswith(("otabox.device", "otabox.sim")):
            server = {t for t in targets if t.startswith(("otabox.server", "otabox.cli"))}
            assert not server, f"{name} imports {server}"


def test_the_server_never_imports_the_cli_the_sdk_or_the_simulator() -> None:
    for name, targets in imports().items():
        if name.startswith("otabox.server"):
            bad = {t for t in targets if t.startswith(("otabox.cli", "otabox.device", "otabox.sim"))}
            assert not bad, f"{name} imports {bad}"


def test_few_modules_directly_in_the_package() -> None:
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(top) <= 12, top


def test_importing_the_sdk_loads_nothing_of_the_server() -> None:
    code = "import sys, otabox.device; print(sorted(m for m in sys.modules if m.startswith('otabox.server')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_cli_starts_without_the_server_or_aiohttp() -> None:
    code = (
        "import sys, otabox.cli; print(sorted(m for m in sys.modules"
        " if m.startswith(('aiohttp', 'amqtt', 'aiosqlite', 'asyncpg', 'cryptography', 'otabox.server.app'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
