"""Every import inside lorakit points down the layer order of docs/ARCHITECTURE.md, and none forms a cycle.

Module-level and function-local imports count; imports under ``if TYPE_CHECKING:`` do not (they never run).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import lorakit

PACKAGE = Path(lorakit.__file__).parent

LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "config"),
    ("core",),
    ("io", "models", "data", "parallel"),
    ("init", "methods", "optim", "regularizers", "quant", "pruning", "mixtures", "combine", "analysis"),
    ("train", "eval"),
    ("serve",),
    ("jobs",),
    ("demos",),
    ("cli",),
    ("", "__main__"),  # the package itself: the public API re-exports from every layer
)
"""Bottom to top; a module may import from its own layer or any layer below it."""


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["lorakit", *parts])


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for index, members in enumerate(LAYERS):
        if top in members:
            return index
    raise AssertionError(f"{module} belongs to no layer of LAYERS: add its package to the order")


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).split(".")[-1] == "TYPE_CHECKING":
            for statement in node.body:
                skipped.update(id(n) for n in ast.walk(statement))
    return skipped


def _resolve(name: str, modules: dict[str, Path]) -> str:
    while name not in modules:
        name = name.rpartition(".")[0]
    return name


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = _type_checking_nodes(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "lorakit" or target.startswith("lorakit."):
                resolved = _resolve(target, modules)
                if resolved != module:
                    found.append(Import(module, resolved, node.lineno))
    return found


def all_imports() -> list[Import]:
    modules = all_modules()
    return [imp for module, path in sorted(modules.items()) for imp in imports_of(module, path, modules)]


def _cycle(edges: dict[str, list[Import]]) -> list[Import] | None:
    """One import cycle, as the imports that form it, or None."""
    state: dict[str, int] = {}
    trail: list[Import] = []

    def visit(module: str) -> list[Import] | None:
        state[module] = 1
        for imp in edges.get(module, []):
            if state.get(imp.target) == 1:
                start = next(i for i, step in enumerate(trail) if step.source == imp.target)
                return [*trail[start:], imp]
            if imp.target not in state:
                trail.append(imp)
                found = visit(imp.target)
                if found:
                    return found
                trail.pop()
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


def describe(imp: Import) -> str:
    return f"{imp.source} (line {imp.line}) imports {imp.target}"


def test_every_module_belongs_to_a_layer():
    for module in all_modules():
        layer_of(module)


def test_no_import_points_up_the_layer_order():
    upward = [imp for imp in all_imports() if layer_of(imp.target) > layer_of(imp.source)]
    assert not upward, "imports that point up the layer order:\n" + "\n".join(describe(i) for i in upward)


def test_no_import_cycles():
    edges: dict[str, list[Import]] = {}
    for imp in all_imports():
        edges.setdefault(imp.source, []).append(imp)
    cycle = _cycle(edges)
    assert cycle is None, "an import cycle:\n" + "\n".join(describe(i) for i in cycle)


def test_the_checker_sees_function_local_imports_and_skips_type_checking(tmp_path):
    fake = tmp_path / "layer.py"
    fake.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lorakit.cli import main\n"
                    "def f():\n    from lorakit.jobs.finetune import finetune\n")
    found = imports_of("lorakit.core.layer", fake, all_modules())
    assert found == [Import("lorakit.core.layer", "lorakit.jobs.finetune", 5)]
    assert layer_of("lorakit.jobs.finetune") > layer_of("lorakit.core.layer")


def test_the_cycle_finder_names_each_import():
    a_b, b_a = Import("lorakit.a", "lorakit.b", 3), Import("lorakit.b", "lorakit.a", 7)
    assert _cycle({"lorakit.a": [a_b], "lorakit.b": [b_a]}) == [a_b, b_a]
    assert _cycle({"lorakit.a": [a_b]}) is None


def test_a_cycle_through_three_modules_is_reported_from_where_it_closes():
    a_b, b_c, c_b = (Import("lorakit.a", "lorakit.b", 1), Import("lorakit.b", "lorakit.c", 2),
                     Import("lorakit.c", "lorakit.b", 3))
    assert _cycle({"lorakit.a": [a_b], "lorakit.b": [b_c], "lorakit.c": [c_b]}) == [b_c, c_b]


FAMILY_MODULES = {"config", "model", "storage"}
"""Names that several sibling packages use for the same part of their own family (each mixture's config,
model and storage); any other name means one concept, so it lives in one module."""


def test_no_two_modules_share_a_name_across_packages():
    by_name: dict[str, list[str]] = {}
    for module in all_modules():
        name = module.rpartition(".")[2]
        if PACKAGE.joinpath(*module.split(".")[1:], "__init__.py").is_file() or name in FAMILY_MODULES:
            continue  # a package, or a family module
        by_name.setdefault(name, []).append(module)
    shared = {name: modules for name, modules in by_name.items() if len(modules) > 1}
    assert not shared, f"modules that share a name: {shared}"
