"""The layering of src/tvq, kept by a test: no import cycle and no import from a higher layer.

Layers, from the bottom: config, state, data and the small leaf modules; ops (kernels); layers; models;
training, bench, hf (and the package's own ``tvq/__init__``, the public API); cli. Every import counts,
the ones inside functions too (a lazy import is a dependency all the same).
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS = {
    "tvq.config": 0, "tvq.state": 0, "tvq.data": 0, "tvq.runtime": 0, "tvq.sampling": 0, "tvq.usage": 0,
    "tvq.overrides": 0, "tvq.schedule": 0, "tvq.files": 0,
    "tvq.ops": 1,
    "tvq.layers": 2,
    "tvq.models": 3, "tvq.parallel": 3,
    "tvq.training": 4, "tvq.bench": 4, "tvq.hf": 4, "tvq": 4,
    "tvq.cli": 5, "tvq.__main__": 5,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / "tvq").rglob("*.py"))}


def layer(name: str) -> int:
    """The layer of a module: that of its longest listed prefix."""
    while name not in LAYERS:
        if "." not in name:
            raise AssertionError(f"{name} is in no layer: add it to LAYERS")
        name = name.rsplit(".", 1)[0]
    return LAYERS[name]


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The tvq modules ``name`` imports (``from tvq.x import y`` counts as tvq.x.y when that is a module)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in found if m == "tvq" or m.startswith("tvq.")} - {name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_is_in_a_layer(graph):
    for name in graph:
        layer(name)


def test_no_import_from_a_higher_layer(graph):
    upward = sorted(f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
                    for a, deps in graph.items() for b in deps if layer(b) > layer(a))
    assert not upward, "\n".join(upward)


def test_no_import_cycle(graph):
    """Depth-first search over the module graph; a package's ``__init__`` re-exporting its own submodules is
    an edge like any other."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph.get(name, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep in graph and dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_violations():
    """The checks above can fail: a made-up upward import and a made-up cycle are caught."""
    assert layer("tvq.ops.cache") < layer("tvq.layers.attention") < layer("tvq.cli")
    fake = {"tvq.ops.a": {"tvq.ops.b"}, "tvq.ops.b": {"tvq.ops.a"}}
    with pytest.raises(AssertionError, match="tvq.ops.a -> tvq.ops.b -> tvq.ops.a"):
        test_no_import_cycle(fake)
    with pytest.raises(AssertionError, match="imports tvq.cli"):
        test_no_import_from_a_higher_layer({"tvq.ops.a": {"tvq.cli"}})
