"""The package's imports run one way (docs/architecture.md): read every module's imports with ast and
fail on an import that goes up the drawing, or on a cycle between modules."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "maxdrop"

#: group -> the groups its modules may import (besides their own group). The drawing:
#: utils <- layers <- models <- training <- cli; data and monitoring beside; experiments below the CLI.
MAY_IMPORT = {
    "utils": set(),
    "layers": {"utils"},
    "models": {"utils", "layers"},
    "data": {"utils"},
    "monitoring": {"utils", "layers", "models", "data"},
    "training": {"utils", "layers", "models", "data", "monitoring"},
    "experiments": {"utils"},  # reads run folders, starts the CLI as a subprocess
    "callbacks": {"utils", "layers", "models", "data", "monitoring", "training"},  # re-exports for configs
    "api": {"utils", "layers"},  # maxdrop/__init__.py: the layers as maxdrop.MaxDropout, ...
    "cli": {"utils", "layers", "models", "data", "monitoring", "training", "experiments", "callbacks", "api"},
}

#: Modules that are not (yet) in the folder of their group: module -> group.
PLACED = {
    "maxdrop": "api",
    "maxdrop.__main__": "cli",
    "maxdrop.cli": "cli",
    "maxdrop.module": "training",  # re-export: maxdrop.module.ClassificationModule
    "maxdrop.callbacks": "callbacks",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def group(module: str) -> str:
    if module in PLACED:
        return PLACED[module]
    parts = module.split(".")
    assert len(parts) >= 2 and parts[1] in MAY_IMPORT, (
        f"{module} is in no group of the drawing: put it in a folder of {sorted(MAY_IMPORT)} "
        "(and say where in docs/architecture.md)"
    )
    return parts[1]


def imports(module: str) -> set[str]:
    """The maxdrop modules that ``module`` imports (anywhere in the file, TYPE_CHECKING blocks included)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            # `from pkg import sub` imports the module pkg.sub when there is one
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # `import maxdrop.x.y` counts as the deepest known module
                name = name.rpartition(".")[0]
            if name.split(".")[0] == "maxdrop" and name != module:
                found.add(name)
    return found


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_belongs_to_a_group_of_the_drawing():
    for module in MODULES:
        group(module)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Each import of ``graph`` that the drawing does not allow, as a sentence."""
    return [
        f"{m} ({group(m)}) imports {dep} ({group(dep)})"
        for m, deps in graph.items()
        for dep in sorted(deps)
        if group(dep) != group(m) and group(dep) not in MAY_IMPORT[group(m)]
    ]


def test_no_import_goes_up_the_drawing():
    upward = upward_imports(GRAPH)
    assert not upward, "imports against the drawing in docs/architecture.md:\n" + "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_modules():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_see_what_they_check():
    # The checks read real edges (a test that reads none could not fail)...
    assert "maxdrop.layers.base" in GRAPH["maxdrop.layers.max_dropout"]
    assert "maxdrop.models.slots" in GRAPH["maxdrop.monitoring.sparsity"]
    # ... and catch an upward import and a cycle where there is one.
    assert upward_imports({"maxdrop.layers.base": {"maxdrop.models.slots"}}) == [
        "maxdrop.layers.base (layers) imports maxdrop.models.slots (models)"
    ]
    assert upward_imports({"maxdrop.models.slots": {"maxdrop.module"}})
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
