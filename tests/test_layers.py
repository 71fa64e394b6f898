"""The package's layers: every import of a qemu_mktme module goes down the order in its docstring;
no import circle inside a layer; no module imports another module's private name; files/ stands
beside the host model, not on it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import qemu_mktme


ROOT = Path(qemu_mktme.__file__).parent
# Lowest first; a module may import its own layer and any layer before it. ``errors`` is shared.
ORDER = ["errors", "compiled", "arch", "engine", "keymaterial", "host", "files", "qemu", "images", "trace", "vhost", "live",
         "attest", "tenant", "virt", "inspect", "verifier", "demo", "attack", "attend", "commands", "cli", "pytest_plugin"]
SIDEWAYS_OK: set[tuple[str, str]] = set()
# Below in the order, and still not to be imported: what a dump or snapshot file holds is described
# structurally (files.dumpfile.DumpSource), so the formats stay usable without the host model.
FORBIDDEN = {("files", "host")}


def _layer(module: str) -> str:
    parts = module.split(".")
    assert parts[0] == "qemu_mktme", module
    return parts[1] if len(parts) > 1 else "__init__"


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _import_nodes(path: Path) -> list[tuple[str, ast.ImportFrom | ast.Import]]:
    """(module imported, the statement) for each qemu_mktme import in ``path``, wherever it is."""
    rel = path.relative_to(ROOT.parent).with_suffix("")
    package = list(rel.parts[:-1])
    found: list[tuple[str, ast.ImportFrom | ast.Import]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
            found += [(n, node) for n in names if n.startswith("qemu_mktme.")]
        elif isinstance(node, ast.Import):
            found += [(a.name, node) for a in node.names if a.name.startswith("qemu_mktme.")]
    return found


def _imports(path: Path) -> list[str]:
    return [name for name, _ in _import_nodes(path)]


MODULES = {_module(p): p for p in ROOT.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The module a dotted import names (``pkg.mod`` or ``pkg.mod.attr`` -> ``pkg.mod``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def test_the_tree_has_exactly_the_documented_layers():
    present = {p.stem for p in ROOT.iterdir() if (p.suffix == ".py" or (p / "__init__.py").exists())}
    assert present - {"__init__"} == set(ORDER)
    doc = qemu_mktme.__doc__
    for name in ORDER[2:14]:
        assert f"    {name}" in doc, f"the package docstring does not draw layer {name}"


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_only_go_down(path: Path):
    own = _layer(".".join(path.relative_to(ROOT.parent).with_suffix("").parts))
    if own == "__init__":
        return
    for target in _imports(path):
        other = _layer(target)
        if other in ("__init__", own) or (own, other) in SIDEWAYS_OK:
            continue
        assert ORDER.index(other) < ORDER.index(own), f"{path.relative_to(ROOT)} imports {target}: upward"


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_forbidden_layer_is_imported(path: Path):
    own = _layer(_module(path))
    for target in _imports(path):
        assert (own, _layer(target)) not in FORBIDDEN, f"{path.relative_to(ROOT)} imports {target}"


def test_no_import_circle_inside_a_layer():
    """Module-level imports between modules (function-local imports count too: a circle broken by
    a local import is still a circle)."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, _ in _import_nodes(path):
            resolved = _resolve(target)
            if resolved and resolved != name and _layer(resolved) == _layer(name) \
                    and not name.startswith(resolved + "."):         # a package's own __init__ is not an edge
                graph[name].add(resolved)
    # Tarjan's strongly connected components: any with more than one module is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert circles == [], f"import circles: {circles}"


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_name_crosses_modules(path: Path):
    """``from .other import _name`` reaches into another module's private parts: make it public
    (or move it where it belongs). A package's ``__init__`` may be imported from its own modules."""
    own = _module(path)
    for target, node in _import_nodes(path):
        if not isinstance(node, ast.ImportFrom) or _resolve(target) in (None, own):
            continue
        private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
        assert not private, f"{path.relative_to(ROOT)} imports private {', '.join(private)} from {target}"
