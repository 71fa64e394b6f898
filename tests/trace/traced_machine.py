"""Test helper: a traced machine (the tracer configured, the machine launched, the tracer started)."""

from __future__ import annotations

import contextlib
from typing import Any
from collections.abc import AsyncIterator

from qemu_mktme.live.launch import launch_machine
from qemu_mktme.qemu.machine import Machine, MachineConfig
from qemu_mktme.trace.tracer import Tracer


@contextlib.asynccontextmanager
async def traced(boot: Any, *, memory: str = "512M", cpus: int = 1, start_paused: bool = False,
                 **tracer_options: Any) -> AsyncIterator[tuple[Machine, Tracer]]:
    config = MachineConfig(boot=boot, memory=memory, cpus=cpus, start_paused=start_paused)
    async with Tracer(**tracer_options) as tracer, await launch_machine(config, tracer=tracer) as vm:
        yield vm, tracer
