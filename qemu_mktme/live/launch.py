"""Starting a machine with the tracer in place before its guest runs a single instruction.

The one sequence for every traced launch (the host session, the verifier, restore, tests):
configure the tracer (it loads the shim), launch QEMU paused, start the tracer on the paused
machine (under MKTME that also attributes its RAM to the VM's KeyID and reports foreign-KeyID
writes to it), then resume, unless the configuration asks for a paused start or an incoming
migration.

    async with Tracer() as tracer:
        async with await launch_machine(config, tracer=tracer) as vm:
            ...
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..errors import logged
from ..qemu.machine import Machine, MachineConfig
from ..trace.tracer import Tracer
from .encrypted import EncryptedMachine

M = TypeVar("M", bound=Machine)


async def launch_machine(config: MachineConfig, *, tracer: Tracer | None = None,
                         machine: Callable[[MachineConfig], M] = Machine) -> M:  # type: ignore[assignment]
    """``machine(config)`` launched, with ``tracer`` (fresh; None: no tracing) started before
    the guest runs. The caller owns the machine (``async with`` it, or enter it on a stack);
    on any failure it is closed again before the error propagates.
    """
    if tracer is None:
        vm = machine(config)
        await vm.launch()
        return vm
    vm = machine(tracer.configure(dataclasses.replace(config, start_paused=True)))
    await vm.launch()
    try:
        await trace(vm, tracer)
        if not (config.start_paused or config.incoming):
            await vm.resume()
    except BaseException:
        await vm.close()
        raise
    return vm


async def launch_with_key(config: MachineConfig, key: Awaitable[int], release: Callable[[int], object], *,
                          machine: Callable[[MachineConfig, asyncio.Future[int]], M],
                          tracer: Tracer | None = None) -> M:
    """``machine(config, key)`` launched while its key handle is still on its way (a
    :class:`~.encrypted.PendingKeyMachine` binds once it arrives). When the launch fails the
    key is not left behind: still pending, it is cancelled; arrived but never bound, ``release``d."""
    keyed = asyncio.ensure_future(key)
    try:
        return await launch_machine(config, tracer=tracer, machine=lambda cfg: machine(cfg, keyed))
    except BaseException:
        if not keyed.done():               # QEMU failed first: the key never arrives here
            keyed.cancel()
            with logged(__name__, "cancelling the key on its way", BaseException):
                await keyed
        elif not keyed.cancelled() and keyed.exception() is None:
            with logged(__name__, "releasing the unbound key"):      # (already gone if the machine had bound)
                release(keyed.result())
        raise


async def trace(vm: Machine, tracer: Tracer) -> None:
    """Start ``tracer`` on ``vm``, paused as :meth:`Tracer.configure` left it (the caller resumes)."""
    if isinstance(vm, EncryptedMachine):
        await vm.trace(tracer)
    else:
        await tracer.start(vm)
