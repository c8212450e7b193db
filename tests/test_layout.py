"""The layout's contracts: the bundle is the app alone, layers import downwards, no cycles.

Layers, bottom to top (docs/architecture.md): the app (`server_app.py`, `client_app.py`,
`federa_app`), the harness (`simulation`), the operator's tools (`federa_ops`); `benchmarks`,
`deploy` and `tests` sit on top and nothing imports them.
"""

from __future__ import annotations

import ast
import io
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from federa_ops.runtime import stage_app

ROOT = Path(__file__).resolve().parent.parent
APP_FILES = ("server_app", "client_app")
# What each layer may import, besides itself (third-party packages are not checked).
LAYERS = {
    "app": set(),
    "simulation": {"app"},
    "federa_ops": {"app", "simulation"},
}
TOPS = ("federa_app", "federa_ops", "simulation", "benchmarks", "deploy", *APP_FILES)


def layer(module: str) -> str:
    """The layer a module of this project belongs to."""
    top = module.split(".")[0]
    return "app" if top in ("federa_app", *APP_FILES) else top


def project_modules(root: Path) -> dict[str, Path]:
    """Every module of the project under `root`, by dotted name (packages by their __init__)."""
    modules = {}
    paths = [root / f"{top}.py" for top in TOPS] + [
        p for top in TOPS for p in (root / top).rglob("*.py")
    ]
    for path in sorted(p for p in paths if p.is_file()):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules a module imports anywhere in it (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package upwards
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod when there is one.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]  # fmt: skip
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c`: the deepest known module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    modules = project_modules(root)
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports that go upwards or sideways between layers, as 'a -> b' lines."""
    bad = []
    for module, targets in sorted(graph.items()):
        allowed = LAYERS.get(layer(module))
        if allowed is None:  # a top layer (benchmarks, deploy): may import anything below it
            continue
        bad += [f"{module} -> {t}" for t in sorted(targets)
                if layer(t) != layer(module) and layer(t) not in allowed]  # fmt: skip
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm).

    Written out because the standard library has only graphlib, which reports one cycle and
    stops; the test wants every one of them named.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def closure(graph: dict[str, set[str]], start: list[str]) -> set[str]:
    """Every module reachable from `start` through imports, `start` included."""
    seen, todo = set(), list(start)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph.get(module, ()))
    return seen


def with_parent_packages(modules: set[str]) -> set[str]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py too."""
    out = set(modules)
    for module in modules:
        parts = module.split(".")
        out |= {".".join(parts[:i]) for i in range(1, len(parts))}
    return out


@pytest.fixture(scope="module")
def fab_bytes() -> bytes:
    """The bundle Flower builds from the checkout (it walks every file, .venv included: ~5 s)."""
    return build_fab_from_disk(ROOT)


def test_the_bundle_holds_the_two_apps_and_exactly_the_modules_they_import(fab_bytes):
    graph = import_graph(ROOT)
    needed = with_parent_packages(closure(graph, list(APP_FILES)))
    modules = project_modules(ROOT)
    expected = {str(modules[m].relative_to(ROOT)) for m in needed} | {"pyproject.toml"}

    fab = zipfile.ZipFile(io.BytesIO(fab_bytes))
    shipped = {name for name in fab.namelist() if not name.startswith(".info/")}

    assert shipped - expected == set(), "in the bundle but imported by neither app"
    assert expected - shipped == set(), "imported by an app but missing from the bundle"
    assert all(layer(m) == "app" for m in needed)


def test_flwr_run_gets_a_staged_copy_that_builds_the_same_bundle(fab_bytes, tmp_path):
    """`federa simulate` and `federa deploy` hand `flwr run` a copy of the bundle's files, so
    that Flower does not walk the checkout: the bundle built from it is the same, byte for byte."""
    staged = stage_app(ROOT, tmp_path / "app")
    assert build_fab_from_disk(staged) == fab_bytes
    assert sorted(p.name for p in staged.iterdir()) == [
        "client_app.py", "federa_app", "pyproject.toml", "server_app.py"
    ]  # fmt: skip


def test_the_app_imports_neither_the_operators_tools_nor_the_harness_and_layers_go_down():
    assert layer_violations(import_graph(ROOT)) == []


def test_no_module_imports_itself_back_through_others():
    assert cycles(import_graph(ROOT)) == []


def test_the_app_groups_depend_on_each_other_without_a_cycle():
    groups: dict[str, set[str]] = {}
    for module, targets in import_graph(ROOT).items():
        if module.startswith("federa_app."):
            group = module.split(".")[1]
            groups.setdefault(group, set()).update(
                t.split(".")[1] for t in targets if t.startswith("federa_app.")
            )
    for group in groups:
        groups[group].discard(group)
    assert set(groups) >= {"method", "data", "federation", "records", "config", "errors"}
    assert cycles(groups) == []


@pytest.fixture
def bad_tree(tmp_path: Path) -> Path:
    """A small tree with one cycle in the app and one import of the operator's tools."""
    files = {
        "federa_app/__init__.py": "",
        "federa_app/a.py": "from federa_app import b\n",
        "federa_app/b.py": "def f():\n    from federa_app.a import x\n",
        "federa_app/c.py": "from federa_ops.cli import main\n",
        "federa_ops/__init__.py": "",
        "federa_ops/cli.py": "from simulation import compare\nfrom federa_app import c\n",
        "simulation/__init__.py": "",
        "simulation/compare.py": "import federa_ops.cli\n",
        "server_app.py": "from federa_app.a import x\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_the_checks_find_a_cycle_an_upward_import_and_a_lazy_import(bad_tree: Path):
    graph = import_graph(bad_tree)
    assert graph["federa_app.b"] == {"federa_app.a"}  # an import inside a function counts
    assert cycles(graph) == [
        ["federa_app.a", "federa_app.b"],
        ["federa_app.c", "federa_ops.cli", "simulation.compare"],
    ]
    assert layer_violations(graph) == [
        "federa_app.c -> federa_ops.cli",
        "simulation.compare -> federa_ops.cli",
    ]
    assert closure(graph, ["server_app"]) == {"server_app", "federa_app.a", "federa_app.b"}
