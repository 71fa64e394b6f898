"""What the fleet tests share: waiting for a condition on the machines."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from helpers import patience

T = TypeVar("T")


def wait_for(condition: Callable[[], T], seconds: float, what: str) -> T:
    """Poll ``condition`` until it is true; its value. Fails after :func:`patience` of ``seconds``."""
    deadline = time.monotonic() + patience(seconds)
    while not (value := condition()):
        assert time.monotonic() < deadline, f"not true after {patience(seconds):g} s: {what}"
        time.sleep(0.1)
    return value


def guards() -> list[int]:
    """The pids of the host models' incoming-domain guards (``virt/guard.py``) running anywhere."""
    from pathlib import Path
    from qemu_mktme.virt import guard
    out = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if guard.__file__.encode() in args:
            out.append(int(proc.name))
    return out
