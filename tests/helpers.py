"""Small helpers shared by test modules (imported as ``from helpers import ...``).

Time in this suite: no test's outcome depends on how fast the machine is. A wait for a guest
event or a subprocess has a limit that only catches hangs: :func:`patience` of the time the event
takes at most on an idle machine, times ``QEMU_MKTME_TIME_SCALE`` (default 4, room for a machine
2x slower than the one the suite was written on with a CPU hog beside it). Where something must
*eventually* be true, :func:`eventually` polls for it instead of sleeping a fixed time.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

ENV_TIME_SCALE = "QEMU_MKTME_TIME_SCALE"
DEFAULT_TIME_SCALE = 4.0


def time_scale() -> float:
    text = os.environ.get(ENV_TIME_SCALE, "")
    try:
        scale = float(text) if text else DEFAULT_TIME_SCALE
    except ValueError:
        raise ValueError(f"{ENV_TIME_SCALE}={text!r} is not a number") from None
    if scale <= 0:
        raise ValueError(f"{ENV_TIME_SCALE}={text!r} must be positive")
    return scale


def patience(seconds: float) -> float:
    """The limit for waiting on something that takes at most ``seconds`` on an idle machine: a
    hang guard, never a speed requirement."""
    return seconds * time_scale()


async def eventually(condition: Callable[[], bool], seconds: float = 5.0, what: str = "") -> None:
    """Wait until ``condition()`` is true, polling; fail after :func:`patience` of ``seconds``."""
    deadline = time.monotonic() + patience(seconds)
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {patience(seconds):g} s: {what or condition}")
        await asyncio.sleep(0.01)


def qm(*args: str, input: str | None = None, env: dict | None = None, timeout: float = 30):
    """Run the ``qemu-mktme`` command line in a subprocess, as a user would (``timeout``: see
    :func:`patience`)."""
    return subprocess.run([sys.executable, "-m", "qemu_mktme.cli", *args], input=input, capture_output=True,
                          text=True, timeout=patience(timeout), env={**os.environ, **(env or {})})


class Once:
    """An expensive computation shared by several tests, run at most once per session.

    pytest runs a failed module- or session-scoped fixture again for every test that uses it; a
    fixture that returns ``Once(...).get()`` computes once, and when that failed every later test
    fails at once with the first error instead of repeating minutes of work.
    """

    def __init__(self, compute: Callable[[], object]) -> None:
        self._compute = compute
        self._done = False
        self._value: object = None
        self._error: BaseException | None = None

    def get(self) -> object:
        if not self._done:
            self._done = True
            try:
                self._value = self._compute()
            except Exception as err:          # not KeyboardInterrupt / pytest's exit: let those end the run
                self._error = err
                raise
        if self._error is not None:
            import pytest
            pytest.fail(f"the shared fixture failed in an earlier test (reported there): "
                        f"{type(self._error).__name__}: {self._error}", pytrace=False)
        return self._value


SCRIPTS = Path(__file__).parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """``scripts/NAME.py`` imported as module ``NAME`` (the probes import each other by name)."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
