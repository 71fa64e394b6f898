"""Capture a consistent DRAM dump of running VMs: pause, write, resume."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any

from ..files import Progress
from ..files.dumpfile import Dump, write_dump
from .encrypted import EncryptedMachine


async def capture(machines: Sequence[EncryptedMachine], path: str | os.PathLike[str], host_info: dict[str, Any],
                  progress: Progress | None = None) -> Dump:
    """Dump ``machines`` to ``path``, with ``host_info`` (platform geometry) in the manifest.

    The VMs are paused for the whole capture, so their images are consistent with one another,
    and resumed afterwards (also when writing fails).
    """
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
                                       host_info=host_info, progress=report)
    finally:
        for vm in was_running:
            await vm.resume()
