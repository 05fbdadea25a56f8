"""The tree shows the architecture (docs/architecture.md): imports go one way, each concept is defined once, modules
and functions stay small enough to read. Checked on the source, by parsing it."""

from __future__ import annotations

import ast
import collections
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "attnprune"

# Lowest first: a module may import modules of its own layer or of a lower one, never of a higher one.
LAYERS = [
    [
        "attnprune.errors",
        "attnprune.atomic",
        "attnprune.timing",
        "attnprune.fidelity",
        "attnprune.paradigms",
        "attnprune.strict_yaml",
        "attnprune.hub",
    ],
    ["attnprune.scoring", "attnprune.reduction", "attnprune.fused"],
    ["attnprune.routing"],
    ["attnprune.vit", "attnprune.blocks"],
    ["attnprune.flops", "attnprune.inference", "attnprune.io", "attnprune.adapters", "attnprune.routing.baselines"],
    ["attnprune.selectivity", "attnprune.report"],
    ["attnprune.search", "attnprune.pretrain"],
    ["attnprune"],
    ["attnprune.lit"],
    ["attnprune.cli"],
]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
MAX_POSITIONAL = 8
# names defined in several modules on purpose: each command's entry points; the lean CUDA reducers mirror the
# reference ones they must equal (attnprune.fused)
SHARED_NAMES = {"main", "run", "drop", "fuse", "merge"}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports() -> dict[str, set[str]]:
    """Every module's imports of attnprune modules (function-level imports included)."""
    known = modules()

    def resolve(name: str) -> str:
        while name not in known:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "attnprune":
                targets |= {resolve(f"{node.module}.{alias.name}") for alias in node.names}
            elif isinstance(node, ast.Import):
                targets |= {resolve(a.name) for a in node.names if a.name.split(".")[0] == "attnprune"}
        graph[name] = targets - {name}
    return graph


def layer(module: str) -> int:
    """The layer of the most specific prefix naming ``module``."""
    best = max(
        (prefix for group in LAYERS for prefix in group if module == prefix or module.startswith(prefix + ".")),
        key=len,
    )
    return next(i for i, group in enumerate(LAYERS) if best in group)


def test_every_module_has_a_layer():
    for name in modules():
        assert 0 <= layer(name) < len(LAYERS), name


def test_nothing_imports_upward():
    upward = [
        f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
        for module, targets in imports().items()
        for target in targets
        if layer(target) > layer(module)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_loop():
    graph, state, path = imports(), {}, []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                raise AssertionError("import loop: " + " -> ".join(path[path.index(target) :] + [target]))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_search_strategies_do_not_import_each_other():
    strategies = {"attnprune.search.beam", "attnprune.search.transition", "attnprune.search.label_free"}
    for module, targets in imports().items():
        if module in strategies:
            assert not targets & strategies, f"{module} imports {targets & strategies}"


def test_each_concept_is_defined_once():
    """No two library modules define a function or class of the same name (one definition of each concept)."""
    places = collections.defaultdict(list)
    for name, path in modules().items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name not in SHARED_NAMES:
                places[node.name].append(name)
    twice = {name: where for name, where in places.items() if len(where) > 1}
    assert not twice, twice


@pytest.mark.parametrize("pattern", ["sys.path.insert", "sys.path.append", "syspath_prepend"])
def test_no_sys_path_edits(pattern):
    paths = [
        *ROOT.glob("*.py"),
        *(p for folder in ("attnprune", "benchmarks", "scripts", "tests") for p in (ROOT / folder).rglob("*.py")),
    ]
    offenders = [str(p.relative_to(ROOT)) for p in paths if p.name != Path(__file__).name and pattern in p.read_text()]
    assert not offenders, offenders


def test_modules_and_functions_stay_small():
    too_long, too_many = [], []
    for name, path in modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                too_long.append(f"{name}.{node.name}: {length} lines")
            positional = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
            if not node.name.startswith("_") and len(positional) > MAX_POSITIONAL:
                too_many.append(f"{name}.{node.name}: {len(positional)} positional parameters")
    assert not too_long, too_long
    assert not too_many, too_many
