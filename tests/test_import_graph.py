"""The import graph of `metalm`: no two modules import each other (nor, today, any longer
circle), and the plain tuning options do not import Optuna.

The graph is read from the source with `ast` (nothing is imported): an edge for each
import of a metalm module, at module level or inside a function, but not under
`if TYPE_CHECKING:` (annotations only). `from package import name` is an edge to the
submodule `package.name` when there is one, else to the package.
"""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# two modules that import each other and are hard to separate (none today)
KNOWN_TWO_CYCLES: set[frozenset[str]] = set()


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    modules = {}
    for path in sorted((SRC / "metalm").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(node: ast.AST, package: str, modules: dict[str, Path]) -> set[str]:
    """The metalm modules one import statement names."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    assert isinstance(node, ast.ImportFrom)
    base = node.module or ""
    if node.level:  # relative: `from .x import y` in package a.b means a.b.x
        parent = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*parent, *([node.module] if node.module else [])])
    found = set()
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        found.add(submodule if submodule in modules else base)
    return found & set(modules)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The metalm modules that module `name` imports, anywhere but under TYPE_CHECKING."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for other in child.orelse:
                    visit_statement(other)
            else:
                visit_statement(child)

    def visit_statement(node: ast.AST) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.update(_imported(node, package, modules))
        visit(node)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def two_cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    return {frozenset((a, b)) for a, targets in graph.items() for b in targets if a in graph[b]}


def test_the_graph_sees_imports_everywhere():
    graph = import_graph()
    assert "metalm.models.encoder" in graph and len(graph) > 50
    assert "metalm.models.base" in graph["metalm.models.causal"]  # module level
    assert "metalm.models.onnx_runtime" in graph["metalm.models.encoder"]  # in a function
    assert "metalm.tune.tuner" in graph["metalm.tune"]  # in a function
    assert "metalm.models.encoder" not in graph["metalm.models.base"]  # TYPE_CHECKING only


def test_no_two_modules_import_each_other():
    cycles = two_cycles(import_graph())
    assert cycles == KNOWN_TWO_CYCLES, sorted(sorted(pair) for pair in cycles)


def test_no_import_circles():
    """No longer circle either (a -> b -> c -> a): the graph sorts."""
    graph = import_graph()
    for pair in KNOWN_TWO_CYCLES:
        a, b = sorted(pair)
        graph[a] = graph[a] - {b}
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"import circle: {' -> '.join(err.args[1])}")


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("metalm.models.encoder", "metalm.models.causal"),
        ("metalm.models.causal", "metalm.models.encoder"),
        ("metalm.pretrained", "metalm.runs.existing"),
        ("metalm.tune.options", "metalm.tune.study"),
    ],
)
def test_former_circles_stay_open(importer, imported):
    assert imported not in import_graph()[importer]


def test_tune_options_do_not_import_optuna():
    code = (
        "import sys\n"
        "from metalm.tune.options import TuneOptions\n"
        "TuneOptions(sampler='random', pruner='none')\n"
        "assert 'optuna' not in sys.modules, 'optuna imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
