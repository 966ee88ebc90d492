"""The package's layering: every import points down (or sideways within a layer), and no import cycle exists,
function-level and ``TYPE_CHECKING`` imports included (a cycle hidden behind a function-level import is still one)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_tricks"

# Low to high. A module may import its own layer and the ones before it. A new module must be placed here.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("functional: the math, plain PyTorch", ("functional",)),
    ("core: helpers without our callbacks", ("_compat", "_sharding", "_sharded_state", "_io", "weights", "lrs", "peers",
                                            "groups", "init", "drop_path", "diagnosis", "ensemble")),
    ("the trick-callback contract", ("trick",)),
    ("the mixin", ("mixin",)),
    ("tuning procedures", ("tuning", "tuning.overfit", "tuning.lr_curve", "tuning.lr_sweep", "tuning.space",
                           "tuning.search_outputs")),
    ("callbacks", ("callbacks",)),
    ("assemblies: recipes, search, demo, command line", ("recipes", "tuning.search", "demo", "cli", "__main__", "")),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    """The layer of ``module`` (relative to the package: ``callbacks.ema``; ``""`` is the package itself): the
    longest matching prefix wins."""
    best, depth = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix != "" and module.startswith(prefix + "."))
            if matches and len(prefix) > depth:
                best, depth = i, len(prefix)
    return best


def _imports(path: Path) -> set[str]:
    """The package modules ``path`` imports (relative names), anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name == "lightning_tricks" or name.startswith("lightning_tricks."):
                found.add(name.removeprefix("lightning_tricks").removeprefix("."))
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        # `from lightning_tricks.callbacks import EMA` names a module or a name in one: keep the modules
        graph[name] = {m for m in _imports(path) if m in files and m != name}
    return graph


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(m for m in _graph() if _layer(m) < 0)
    assert not unplaced, f"place these modules in LAYERS: {unplaced}"


def test_imports_point_down() -> None:
    graph = _graph()
    assert len(graph) > 40  # the walk found the package
    upward = [f"{m or 'lightning_tricks'} ({LAYERS[_layer(m)][0]}) imports {t or 'lightning_tricks'} "
              f"({LAYERS[_layer(t)][0]})" for m, targets in graph.items() for t in targets if _layer(t) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize(("module", "expected"), [("callbacks.ema", "callbacks"), ("tuning.search", "assemblies"),
                                                  ("tuning.lr_sweep", "tuning"), ("functional.targets", "functional"),
                                                  ("", "assemblies")])
def test_the_layer_map_itself(module: str, expected: str) -> None:
    assert LAYERS[_layer(module)][0].startswith(expected)


def test_the_walk_sees_function_level_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from lightning_tricks.mixin import TricksMixin\n")
    assert {"mixin", "mixin.TricksMixin"} == _imports(source)
