"""The suite itself: pure tests stay pure, waits scale, a shared fixture fails once, a long trial
keeps a bounded form."""

from __future__ import annotations

import pytest

from helpers import patience, time_scale

pytest_plugins = ["pytester"]

# Directories and modules that must never need QEMU or the guest images.
PURE = ("tests/arch/", "tests/engine/", "tests/host/test_keys.py", "tests/host/test_guest_model.py",
        "tests/inspect/test_", "tests/trace/test_foreign_lines.py", "tests/trace/test_shim_layout.py",
        "tests/test_layers.py", "tests/test_suite.py", "tests/vhost/test_blk_device.py",
        "tests/vhost/test_hostile_rings.py", "tests/vhost/test_flush_durability.py", "tests/host/test_tables.py",
        "tests/vhost/test_virtqueue.py", "tests/test_keymaterial.py", "tests/test_errors.py", "tests/live/test_disks.py")
NOT_PURE = ("tests/inspect/test_live.py",)


def test_pure_tests_run_with_qemu_hidden(_hidden_qemu):
    from qemu_mktme.errors import QemuNotFound
    from qemu_mktme.qemu.binary import find_qemu
    _, log = _hidden_qemu
    with pytest.raises(QemuNotFound, match="hidden from tests not marked qemu"):
        find_qemu()
    assert log.read_text().count("--version") == 1
    log.unlink()                                    # expected here: not a failure of this test


def test_pure_modules_are_not_marked_qemu(request):
    marked = [item.nodeid for item in request.session.items
              if item.nodeid.startswith(PURE) and not item.nodeid.startswith(NOT_PURE)
              and item.get_closest_marker("qemu")]
    assert not marked, f"these tests were meant to need no QEMU: {marked[:5]}"


def test_patience_scales_with_the_environment(monkeypatch):
    monkeypatch.delenv("QEMU_MKTME_TIME_SCALE", raising=False)
    assert time_scale() == 4 and patience(10) == 40
    monkeypatch.setenv("QEMU_MKTME_TIME_SCALE", "2.5")
    assert patience(10) == 25
    monkeypatch.setenv("QEMU_MKTME_TIME_SCALE", "0")
    with pytest.raises(ValueError, match="must be positive"):
        patience(1)


def test_a_failing_shared_fixture_runs_once_and_fails_every_user_fast(pytester):
    """Two modules share one expensive computation (as module fixtures are recreated per module):
    it runs once, and the second module fails at once, naming the first failure."""
    pytester.makepyfile(shared='''
from helpers import Once
calls = []
def expensive():
    calls.append(1)
    raise RuntimeError("the guest never booted")
SHARED = Once(expensive)
''')
    user = '''
import pytest
import shared

@pytest.fixture(scope="module")
def run():
    return shared.SHARED.get()

@pytest.mark.parametrize("n", range(2))
def test_uses_it(run, n):
    pass
'''
    pytester.makepyfile(test_a=user, test_b=user, test_zz='import shared\ndef test_once(): assert shared.calls == [1]\n')
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=1, errors=4)
    result.stdout.fnmatch_lines(["*RuntimeError: the guest never booted*",
                                 "*the shared fixture failed in an earlier test*the guest never booted*"])


def _is_verify_mark(node) -> bool:
    """``pytest.mark.verify`` (as a decorator or in ``pytestmark``), with or without a call."""
    import ast
    node = node.func if isinstance(node, ast.Call) else node
    return isinstance(node, ast.Attribute) and node.attr == "verify" and isinstance(node.value, ast.Attribute) \
        and node.value.attr == "mark"


def test_every_long_trial_keeps_a_bounded_form_in_the_suite():
    """A module with a ``verify`` test (``make verify`` only) has a test that ``make test`` runs
    (its bounded form), and no module is ``verify`` as a whole."""
    import ast
    from pathlib import Path
    tests = Path(__file__).parent
    with_trials = []
    for path in sorted(tests.rglob("test_*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets):
                marks = node.value.elts if isinstance(node.value, ast.List | ast.Tuple) else [node.value]
                assert not any(map(_is_verify_mark, marks)), f"{path}: the whole module is make verify's"
        functions = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
                     and n.name.startswith("test_")]
        long = [f.name for f in functions if any(map(_is_verify_mark, f.decorator_list))]
        if long:
            with_trials.append(path.name)
            assert len(long) < len(functions), f"{path}: {long} have no bounded form in make test"
    assert {"test_migrate_kill.py", "test_fleet_load.py", "test_image.py"} <= set(with_trials)
