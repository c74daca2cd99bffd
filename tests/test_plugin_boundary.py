"""The plugin boundary holds, and no package has an import cycle.

Code outside the core (``plugins/``, ``contrib-*/``, ``examples/``) imports only the public
API: ``runyard`` (for job authors) and ``runyard.plugin`` (for plugin authors), plus the
kit (``runyard.testing`` and its submodules) in test files. Whatever else a plugin needs is
added to ``runyard.plugin``. There is no list of exceptions.

Imports are read from the syntax tree, so ``import runyard.x``, ``from runyard.x import y``,
``from runyard import x`` (when ``x`` is a submodule), imports inside functions and under
``TYPE_CHECKING`` all count, and so do import strings (``"runyard.x:Name"``) in entry
points, specs and ``importlib.import_module`` calls.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "core" / "runyard"
OUTSIDE = [ROOT / "plugins", *sorted(ROOT.glob("contrib-*")), ROOT / "examples"]
PUBLIC = {"runyard", "runyard.plugin"}
_SKIP_DIRS = {".venv", "__pycache__", ".tools", "build", "dist"}
# An import string as specs and entry points spell it: "runyard.something:Name".
_IMPORT_STRING = re.compile(r"^runyard(\.[A-Za-z_][A-Za-z0-9_]*)+:[A-Za-z_][A-Za-z0-9_.]*$")
_IMPORTERS = {"import_module", "__import__", "find_spec"}


def _core_modules() -> set[str]:
    found = set()
    for path in CORE.rglob("*.py"):
        parts = list(path.relative_to(CORE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found.add(".".join(parts))
    return found


CORE_MODULES = _core_modules()


def _python_files() -> Iterator[Path]:
    for top in OUTSIDE:
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
            for name in filenames:
                if name.endswith(".py"):
                    yield Path(dirpath, name)


def _is_test_file(path: Path) -> bool:
    rel = path.relative_to(ROOT).parts
    return "tests" in rel or path.name.startswith("test_") or path.name == "conftest.py"


def _allowed(module: str, path: Path) -> bool:
    if module in PUBLIC:
        return True
    return _is_test_file(path) and (module == "runyard.testing" or module.startswith("runyard.testing."))


def runyard_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every runyard module ``path`` imports or names in an import string."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "runyard"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "runyard":
                continue
            found.append((node.lineno, node.module))
            for alias in node.names:
                # `from runyard import worker` imports a submodule, not a public name.
                sub = f"{node.module}.{alias.name}"
                if sub in CORE_MODULES:
                    found.append((node.lineno, sub))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _IMPORT_STRING.match(node.value):
            found.append((node.lineno, node.value.partition(":")[0]))
        elif isinstance(node, ast.Call) and node.args and _called_name(node.func) in _IMPORTERS:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("runyard."):
                found.append((node.lineno, arg.value))
    return found


def _called_name(func: ast.expr) -> str:
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


def _entry_point_strings() -> Iterator[tuple[Path, str]]:
    for pyproject in [ROOT / "pyproject.toml", *(p / "pyproject.toml" for p in ROOT.glob("contrib-*")),
                      *ROOT.glob("examples/*/pyproject.toml")]:
        if not pyproject.exists():
            continue
        data = tomllib.loads(pyproject.read_text())
        for group in data.get("project", {}).get("entry-points", {}).values():
            for target in group.values():
                yield pyproject, target.partition(":")[0]


def test_the_scan_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The detector itself: each form of a private import is caught, public ones are not."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import runyard\nimport runyard.plugin\nfrom runyard import job, plugin\nfrom runyard.plugin import hookimpl\n"
        "import runyard.worker\nfrom runyard.config import structure\nfrom runyard import registry\n"
        "def f():\n    from runyard.storage.sqlite import SqliteRunStorage\n"
        "SPEC = 'runyard.engine:Engine'\nLABEL = 'runyard.instance'\nPUBLIC = 'runyard.plugin:hookimpl'\n"
        "import importlib\nimportlib.import_module('runyard.loader')\n"
    )
    private = sorted(m for _, m in runyard_imports(sample) if m not in PUBLIC)
    assert private == ["runyard.config", "runyard.engine", "runyard.loader", "runyard.registry",
                       "runyard.storage.sqlite", "runyard.worker"]


def test_outside_the_core_only_the_public_api_is_imported() -> None:
    files = list(_python_files())
    assert len(files) > 40, "the scan found too few files: is the layout still plugins/, contrib-*/, examples/?"
    leaks = [
        f"{path.relative_to(ROOT)}:{line}: imports {module}"
        for path in files
        for line, module in runyard_imports(path)
        if not _allowed(module, path)
    ]
    assert not leaks, (
        "code outside the core imports private runyard modules; import from runyard or runyard.plugin "
        "(add what is missing to runyard.plugin's public API):\n" + "\n".join(leaks)
    )


def test_entry_points_outside_the_core_name_no_private_runyard_module() -> None:
    bad = [f"{p.relative_to(ROOT)}: {target}" for p, target in _entry_point_strings()
           if p != ROOT / "pyproject.toml" and target.split(".")[0] == "runyard" and target not in PUBLIC]
    assert not bad, bad


def test_everything_runyard_plugin_exports_exists() -> None:
    import runyard.plugin

    missing = [name for name in runyard.plugin.__all__ if not hasattr(runyard.plugin, name)]
    assert not missing, missing


# -- import cycles ------------------------------------------------------------------------


def _packages() -> dict[str, Path]:
    """Every package of the tree (the core, the built-ins, each contrib and example)."""
    found = {"runyard": CORE}
    for top in [ROOT / "plugins", *ROOT.glob("contrib-*"), *ROOT.glob("examples/*")]:
        for init in top.glob("*/__init__.py"):
            found[init.parent.name] = init.parent
    return found


def _modules(packages: dict[str, Path]) -> dict[str, Path]:
    found = {}
    for name, root in packages.items():
        for path in root.rglob("*.py"):
            parts = [name, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return "TYPE_CHECKING" in ast.unparse(test)


def import_graph(modules: dict[str, Path], *, lazy: bool) -> dict[str, set[str]]:
    """Module -> modules of the tree it imports. ``lazy``: imports inside functions count
    too (they run later, but still tie the two modules together); imports under
    ``TYPE_CHECKING`` never run and do not count."""
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()

        def visit(node: ast.AST, top: bool, module: str = module, is_package: bool = is_package,
                  targets: set[str] = targets) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _is_type_checking(child.test):
                    for other in child.orelse:
                        visit(other, top)
                    continue
                in_top = top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                if isinstance(child, ast.Import) and (in_top or lazy):
                    targets.update(a.name for a in child.names)
                elif isinstance(child, ast.ImportFrom) and (in_top or lazy):
                    if child.level:
                        base = module.split(".") if is_package else module.split(".")[:-1]
                        base = base[: len(base) - (child.level - 1)]
                        name = ".".join([*base, *([child.module] if child.module else [])])
                    else:
                        name = child.module or ""
                    targets.add(name)
                    targets.update(f"{name}.{a.name}" for a in child.names)
                visit(child, in_top)

        visit(ast.parse(path.read_text(encoding="utf-8")), True)
        edges = set()
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != module:
                edges.add(target)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def _describe(graph: dict[str, set[str]], component: list[str]) -> str:
    members = set(component)
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & members))}" for m in component)


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_package_has_an_import_cycle_at_import_time() -> None:
    """Module-level imports of every package, the core's included, form no cycle: which
    module is imported first never matters."""
    graph = import_graph(_modules(_packages()), lazy=False)
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(_describe(graph, c) for c in found)


def test_no_plugin_package_has_an_import_cycle_even_through_function_level_imports() -> None:
    """In plugin packages even imports inside functions form no cycle: ``plugin.py`` holds
    hookimpls and specs, settings live in a module of their own, and the implementation
    imports those, never the other way round."""
    packages = {k: v for k, v in _packages().items() if k != "runyard"}
    graph = import_graph(_modules(packages), lazy=True)
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(_describe(graph, c) for c in found)


def _importable_modules() -> list[str]:
    packages = _packages()
    names = []
    for module in sorted(_modules(packages)):
        top = module.split(".")[0]
        if top == "runyard_k8s" or module.endswith("__main__"):
            continue
        names.append(module)
    return names


@pytest.mark.parametrize("package", sorted(set(_packages()) - {"runyard_k8s"}))
def test_every_module_imports_on_its_own(package: str) -> None:
    """Each module imports first in a fresh interpreter: an import cycle that breaks
    depending on which module comes first (a partially initialised module) shows here."""
    modules = [m for m in _importable_modules() if m.split(".")[0] == package]
    code = (
        "import importlib, subprocess, sys\n"
        "bad = []\n"
        "for name in sys.argv[1:]:\n"
        "    r = subprocess.run([sys.executable, '-c', f'import {name}'], capture_output=True, text=True)\n"
        "    if r.returncode:\n"
        "        bad.append(name + ': ' + r.stderr.strip().splitlines()[-1])\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"modules of {package} that fail to import on their own:\n{result.stdout}"


# -- the shape of a contrib package ---------------------------------------------------------


def _is_hookimpl(node: ast.FunctionDef) -> bool:
    return any(ast.unparse(d).split("(")[0] in ("hookimpl", "runyard.plugin.hookimpl") for d in node.decorator_list)


@pytest.mark.parametrize(
    "plugin_module", sorted(ROOT.glob("contrib-*/runyard_*/plugin.py")), ids=lambda p: p.parent.name
)
def test_a_contrib_plugin_module_holds_hookimpls_and_nothing_else(plugin_module: Path) -> None:
    """Settings classes, validators and wire constants live in a module the implementation
    imports (``settings.py``); ``plugin.py`` only implements hooks, so importing the
    implementation never means importing the entry-point module, nor the other way round."""
    tree = ast.parse(plugin_module.read_text())
    extra = []
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if isinstance(node, ast.FunctionDef) and _is_hookimpl(node):
            continue
        extra.append(f"line {node.lineno}: {ast.unparse(node).splitlines()[0]}")
    assert not extra, f"{plugin_module.relative_to(ROOT)} holds more than hookimpls:\n" + "\n".join(extra)
