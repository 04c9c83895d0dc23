"""The package's modules depend on each other without a circle, counting the imports inside
functions too (only those needed for type annotations are left out), and none is named like
what the package exports."""

from __future__ import annotations

import ast
from pathlib import Path

import builder

PACKAGE = Path(builder.__file__).parent


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(tree: ast.AST) -> set[str]:
    """Sibling modules this module imports (`from .x import ...`, `from . import x`)."""
    found: set[str] = set()
    for node in ast.iter_child_nodes(tree):
        if _is_type_checking_block(node):
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module.split(".")[0]] if node.module else [alias.name for alias in node.names])
        found |= _imports(node)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    graph = {}
    for path in PACKAGE.glob("*.py"):
        graph[path.stem] = (_imports(ast.parse(path.read_text(encoding="utf-8"))) & modules) - {path.stem, "__init__"}
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module) :] + [module]
        if module in done:
            return None
        for dependency in sorted(graph[module]):
            circle = visit(dependency, path + [module])
            if circle:
                return circle
        done.add(module)
        return None

    for module in sorted(graph):
        circle = visit(module, [])
        if circle:
            return circle
    return None


def test_no_import_circle():
    assert find_circle(import_graph()) is None


def test_the_circle_finder_finds_one():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None


def test_the_hub_client_knows_nothing_of_caches():
    """The client serves the reader and the push alike; it needs neither, nor the manifest."""
    assert import_graph()["hub"] == {"errors"}


PUBLIC_BUILD_AFTER_ITS_MODULE = """
import builder, builder.pipeline
from builder import build
assert build is builder.build is builder.pipeline.build, (build, builder.build)
assert callable(build) and type(build).__name__ == "function"
"""


def test_the_public_build_stays_the_function_once_its_module_is_imported():
    """Importing a submodule sets it as an attribute of the package: a module named `build` would
    replace the package's `build` function with itself ("'module' object is not callable"). A fresh
    process, so no earlier import hides it."""
    import subprocess
    import sys

    imports_of_the_cli = "import importlib, builder.cli; [importlib.import_module(m) for m in builder.cli.BUILD_IMPORTS]"
    for first in ("import builder.pipeline", "from builder import build", imports_of_the_cli):
        script = f"{first}\n{PUBLIC_BUILD_AFTER_ITS_MODULE}"
        proc = subprocess.run([sys.executable, "-c", script], cwd=PACKAGE.parent, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, (first, proc.stderr[-2000:])


def test_no_module_shares_a_name_with_what_the_package_exports():
    """The same for every public name: a module named like one would replace it once imported."""
    assert {path.stem for path in PACKAGE.glob("*.py")} & set(builder.__all__) == set()
