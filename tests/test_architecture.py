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
    "fitset",
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


BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _root(node: ast.expr) -> ast.expr:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(source: str) -> list[str]:
    """Where ``source`` uses a private (``_``-prefixed) name of ``monitor``.

    Flags ``from monitor... import _x``, and ``a._x`` / ``getattr(a, "_x")`` unless ``a`` is the
    script's own object (``self``, ``cls``) or a module it imported from outside ``monitor``:
    a benchmark cannot tell a profiler from another object statically, and it needs no private
    attribute of its own helpers' instances either.
    """
    tree = ast.parse(source)
    foreign: set[str] = {"self", "cls"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] != "monitor":
                    foreign.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            top = (node.module or "").split(".")[0]
            for a in node.names:
                if top == "monitor" and _private(a.name):
                    found.append(f"line {node.lineno}: from {node.module} import {a.name}")
                elif top != "monitor" and top != "benchmarks":
                    foreign.add(a.asname or a.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            attr, base = node.attr, node.value
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _private(node.args[1].value)
        ):
            attr, base = node.args[1].value, node.args[0]
        else:
            continue
        root = _root(base)
        if not (isinstance(root, ast.Name) and root.id in foreign):
            found.append(f"line {node.lineno}: {ast.unparse(base)}.{attr}")
    return found


def test_private_use_check_sees_imports_attributes_and_getattr() -> None:
    bad = (
        "from monitor import spectrum\nfrom monitor.spectrum import _plan, SpectralProfiler\n"
        "p = SpectralProfiler()\np._working_image(x)\nspectrum._blockiness(x)\n"
        "getattr(p, '_bins')\nSpectralProfiler()._features(1)\n"
    )
    assert len(private_uses(bad)) == 5
    fine = "import os, threading\nos._exit(0)\nthreading._shutdown\nself._drain()\np.profile_timed(x)\n"
    assert private_uses(fine) == []


@pytest.mark.parametrize("path", sorted(BENCHMARKS.rglob("*.py")), ids=lambda p: p.name)
def test_benchmarks_use_only_the_public_api(path: Path) -> None:
    """Benchmarks measure what a user can call: no private function or attribute of the package."""
    assert private_uses(path.read_text()) == [], f"{path.name} uses private names of monitor"
