"""The package's layers: every import of a qemu_mktme module goes down the order in its docstring."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import qemu_mktme


ROOT = Path(qemu_mktme.__file__).parent
# Lowest first; a module may import its own layer and any layer before it. ``errors`` is shared.
ORDER = ["errors", "compiled", "arch", "engine", "keymaterial", "host", "files", "qemu", "images", "trace", "vhost", "live", "attest", "tenant",
         "inspect", "verifier", "demo", "attack", "attend", "commands", "cli", "pytest_plugin"]
SIDEWAYS_OK: set[tuple[str, str]] = set()


def _layer(module: str) -> str:
    parts = module.split(".")
    assert parts[0] == "qemu_mktme", module
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[str]:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
            found += [n for n in names if n.startswith("qemu_mktme.")]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("qemu_mktme.")]
    return found


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
