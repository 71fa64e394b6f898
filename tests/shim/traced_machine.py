"""Test helper: a traced machine (the tracer configured, the machine launched, the tracer started)."""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator

from qemu_mktme.qemu.machine import Machine, MachineConfig
from qemu_mktme.trace.tracer import Tracer


@contextlib.asynccontextmanager
async def traced(boot: Any, *, memory: str = "512M", cpus: int = 1, start_paused: bool = False,
                 **tracer_options: Any) -> AsyncIterator[tuple[Machine, Tracer]]:
    tracer = Tracer(**tracer_options)
    config = MachineConfig(boot=boot, memory=memory, cpus=cpus, start_paused=start_paused)
    async with tracer, Machine(tracer.configure(config)) as vm:
        await tracer.start(vm)
        yield vm, tracer
