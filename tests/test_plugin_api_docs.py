"""The plugin API's reference stays complete: every hook has a docstring and a section in
docs/plugins.md, and plugins can add CLI commands through `runyard_cli`."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from runyard import hookspecs
from runyard.plugin import hookimpl
from runyard.registry import PluginRegistry

ROOT = Path(__file__).resolve().parent.parent
HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("runyard_")]


def test_there_are_hooks() -> None:
    assert {"runyard_executors", "runyard_run_launchers", "runyard_storages", "runyard_cli"} <= set(HOOKS)


def test_every_hook_has_a_docstring_with_its_version() -> None:
    for name in HOOKS:
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert "Added in API version" in doc, f"hook {name} lacks a docstring saying when it was added"


def test_every_hook_has_a_section_in_the_plugin_guide() -> None:
    guide = (ROOT / "docs" / "plugins.md").read_text()
    missing = [name for name in HOOKS if f"`{name}`" not in guide or f"### `{name}`" not in guide]
    assert not missing, f"docs/plugins.md has no '### `hook`' section for: {', '.join(missing)}"


class _CliPlugin:
    @hookimpl
    def runyard_cli(self, cli: click.Group) -> None:
        @cli.group("greeter")
        def greeter() -> None:
            """Commands of a throwaway plugin."""

        @greeter.command("hello")
        def hello() -> None:
            click.echo("hello from a plugin command")


def test_runyard_cli_hook_adds_commands() -> None:
    registry = PluginRegistry(use_entry_points=False)
    registry.register(_CliPlugin(), name="greeter", distribution="greeter-dist")
    group = click.Group("runyard")
    registry.add_cli_commands(group)
    result = CliRunner().invoke(group, ["greeter", "hello"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "hello from a plugin command"


# -- documented signatures are the real ones ----------------------------------------------


def _signature_blocks() -> dict[str, str]:
    """``<!-- signature: dotted.name -->`` blocks of the guide, by the name they declare."""
    from tests.test_docs_plugins import blocks

    found = {b.target: b.code for b in blocks() if b.kind == "signature"}
    assert found, "docs/plugins.md has no signature blocks"
    return found


def _resolve(dotted: str) -> Any:
    module_name, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def _params(args: ast.arguments) -> list[tuple[str, str, str | None, str | None]]:
    """(kind, name, annotation, default) of each parameter, in order, as source text."""
    out: list[tuple[str, str, str | None, str | None]] = []
    positional = [*args.posonlyargs, *args.args]
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for i, (a, d) in enumerate(zip(positional, defaults, strict=True)):
        kind = "POSITIONAL_ONLY" if i < len(args.posonlyargs) else "POSITIONAL_OR_KEYWORD"
        out.append((kind, a.arg, ast.unparse(a.annotation) if a.annotation else None, ast.unparse(d) if d else None))
    if args.vararg:
        out.append(("VAR_POSITIONAL", args.vararg.arg, _ann(args.vararg), None))
    for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        out.append(("KEYWORD_ONLY", a.arg, _ann(a), ast.unparse(d) if d is not None else None))
    if args.kwarg:
        out.append(("VAR_KEYWORD", args.kwarg.arg, _ann(args.kwarg), None))
    return out


def _ann(a: ast.arg) -> str | None:
    return ast.unparse(a.annotation) if a.annotation else None


def _text(annotation: Any) -> str | None:
    if annotation is inspect.Parameter.empty or annotation is inspect.Signature.empty:
        return None
    # Modules with `from __future__ import annotations` keep them as source text.
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def _real_params(fn: Any) -> list[tuple[str, str, str | None, str | None]]:
    sig = inspect.signature(fn)
    return [
        (p.kind.name, p.name, _text(p.annotation),
         None if p.default is inspect.Parameter.empty else repr(p.default))
        for p in sig.parameters.values()
    ]


def _check_function(where: str, doc: ast.FunctionDef, real: Any) -> list[str]:
    problems = []
    documented = _params(doc.args)
    actual = _real_params(real)
    if [(k, n, a, ast.unparse(ast.parse(d)) if d else None) for k, n, a, d in documented] != [
        (k, n, a, ast.unparse(ast.parse(d)) if d else None) for k, n, a, d in actual
    ]:
        problems.append(f"{where}: documented parameters {documented} but the real ones are {actual}")
    returns = ast.unparse(doc.returns) if doc.returns else None
    if returns != _text(inspect.signature(real).return_annotation):
        problems.append(f"{where}: documented return {returns!r}, real {inspect.signature(real).return_annotation!r}")
    return problems


def _decorators(node: ast.FunctionDef) -> set[str]:
    return {ast.unparse(d) for d in node.decorator_list}


def _check(dotted: str, code: str) -> list[str]:
    real = _resolve(dotted)
    tree = ast.parse(code)
    (node,) = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)]
    if isinstance(node, ast.FunctionDef):
        assert node.name == dotted.rpartition(".")[2], f"the block for {dotted} declares {node.name}"
        return _check_function(dotted, node, real)
    assert inspect.isclass(real) and node.name == real.__name__, f"the block for {dotted} declares {node.name}"
    problems: list[str] = []
    methods = {n.name: n for n in node.body if isinstance(n, ast.FunctionDef)}
    for name, method in methods.items():
        raw = real.__dict__.get(name)
        if raw is None:
            problems.append(f"{dotted}.{name} is documented but not defined on the class")
            continue
        kind = ("classmethod" if isinstance(raw, classmethod)
                else "staticmethod" if isinstance(raw, staticmethod) else "")
        if kind and kind not in _decorators(method):
            problems.append(f"{dotted}.{name} is a {kind}; document it with @{kind}")
        if not kind and _decorators(method) & {"classmethod", "staticmethod"}:
            problems.append(f"{dotted}.{name} is a plain method, not {_decorators(method)}")
        problems += _check_function(f"{dotted}.{name}", method, getattr(raw, "__func__", raw))
    # Every public method the class defines itself is documented.
    public = {n for n, v in vars(real).items()
              if not n.startswith("_") and (callable(v) or isinstance(v, classmethod | staticmethod))}
    if missing := public - set(methods):
        problems.append(f"{dotted}: public methods missing from the guide's declaration: {sorted(missing)}")
    # Documented class attributes exist with the documented value.
    for n in node.body:
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
            if n.target.id not in vars(real):
                problems.append(f"{dotted}.{n.target.id} is documented but not defined")
            elif n.value is not None and ast.unparse(n.value) != repr(vars(real)[n.target.id]):
                problems.append(f"{dotted}.{n.target.id}: documented {ast.unparse(n.value)}, real "
                                f"{vars(real)[n.target.id]!r}")
    return problems


def test_every_hook_has_a_signature_block() -> None:
    documented = _signature_blocks()
    missing = [name for name in HOOKS if f"runyard.hookspecs.{name}" not in documented]
    assert not missing, f"docs/plugins.md declares no signature (<!-- signature: ... --> block) for {missing}"


def test_the_documented_classes_are_declared() -> None:
    documented = _signature_blocks()
    for name in ("StepHandler", "StepUpdate", "RunLauncher", "execute_step"):
        assert f"runyard.plugin.{name}" in documented, f"docs/plugins.md declares no signature for {name}"


@pytest.mark.parametrize("dotted", sorted(_signature_blocks()))
def test_documented_signature_matches_the_code(dotted: str) -> None:
    problems = _check(dotted, _signature_blocks()[dotted])
    assert not problems, "\n".join(problems)


def test_the_checker_catches_a_wrong_signature() -> None:
    # The check itself must fail on a drifted declaration: a renamed parameter, a lost
    # keyword-only marker, a wrong default, a missing method.
    assert _check("runyard.hookspecs.runyard_cli", "def runyard_cli(group: click.Group) -> None: ...")
    assert _check("runyard.plugin.StepUpdate", """
class StepUpdate:
    @classmethod
    def running(cls, events: Sequence[Event] = (), started: bool = False) -> StepUpdate: ...
    @classmethod
    def finished(cls, events: Sequence[Event] = ()) -> StepUpdate: ...
    @classmethod
    def crashed(cls, failure: FailureInfo, events: Sequence[Event] = ()) -> StepUpdate: ...
""")
    assert _check("runyard.plugin.execute_step", """
def execute_step(request: StepRequest, *, capture_output: bool = False,
                 on_event: Callable[[Event], None] | None = None) -> list[Event]: ...
""")
    assert _check("runyard.plugin.StepHandler", "class StepHandler:\n    def setup(self) -> None: ...\n")


def _table_rows(heading: str) -> list[list[str]]:
    """The cells of the first Markdown table after ``heading`` in the guide."""
    text = (ROOT / "docs" / "plugins.md").read_text()
    rows: list[list[str]] = []
    for line in text[text.index(heading):].splitlines()[1:]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # past the header and its rule


def test_the_step_request_table_lists_every_field_in_order() -> None:
    import attrs
    from runyard.plugin import StepRequest

    documented = [row[0].strip("`") for row in _table_rows("### The step request")]
    assert documented == [f.name for f in attrs.fields(StepRequest)]


def test_the_capabilities_table_lists_every_field_with_its_default() -> None:
    import attrs
    from runyard.plugin import Capabilities

    documented = {}
    for row in _table_rows("## Capabilities: what the core rejects before a run"):
        name, default = re.fullmatch(r"`(\w+)` \((.+)\)", row[0]).groups()  # type: ignore[union-attr]
        documented[name] = default
    assert documented == {f.name: repr(f.default) for f in attrs.fields(Capabilities)}
