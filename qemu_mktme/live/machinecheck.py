"""Integrity poison and sanitizer findings on a running, traced VM.

Under ``Host(integrity="mac")`` a tampered line of guest RAM is poisoned (see
:mod:`qemu_mktme.engine.integrity`). The guest reads its RAM without the engine, so the first
guest access to the line is found with the tracer: a watch on the line is registered the moment
it is poisoned (so no access can slip past), and the access that consumes it becomes a
:class:`MachineCheckEvent` with its instruction (capstone). The VM is then stopped, as a
machine check on consumed poison stops a TDX guest. The guest may run for the few milliseconds
the tracer takes to see the access, but on the values it had: the tampered line never reaches
its RAM (the engine keeps it aside).

:class:`SanitizerLink` forwards the tracer's foreign-KeyID reads (guest loads of lines written
through another KeyID) to the host's sanitizer as rule (a), with the guest instruction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from ..engine.integrity import Poison
from ..errors import MktmeError, logged
from ..qemu.machine import Machine, VmState
from ..trace.accesses import Access, ForeignRead
from ..trace.tracer import Tracer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MachineCheckEvent:
    """The guest consumed a poisoned line: the access, the line, why it was poisoned."""

    vm: str
    line_gpa: int
    cause: str
    access: Access

    def __str__(self) -> str:
        insn = self.access.instruction
        return (f"#MC in VM {self.vm}: poisoned line {self.line_gpa:#x} ({self.cause}) consumed by a "
                f"{self.access.kind} at {self.access.gpa:#x} by {self.access.pc:#x}: {insn or '?'}; VM stopped")


class PoisonWatch:
    """Turns poisoned lines of ``vm``'s RAM into machine checks (see the module docstring)."""

    def __init__(self, vm: Machine, tracer: Tracer, out: Callable[[MachineCheckEvent], None] | None = None) -> None:
        self.vm, self.tracer, self.out = vm, tracer, out
        self.events: list[MachineCheckEvent] = []
        self.stopped = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def poisoned(self, gpa: int, poison: Poison) -> None:
        """A guest poison hook: watch the line now, wait for its first access in a task."""
        line = gpa - gpa % 64
        watch = self.tracer.watch(line, 64, on="both")
        task = asyncio.get_running_loop().create_task(self._consume(watch, line, poison.cause))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _consume(self, watch, line: int, cause: str) -> None:  # type: ignore[no-untyped-def]
        async with watch:
            try:
                access = await anext(watch)
            except StopAsyncIteration:
                return
        event = MachineCheckEvent(self.vm.name, line, cause, access)
        self.events.append(event)
        log.warning("%s", event)
        if self.vm.state is VmState.RUNNING:
            with contextlib.suppress(MktmeError):
                await self.vm.pause()
        self.stopped.set()
        if self.out is not None:
            self.out(event)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with logged(__name__, "stopping a poison watch", asyncio.CancelledError, Exception):
                await task


def forward_foreign_reads(vm_name: str, tracer: Tracer, sanitizer, hpa_of: Callable[[int], int | None]) -> None:  # type: ignore[no-untyped-def]
    """Report each guest foreign-KeyID read of ``tracer`` to ``sanitizer`` as rule (a)."""
    def hook(read: ForeignRead) -> None:
        gpa = read.line_gpa
        page_keyid = read.access.keyid
        sanitizer.guest_read(vm_name, gpa, hpa_of(gpa) if gpa is not None else None, page_keyid,
                             read.foreign_keyid, read.access)
    tracer.foreign_read_hooks.append(hook)
