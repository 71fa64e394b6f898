"""Fixtures of the command-line tests."""

from __future__ import annotations

import pytest

from qemu_mktme.live import control
from qemu_mktme.qemu.machine import Machine


@pytest.fixture
def no_qemu(monkeypatch):
    async def refuse(*args, **kwargs):
        raise AssertionError("the command started something before refusing its arguments")
    monkeypatch.setattr(Machine, "launch", refuse)
    monkeypatch.setattr(control, "request", refuse)
