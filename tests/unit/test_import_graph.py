"""The packages' import graph, read from the source (no import runs): no cycle among the modules'
import-time imports, and every import, lazy ones included, goes down the layers of DESIGN.md —
the orchestrator drives trainers and evaluation, evaluation may use the trainers' model code, and
inside trainers the TR-DPO math, the data, the model and the run state sit below the loop."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("orchestrator", "trainers", "evaluation")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, known: set[str], *, import_time_only: bool) -> set[str]:
    """The project modules ``name`` imports. ``from pkg import sub`` names the submodule ``pkg.sub``
    where one exists (the parent package is already being imported then, so it adds no edge)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(statements) -> None:
        for node in statements:
            if isinstance(node, ast.If) and _is_type_checking(node):
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and import_time_only:
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name.split(".")[0] in PACKAGES)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                if base.split(".")[0] not in PACKAGES:
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in known else base)
            visit(ast.iter_child_nodes(node))

    visit(tree.body)
    found.discard(name)
    return {m for m in found if m in known}


def graph(*, import_time_only: bool) -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(name, path, known, import_time_only=import_time_only) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(edges.get(node, ())):
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return components


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_resolves_submodules_and_relative_imports(tmp_path):
    known = {"trainers.data", "trainers.data.loading", "trainers.data.token_cache", "trainers.config"}
    source = tmp_path / "loading.py"
    source.write_text("from trainers.data import token_cache\nfrom .. import config\n"
                      "def lazy():\n    import orchestrator.cli\n")
    eager = imports_of("trainers.data.loading", source, known, import_time_only=True)
    assert eager == {"trainers.data.token_cache", "trainers.config"}


def test_no_import_cycle_at_import_time():
    found = cycles(graph(import_time_only=True))
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


LOOP = ("trainers.loop", "trainers.sessions", "trainers.entrypoints", "trainers.validation", "trainers.optimizer",
        "trainers.step_metrics", "trainers.fsdp_check")

# (importer, what it must never reach, why)
LAYERS = [
    ("trainers", ("orchestrator", "evaluation"), "trainers run inside workers and know nothing of the driver"),
    ("evaluation", ("orchestrator",), "the evaluation pool is driven, it does not drive"),
    ("trainers.trdpo", ("trainers",), "the TR-DPO math is pure torch"),
    ("trainers.data", ("trainers.model",) + LOOP, "the data sits below the model and the loop"),
    ("trainers.model", LOOP, "the model sits below the loop"),
    ("trainers.state.storage", ("trainers.data", "trainers.model") + LOOP, "the storage is paths and bytes"),
    ("trainers.state", LOOP, "the run state sits below the loop"),
]


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("importer, forbidden, why", LAYERS, ids=[layer[0] for layer in LAYERS])
def test_imports_go_down_the_layers(importer, forbidden, why):
    wrong = sorted(
        f"{source} imports {target}"
        for source, targets in graph(import_time_only=False).items() if within(source, importer)
        for target in targets
        if any(within(target, f) for f in forbidden) and not within(target, importer)
    )
    assert not wrong, f"{why}: " + "; ".join(wrong)
