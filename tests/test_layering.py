"""The package's import graph: no cycles, and no layer imports a layer above it.

The graph is read from the source with ``ast`` (nothing is imported), counting every import
statement, also those inside functions: a lazy import still ties the two modules together.
``from ril_fast.x import y`` counts as an import of ``ril_fast.x.y`` when that is a module, else of
``ril_fast.x``. The package ``__init__`` Python runs first for a submodule is not counted.

Layers, top to bottom (a module may import its own layer and any layer below):

    entry    the ril-fast CLI, ``python -m ril_fast``, the public names, the config-doc generator
    recipe   train.py (the training loop), rescore.py
    run      run state and resume, results, evaluation, the memory planner
    step     step.py (one batch and its loss), methods/ (distillation, the teacher copy)
    config   the typed config and its validation (it checks names against the blocks)
    blocks   sampling, lora, rewards, models, data, engine
    kernels  the fused ops, their backends and the torch reference
    support  errors, checkpoint files, reports, metric logs, metric maths, the memory tracker
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ril_fast"

LAYERS = [
    ("entry", ("ril_fast", "ril_fast.__main__", "ril_fast.cli", "ril_fast.config_doc")),
    ("recipe", ("ril_fast.train", "ril_fast.rescore")),
    ("run", ("ril_fast.run_state", "ril_fast.results", "ril_fast.evaluate", "ril_fast.memory")),
    ("step", ("ril_fast.step", "ril_fast.methods")),
    ("config", ("ril_fast.config",)),
    ("blocks", ("ril_fast.sampling", "ril_fast.lora", "ril_fast.rewards", "ril_fast.models", "ril_fast.data",
                "ril_fast.engine")),
    ("kernels", ("ril_fast.kernels",)),
    ("support", ("ril_fast.errors", "ril_fast.logs", "ril_fast.checkpoint", "ril_fast.report", "ril_fast.metrics_log",
                 "ril_fast.evaluate_metrics", "ril_fast.memory_tracker")),
]


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict) -> str | None:
    """The module ``name`` refers to: itself, or the nearest enclosing module in the package."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, modules: dict) -> set[str]:
    """Every package module ``module`` imports, at any depth of its source."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1
                package = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            resolved = _resolve(target, modules) if target.split(".")[0] == "ril_fast" else None
            if resolved and resolved != module:
                out.add(resolved)
    return out


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    modules = module_names(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, colours white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def layer_of(module: str) -> int:
    """Index in LAYERS (0 = top) of the most specific prefix that holds ``module``."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            inside = module == prefix or (prefix != "ril_fast" and module.startswith(prefix + "."))
            if inside and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise KeyError(f"{module} is in no layer: add it to LAYERS in tests/test_layering.py")
    return best


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
            for a in sorted(graph) for b in sorted(graph[a]) if layer_of(b) < layer_of(a)]


GRAPH = import_graph()


def test_the_graph_is_read():
    # guards the parser itself: edges known to exist are seen, lazy (in-function) ones included
    assert "ril_fast.step" in GRAPH["ril_fast.train"]
    assert "ril_fast.kernels.reference" in GRAPH["ril_fast.kernels"]
    assert "ril_fast.kernels.cuda_lib" in GRAPH["ril_fast.kernels"]  # imported inside _resolve
    assert "ril_fast.lora.group" in GRAPH["ril_fast.lora"]


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_has_a_layer():
    for module in GRAPH:
        layer_of(module)


def test_no_layer_imports_a_layer_above_it():
    assert upward_imports(GRAPH) == []


def test_planted_cycle_and_upward_import_are_caught():
    # a copy of the real graph with two planted defects: the checks above would fail on them
    graph = {k: set(v) for k, v in GRAPH.items()}
    graph["ril_fast.kernels.reference"].add("ril_fast.kernels")  # kernels -> reference -> kernels
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert {"ril_fast.kernels", "ril_fast.kernels.reference"} <= set(cycle)
    graph = {k: set(v) for k, v in GRAPH.items()}
    graph["ril_fast.lora.inject"].add("ril_fast.methods.teacher")
    assert upward_imports(graph) == ["ril_fast.lora.inject (blocks) imports ril_fast.methods.teacher (step)"]


@pytest.mark.parametrize("source, expected", [
    ("def f():\n    from ril_fast import lora\n", {"ril_fast.lora"}),
    ("from ril_fast.lora.inject import add_task\n", {"ril_fast.lora.inject"}),
    ("from . import group\n", {"ril_fast.lora.group"}),
    ("from .. import kernels\n", {"ril_fast.kernels"}),
    ("import torch\nimport ril_fast.lora.group as g\n", {"ril_fast.lora.group"}),
])
def test_imports_are_resolved_like_python(tmp_path, source, expected):
    (tmp_path / "ril_fast" / "lora").mkdir(parents=True)
    (tmp_path / "ril_fast" / "kernels").mkdir()
    for name in ("__init__", "lora/__init__", "lora/group", "lora/inject", "kernels/__init__"):
        (tmp_path / "ril_fast" / f"{name}.py").write_text("")
    (tmp_path / "ril_fast" / "lora" / "probe.py").write_text(source)
    assert import_graph(tmp_path / "ril_fast")["ril_fast.lora.probe"] == expected
