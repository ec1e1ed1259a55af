"""The layering of the package: the numeric core stays free of transports and lists what it exports."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "monitor"
CORE = (
    "errors",
    "types",
    "imaging",
    "colour",
    "scope",
    "spectrum",
    "clustering",
    "reliability",
    "drift",
    "model",
    "artifact",
    "batch",
    "fitting",
    "decoding",
    "defaults",
    "allocator",
    "engine",
    "store",
    "refit",
    "parallel",
)
FORBIDDEN = ("grpc", "prometheus_client", "pynetdicom", "dask", "distributed", "pyarrow", "fsspec")


def test_core_never_imports_transports() -> None:
    code = (
        "import monitor.engine, monitor.artifact, monitor.model, monitor.batch, monitor.fitting, monitor.store, "
        "monitor.refit, monitor.parallel; import sys; "
        "print([m for m in sys.modules if m.startswith(('grpc', 'prometheus_client', 'pynetdicom', 'dask', "
        "'distributed', 'pyarrow', 'fsspec'))])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("module", CORE)
def test_core_source_has_no_transport_import(module: str) -> None:
    """Static check too, so a lazy import inside a function cannot slip through."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            assert name.split(".")[0] not in FORBIDDEN, f"monitor/{module}.py imports {name}"


@pytest.mark.parametrize("module", CORE)
def test_all_lists_existing_names(module: str) -> None:
    mod = importlib.import_module(f"monitor.{module}")
    exported = mod.__all__
    assert exported, f"monitor.{module}.__all__ is empty"
    assert len(set(exported)) == len(exported)
    assert list(exported) == sorted(exported)
    missing = [name for name in exported if not hasattr(mod, name)]
    assert missing == [], f"monitor.{module}.__all__ names {missing} which do not exist"


@pytest.mark.parametrize("module", CORE)
def test_public_definitions_are_exported(module: str) -> None:
    """Every public top-level class and function defined in a core module is in its __all__."""
    mod = importlib.import_module(f"monitor.{module}")
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    defined = {
        node.name
        for node in tree.body
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and not node.name.startswith("_")
    }
    assert defined <= set(mod.__all__), (
        f"monitor.{module}: not in __all__: {sorted(defined - set(mod.__all__))}"
    )


def _imports(path: Path) -> list[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    package = ".".join(("monitor", *path.relative_to(PACKAGE).parent.parts))
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            names += [module] + [f"{module}.{a.name}" for a in node.names]
    return names


def test_no_module_imports_the_cli_entry_point_or_hides_imports() -> None:
    """Commands import downward (monitor.commands.output, the core), never monitor.cli: no loop."""
    for path in PACKAGE.rglob("*.py"):
        if path.name == "cli.py" and path.parent == PACKAGE:
            continue
        assert "monitor.cli" not in _imports(path), f"{path.relative_to(PACKAGE)} imports monitor.cli"
        assert "__import__(" not in path.read_text(), f"{path.relative_to(PACKAGE)} hides an import"


def test_client_and_commands_do_not_reach_into_the_server_package() -> None:
    for path in [PACKAGE / "client.py", *(PACKAGE / "commands").glob("*.py")]:
        bad = [
            n
            for n in _imports(path)
            if n.startswith("monitor.server.") and "service" not in n and "logs" not in n
        ]
        assert bad == [], f"{path.relative_to(PACKAGE)} imports {bad}"


def test_sidecar_without_dicom_node_never_loads_pynetdicom() -> None:
    """The DICOM networking layer is loaded only when the node is enabled (dicom_port >= 0)."""
    code = (
        "from prometheus_client import CollectorRegistry; from monitor.server import build_server; "
        "from monitor.settings import Settings; import sys; "
        "s, _ = build_server(Settings(host='127.0.0.1', port=0, metrics_port=-1, decode_processes=0), "
        "registry=CollectorRegistry()); "
        "print([m for m in sys.modules if m.startswith('pynetdicom')])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_cli_help_and_local_runs_never_import_dask() -> None:
    """Dask is imported only on the --scheduler path: `--help` and the CLI's parser stay light."""
    code = (
        "import sys; from monitor.cli import build_parser; build_parser(); "
        "import monitor.commands.runner; "
        "print([m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed', 'pyarrow', 'fsspec')])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout
