"""The error tree: the drawing in errors.py matches the classes, and a running host's errors keep
their class on the client's side of the control socket."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

from qemu_mktme import errors
from qemu_mktme.errors import (AttachError, KeyMaterialError, KeyServiceError, MktmeError, RemoteError, SnapshotError,
                               remote_error)
from qemu_mktme.live import control
from qemu_mktme.live.session import HostSession

ROOT = Path(errors.__file__).parent
CONNECTOR = re.compile(r"^    ((?:[│ ]   )*)[├└]── (\w+)\s")


def _drawn() -> set[tuple[str, str]]:
    """(class, parent) pairs as the module docstring draws them."""
    doc = errors.__doc__ or ""
    lines = doc[doc.index("    MktmeError "):].split("\n\n")[0].splitlines()
    parents = ["MktmeError"]
    pairs = set()
    for line in lines[1:]:
        m = CONNECTOR.match(line)
        if m is None:                   # a description's second line
            continue
        depth = len(m[1]) // 4 + 1
        del parents[depth:]
        pairs.add((m[2], parents[depth - 1]))
        parents.append(m[2])
    return pairs


def _classes() -> set[tuple[str, str]]:
    pairs = set()
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, MktmeError) and cls is not MktmeError \
                and cls.__module__ == errors.__name__ and not (issubclass(cls, RemoteError) and cls is not RemoteError):
            parent = next(b for b in cls.__bases__ if issubclass(b, MktmeError))
            pairs.add((cls.__name__, parent.__name__))
    return pairs


def test_the_drawn_tree_is_the_class_tree():
    assert _drawn() == _classes()


@pytest.mark.parametrize("name, cls", [("SnapshotError", SnapshotError), ("KeyServiceError", KeyServiceError),
                                       ("KeyMaterialError", KeyMaterialError), ("ValueError", ValueError),
                                       ("OSError", OSError), ("AttackError", MktmeError)])
def test_a_remote_error_keeps_its_class(name, cls):
    err = remote_error(name, "host 1: refused")
    assert isinstance(err, cls) and isinstance(err, RemoteError) and isinstance(err, MktmeError)
    assert str(err) == "host 1: refused" and err.remote_type == name
    assert type(remote_error(name, "again")) is type(err)           # one class per remote type
    assert not isinstance(err, AttachError)                           # "the host may have died" is another thing


def test_an_unknown_remote_type_is_a_plain_remote_error():
    err = remote_error("SomethingElse", "host 1: odd")
    assert type(err) is RemoteError and str(err) == "host 1: odd" and err.remote_type == "SomethingElse"


async def test_a_refused_request_comes_back_as_its_own_class(tmp_path):
    async with HostSession([], name="errors-remote"):
        with pytest.raises(ValueError) as refused:                 # the host refuses a zero KEK
            await control.request("snapshot-save", pid=os.getpid(), path=str(tmp_path / "s"), kek="00" * 32)
        assert isinstance(refused.value, RemoteError) and not isinstance(refused.value, AttachError)
        assert "the key-encryption key is all zeros" in str(refused.value)
        with pytest.raises(ValueError, match="name the VM to save"):   # not "the host may have died"
            await control.request("snapshot-save", pid=os.getpid(), path=str(tmp_path / "s"), kek="ab" * 32)
        with pytest.raises(ValueError, match="unknown command 'nope'"):
            await control.request("nope", pid=os.getpid())
    assert not (tmp_path / "s").exists()


BROAD = {"Exception", "BaseException"}


def _names(node: ast.expr | None) -> set[str]:
    if node is None:
        return {"BaseException"}                        # a bare except
    items = node.elts if isinstance(node, ast.Tuple) else [node]
    return {n.id if isinstance(n, ast.Name) else n.attr if isinstance(n, ast.Attribute) else "" for n in items}


def _speaks(body: list[ast.stmt]) -> bool:
    """The handler re-raises, or reports: a log call, a warning, or it hands the error on."""
    for node in ast.walk(ast.Module(body=body, type_ignores=[])):
        if isinstance(node, ast.Raise):
            return True
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            if owner in ("log", "logger", "logging", "warnings") or name in (
                    "set_exception", "_end", "warn", "debug", "info", "warning", "error", "exception", "critical",
                    "_note", "note", "say"):
                return True
        if isinstance(node, ast.Assign | ast.Return) and any(isinstance(n, ast.Name) and n.id == "err"
                                                             for n in ast.walk(node)):
            return True                                 # kept to be raised or reported later
    return False


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_silent_broad_except_or_suppress(path):
    """A broad ``except`` re-raises, logs, or keeps the error; ``suppress`` names what it expects."""
    silent = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ExceptHandler) and _names(node.type) & BROAD and not _speaks(node.body):
            silent.append(f"line {node.lineno}: except {' '.join(sorted(_names(node.type)))}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "suppress" \
                and any(_names(a) & BROAD for a in node.args):
            silent.append(f"line {node.lineno}: suppress of {' '.join(sorted(set().union(*map(_names, node.args))))}")
    assert silent == [], f"{path.relative_to(ROOT)}: {silent}"
