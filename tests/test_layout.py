"""The codebase's own rules, checked: a torch-free server top level, no test importing another."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SERVER = TESTS.parent / "server" / "pairscore_server"

#: Server modules that must import without torch: everything but the engine's model code.
TORCH_FREE = (
    "pairscore_server.main",
    "pairscore_server.lifecycle",
    "pairscore_server.wiring",
    "pairscore_server.watchdog",
    "pairscore_server.flags",
    "pairscore_server.flag_table",
    "pairscore_server.config",
    "pairscore_server.batcher",
    "pairscore_server.service",
    "pairscore_server.answer_bound",
    "pairscore_server.servicer",
    "pairscore_server.response_size",
    "pairscore_server.errors",
    "pairscore_server.engine",
    "pairscore_server.engine.interface",
    "pairscore_server.engine.spec",
    "pairscore_server.engine.memory",
)


def test_the_server_top_level_imports_no_torch() -> None:
    code = (
        "import importlib, sys\n"
        f"for name in {TORCH_FREE!r}:\n"
        "    importlib.import_module(name)\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"imported by the server's top level: {out.stdout.strip()}"


def test_no_test_module_imports_another_or_conftest() -> None:
    offenders = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("test_") or n == "conftest"]
    assert offenders == [], "shared helpers belong in tests/harness/"


def test_the_batcher_reads_its_engine_only_through_the_protocol() -> None:
    """No getattr/hasattr probing of the engine: the Engine protocol says what it has."""
    for module in ("batcher.py", "service.py", "wiring.py", "lifecycle.py"):
        tree = ast.parse((SERVER / module).read_text(encoding="utf-8"))
        probes = [
            ast.unparse(node)
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr")
            and "engine" in ast.unparse(node.args[0])
        ]
        assert probes == [], f"{module} probes its engine: {probes}"


CLIENT = TESTS.parent / "client" / "pairscore"


def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def test_the_server_imports_only_public_client_modules() -> None:
    """The client's ``_private`` modules may change with the client; the server reads inputs
    through :mod:`pairscore.inputs` and the other public modules."""
    private = [
        f"{path.relative_to(SERVER.parent)}: {name}"
        for path in sorted(SERVER.rglob("*.py"))
        for name in _imports(path)
        if name.startswith("pairscore.") and any(part.startswith("_") for part in name.split(".")[1:])
    ]
    assert private == []


def test_the_client_core_does_not_reach_up_into_the_pipeline() -> None:
    """The dependency points down: the CLI (pipeline) and the table helpers build on the client
    core and :mod:`pairscore.inputs`, never the other way round."""
    above = {"cli.py", "hf.py", "ray.py"}
    offenders = [
        f"{path.name}: {name}"
        for path in sorted(CLIENT.glob("*.py"))
        if path.name not in above
        for name in _imports(path)
        if name.startswith("pairscore.pipeline")
    ]
    assert offenders == []
