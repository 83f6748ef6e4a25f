"""The code's layout: no import cycle between nuwa_train's modules, and one module per `nuwa-train` command.

A cycle makes a module's names depend on which of the two is imported first (a half-initialised module), and
hides which of them is the lower layer; the command layer reads as the commands when each has its own module.
"""

from __future__ import annotations

import argparse
import ast
import importlib
from pathlib import Path

import pytest

from nuwa_train.cli import build_parser
from nuwa_train.commands import COMMAND_MODULES

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "nuwa_train"
PACKAGE = PACKAGE_DIR.name


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level(body: list[ast.stmt]):
    """The import statements that run when the module is imported: not those in functions or classes, nor
    under `if TYPE_CHECKING:` (never run)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *[handler.body for handler in node.handlers]):
                yield from _module_level(block)


def _everywhere(body: list[ast.stmt]):
    """Every import statement, those deferred into functions included."""
    for node in ast.walk(ast.Module(body=body, type_ignores=[])):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node


def imported_modules(path: Path, modules: set[str], deferred: bool = False) -> set[str]:
    """The package's modules `path` imports at module level, or anywhere with `deferred` (a `from X import
    name` of a submodule: X.name)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    statements = _everywhere if deferred else _module_level
    for node in statements(ast.parse(path.read_text(encoding="utf-8")).body):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
            continue
        if node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        found.add(source)
        found |= {f"{source}.{alias.name}" for alias in node.names}
    return {module for module in found if module in modules} - {name}


def import_graph(deferred: bool = False) -> dict[str, set[str]]:
    paths = sorted(PACKAGE_DIR.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imported_modules(path, modules, deferred) for path in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (its modules in order, the first repeated at the end), or None."""
    done, path = set(), []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return path[path.index(module) :] + [module]
        if module in done:
            return None
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            if cycle := visit(imported):
                return cycle
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        if cycle := visit(module):
            return cycle
    return None


def test_the_cycle_finder_sees_a_cycle_and_a_relative_import(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "d": {"a", "b"}}) is None
    graph = import_graph()
    # the parser reads relative imports, submodules named in `from . import x`, and skips function-level ones
    assert "nuwa_train.data.sharegpt" in graph["nuwa_train.data.records"]
    assert "nuwa_train.pruning.config" in graph["nuwa_train.pruning"]
    assert "nuwa_train.commands.eval" in graph["nuwa_train.commands.demo"]
    assert "nuwa_train.commands.eval" not in graph["nuwa_train.cli"]  # imported inside build_parser


def test_nuwa_train_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 50, "the walk found too few modules"
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_nuwa_train_has_no_cycle_even_through_deferred_imports():
    """No two modules import each other both ways even from inside a function or under TYPE_CHECKING: such an
    import only defers the cycle (records.py <-> sharegpt.py did, through sharegpt's export of SyntheticRecords;
    model_card.py read export.py's names inside a method; selectors.py typed its arguments with config.py's)."""
    graph = import_graph(deferred=True)
    assert "nuwa_train.data.records" in graph["nuwa_train.commands.export_data"]  # deferred imports are seen
    assert "nuwa_train.export" in graph["nuwa_train.cli"]  # imported inside user_errors
    assert "nuwa_train.model_card" in graph["nuwa_train.export"]  # the two pairs that were cycles go one way
    assert "nuwa_train.pruning.selectors" in graph["nuwa_train.pruning.config"]
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return dict(actions[0].choices)


def test_every_subcommand_is_defined_in_its_own_command_module():
    commands = _subcommands(build_parser())
    assert {
        "bench",
        "demo",
        "eval",
        "export",
        "export-data",
        "pretrain-base",
        "chat",
        "serve",
        "fit",
        "validate",
        "test",
    } <= set(commands)
    owners = {}
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"nuwa_train.commands.{name}")
        probe = argparse.ArgumentParser().add_subparsers()
        module.add_parser(probe)
        for command in probe.choices:
            assert command not in owners, f"{command} is defined in both {owners[command]} and {name}"
            owners[command] = name
    assert set(owners) == set(commands), "nuwa-train has a subcommand no command module defines"
    lightning = {"fit", "validate", "test"}  # LightningCLI's three, one module
    for command, module in owners.items():
        if command not in lightning:
            assert module == command.replace("-", "_"), f"{command} is defined in commands/{module}.py"
    assert {owners[command] for command in lightning} == {"lightning"}


@pytest.mark.parametrize("command", ["bench", "eval", "export", "export-data", "chat", "serve", "demo"])
def test_each_command_sets_a_handler_of_its_own_module(command):
    args = {
        "export": ["ckpt", "out"],
        "export-data": ["out"],
        "chat": ["model", "--image", "x.png"],
        "serve": ["model"],
    }.get(command, [])
    handler = build_parser().parse_args([command, *args]).handler
    # serve's handler lives with the server it supervises (nuwa_train.serving.server)
    home = "nuwa_train.serving.server" if command == "serve" else f"nuwa_train.commands.{command.replace('-', '_')}"
    assert handler.__module__ == home
