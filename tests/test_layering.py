"""Which package may import which, read from the source (AST) of every module of ours.

`cache_schema` imports nothing of ours; `extract` and `distill` import only `cache_schema` (and themselves); inside
`extract/` a module imports only from the layers below its own (`EXTRACT_LAYERS`); and no two modules of ours
import each other, directly or round a circle, neither when they are imported (module-level imports) nor at all (a
function-level import that closes a circle, as `datasets/dataset.py` <-> `datasets/synthetic.py` once did). The
last test runs the checks on a small package with one violation of each kind.
"""
from __future__ import annotations

import ast
import functools
import gc
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cache_schema", "extract", "distill", "pipelines")
MAY_IMPORT = {"cache_schema": (), "extract": ("cache_schema",), "distill": ("cache_schema",)}  # besides themselves
# Lowest first. A module imports from a lower layer, or from its own group (the longest prefix it has here); the
# groups of one layer are independent. `extract` is the top: preflight and the runner.
EXTRACT_LAYERS = (
    ("extract.hub",),                      # where weights come from and what the hub resolved
    ("extract.loading",),                  # strict loading, seeded tiny models
    ("extract.convert",),                  # published checkpoints -> transformers directories
    ("extract.families", "extract.weights"),   # rows from a loaded agent; downloading and converting checkpoints
    ("extract.agents",),                   # the agent registry, one module per agent
    ("extract",),
)


@dataclass(frozen=True)
class Import:
    source: str        # the importing module
    target: str        # the imported module of ours
    where: str         # file:line
    module_level: bool  # runs when `source` is imported (not inside a function)


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_files(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    return {module_name(root, path): path for package in packages for path in sorted((root / package).rglob("*.py"))}


@functools.lru_cache(maxsize=None)
def imports(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> tuple[Import, ...]:
    """Every import of one of our modules by one of our modules."""
    files = module_files(root, packages)
    found = []
    gc.disable()   # syntax trees are many small objects and no cycles: the collector would triple the time
    try:
        for source, path in files.items():
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            is_package = path.name == "__init__.py"
            for node, module_level in _import_nodes(tree):
                for target in _targets(node, source, is_package, files):
                    if target.split(".")[0] in packages:
                        found.append(Import(source, target, f"{path.relative_to(root)}:{node.lineno}", module_level))
    finally:
        gc.enable()
    return tuple(found)


def _import_nodes(tree: ast.AST):
    """(import node, whether it runs at module level). Imports are statements, and statements sit only in the
    bodies of statements, `except` handlers and `case` blocks, so only those are walked."""
    stack = [(tree, True)]
    while stack:
        node, module_level = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, module_level
            elif isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
                stack.append((child, module_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))))


def _targets(node, source: str, is_package: bool, modules) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:   # relative: from the package of `source`
        package = source.split(".") if is_package else source.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module
    # `from a import b` imports the module a.b when there is one, else a name defined in a
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]


def package_violations(found) -> list[str]:
    return [f"{i.where}: {i.source} imports {i.target}" for i in found
            if i.source.split(".")[0] in MAY_IMPORT
            and i.target.split(".")[0] not in (i.source.split(".")[0], *MAY_IMPORT[i.source.split(".")[0]])]


def layer_of(module: str, layers=EXTRACT_LAYERS) -> tuple[int, str]:
    """(layer index, group) of an extract module: the longest group name that is the module or a package of it."""
    matches = [(len(group), index, group) for index, groups in enumerate(layers) for group in groups
               if module == group or module.startswith(group + ".")]
    _, index, group = max(matches)
    return index, group


def layer_violations(found, layers=EXTRACT_LAYERS) -> list[str]:
    problems = []
    for i in found:
        if i.source.split(".")[0] != "extract" or i.target.split(".")[0] != "extract":
            continue
        (source_layer, source_group), (target_layer, target_group) = layer_of(i.source, layers), layer_of(i.target,
                                                                                                          layers)
        if source_group != target_group and target_layer >= source_layer:
            problems.append(f"{i.where}: {i.source} (layer {source_layer}) imports {i.target} (layer "
                            f"{target_layer})")
    return problems


def cycles(found, module_level: bool = True) -> list[list[str]]:
    """The strongly connected components (more than one module, or a module importing itself) of the import graph
    (Tarjan): of module-level imports, or of all imports."""
    graph: dict[str, set[str]] = {}
    for i in found:
        if i.module_level or not module_level:
            graph.setdefault(i.source, set()).add(i.target)
            graph.setdefault(i.target, set())
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
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
            if len(component) > 1 or node in graph[node]:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


# ---------------------------------------------------------------------------------------------------------------

def test_cache_schema_extract_and_distill_import_only_what_they_may():
    assert package_violations(imports()) == []


def test_extract_imports_only_from_lower_layers():
    assert layer_violations(imports()) == []


def test_no_import_cycle_among_our_modules():
    assert cycles(imports()) == []


def test_no_import_cycle_even_through_function_level_imports():
    assert cycles(imports(), module_level=False) == []


def test_every_layer_group_is_a_module():
    modules = module_files()
    assert [group for groups in EXTRACT_LAYERS for group in groups if group not in modules] == []


def test_the_checks_catch_each_kind_of_violation():
    files = {
        "cache_schema/__init__.py": "",
        "cache_schema/store.py": "from extract import weights\n",                  # cache_schema -> extract
        "extract/__init__.py": "",
        "extract/hub.py": "def commit():\n    from extract.agents import spec\n",  # up, from a function
        "extract/weights.py": "from extract.families import rows\n",              # across its own layer
        "extract/families/__init__.py": "from . import rows\n",
        "extract/families/rows.py": "",
        "extract/agents/__init__.py": "from .spec import AgentSpec\n",
        "extract/agents/spec.py": "from ..hub import commit\n",                    # down, allowed; closes a circle
        "distill/__init__.py": "def run():\n    import pipelines.cli\n",          # distill -> pipelines
        "pipelines/__init__.py": "",
        "pipelines/a.py": "import pipelines.b\n",
        "pipelines/b.py": "from pipelines import a\n",                              # a circle at import time
    }
    with tempfile.TemporaryDirectory() as directory:   # not tmp_path: its first use sweeps old pytest runs
        root = Path(directory)
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
        found = imports(root, PACKAGES)
    assert package_violations(found) == ["cache_schema/store.py:1: cache_schema.store imports extract.weights",
                                         "distill/__init__.py:2: distill imports pipelines.cli"]
    assert layer_violations(found) == [
        "extract/hub.py:2: extract.hub (layer 0) imports extract.agents.spec (layer 4)",
        "extract/weights.py:1: extract.weights (layer 3) imports extract.families.rows (layer 3)"]
    assert cycles(found) == [["pipelines.a", "pipelines.b"]]
    assert cycles(found, module_level=False) == [["extract.agents.spec", "extract.hub"], ["pipelines.a", "pipelines.b"]]
