"""The import graph of `metalm`: no two modules import each other (nor, today, any longer
circle), and the plain tuning options do not import Optuna.

The graph is read from the source with `ast` (nothing is imported): an edge for each
import of a metalm module, at module level or inside a function, but not under
`if TYPE_CHECKING:` (annotations only). `from package import name` is an edge to the
submodule `package.name` when there is one, else to the package.
"""

from __future__ import annotations

import ast
import functools
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


@functools.cache
def _parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def _import_statements(path: Path, module_level: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements of a module, but those under `if TYPE_CHECKING:`; with
    `module_level`, only those run on import (none inside a function)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for other in child.orelse:
                    visit_statement(other)
            elif not (module_level and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)):
                visit_statement(child)

    def visit_statement(node: ast.AST) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        visit(node)

    visit(_parsed(path))
    return found


def imports_of(
    name: str, path: Path, modules: dict[str, Path], module_level: bool = False
) -> set[str]:
    """The metalm modules that module `name` imports, anywhere (or, with `module_level`,
    on import) but under TYPE_CHECKING."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _import_statements(path, module_level):
        found.update(_imported(node, package, modules))
    return found - {name}


def outside_imports(path: Path) -> set[str]:
    """The top-level names of the other packages a module imports on import."""
    names = set()
    for node in _import_statements(path, module_level=True):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names - {"metalm"}


@functools.cache
def _graph(module_level: bool) -> dict[str, frozenset[str]]:
    modules = module_files()
    return {
        name: frozenset(imports_of(name, path, modules, module_level))
        for name, path in modules.items()
    }


def import_graph(module_level: bool = False) -> dict[str, set[str]]:
    """Module -> the metalm modules it imports (a fresh copy: callers may edit it)."""
    return {name: set(targets) for name, targets in _graph(module_level).items()}


def loaded_on_import(name: str) -> set[str]:
    """The metalm modules that `import name` runs: its packages, what they import on
    import, and so on."""
    graph = import_graph(module_level=True)
    loaded: set[str] = set()
    todo = [name]
    while todo:
        module = todo.pop()
        if module in loaded:
            continue
        loaded.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # its packages
        todo += graph[module]
    return loaded


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


def test_the_module_level_graph_leaves_out_function_imports():
    graph = import_graph(module_level=True)
    assert "metalm.models.base" in graph["metalm.models.causal"]  # module level
    assert "metalm.models.onnx_runtime" not in graph["metalm.models.encoder"]  # in a function
    assert "optuna" in outside_imports(module_files()["metalm.tune.study"])


def test_tune_options_do_not_import_optuna_on_import():
    """Read from the source: nothing `import metalm.tune.options` runs imports Optuna
    (the subprocess test below imports it for real)."""
    modules = module_files()
    loaded = loaded_on_import("metalm.tune.options")
    assert {"metalm", "metalm.tune", "metalm.tune.options"} <= loaded
    importers = sorted(m for m in loaded if "optuna" in outside_imports(modules[m]))
    assert not importers, f"these import optuna on import: {importers}"


@pytest.mark.slow
def test_tune_options_do_not_import_optuna():
    code = (
        "import sys\n"
        "from metalm.tune.options import TuneOptions\n"
        "TuneOptions(sampler='random', pruner='none')\n"
        "assert 'optuna' not in sys.modules, 'optuna imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
