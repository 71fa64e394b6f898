"""Capture a consistent DRAM dump of a running host's VMs: pause, write, resume."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..qemu.encrypted import EncryptedMachine
from ..qemu.session import HostSession
from .dump import Dump, Progress, write_dump


async def capture(session: HostSession, path: str | Path, vms: Sequence[str] = (),
                  progress: Progress | None = None) -> Dump:
    """Dump ``vms`` (default: every MKTME VM of the session) to ``path``.

    The VMs are paused for the whole capture, so their images are consistent with one another,
    and resumed afterwards (also when writing fails).
    """
    chosen = [session.machines[n] if n in session.machines else _unknown(session, n) for n in vms] or \
        [vm for vm in session.machines.values() if isinstance(vm, EncryptedMachine)]
    machines = [vm for vm in chosen if isinstance(vm, EncryptedMachine)]
    if not machines:
        raise ValueError("no VM under MKTME to dump")
    loop = asyncio.get_running_loop()
    def report(done: int, total: int) -> None:  # from the writer thread
        if progress is not None:
            loop.call_soon_threadsafe(progress, done, total)
    was_running = [vm for vm in machines if vm.state.value == "running"]
    for vm in was_running:
        await vm.pause()
    try:
        return await asyncio.to_thread(write_dump, [vm.guest for vm in machines], path,
                                       host_info=_host_info(session), progress=report)
    finally:
        for vm in was_running:
            await vm.resume()


def _unknown(session: HostSession, name: str) -> Any:
    raise ValueError(f"no VM named {name!r} (have: {', '.join(session.machines)})")


def _host_info(session: HostSession) -> dict[str, Any]:
    layout = session.host.platform.layout
    return {"maxphyaddr": layout.maxphyaddr, "keyid_bits": layout.keyid_bits,
            "packages": session.host.platform.packages}
