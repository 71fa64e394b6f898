"""Attach a terminal to a running host's VMs: consoles out, keystrokes in, progress bars.

One VM on a terminal gets a raw console (Ctrl-] quits); several VMs get their lines prefixed
with ``[name]``; standard input that is not a terminal is forwarded as it comes.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import stat
import sys
import termios
import tty
from typing import Any
from collections.abc import Awaitable, Callable

from .errors import MktmeError
from .qemu.machine import Machine
from .live.encrypted import EncryptedMachine
from .live.session import HostSession
from .trace.tracer import run_trace_summary

PROG = "qemu-mktme"
ESCAPE = b"\x1d"  # Ctrl-]
TERMINATED: contextvars.ContextVar[asyncio.Event] = contextvars.ContextVar("qemu_mktme_terminated")
"""Set by the CLI's SIGTERM handler: :func:`attend` returns when it is set."""


async def _forward_stdin(vm: Machine, raw: bool, stop: asyncio.Event) -> None:
    """Copy standard input to the guest console; Ctrl-] in raw (terminal) mode quits."""
    loop = asyncio.get_running_loop()
    mode = os.fstat(sys.stdin.fileno()).st_mode
    if raw or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        read: Callable[[], Awaitable[bytes]] = lambda: reader.read(1024)  # noqa: E731
    else:  # a regular file or /dev/null cannot be polled: read it in a thread
        read = lambda: loop.run_in_executor(None, os.read, sys.stdin.fileno(), 1024)  # noqa: E731
    while data := await read():
        if raw and ESCAPE in data:
            data = data.split(ESCAPE, 1)[0]
            if data:
                await vm.console.write(data)
            stop.set()
            return
        await vm.console.write(data if raw else data.replace(b"\n", b"\r"))


async def _stream_console(vm: Machine, out: Callable[[str], None], prefix: str = "") -> None:
    """Print console output as it arrives (each line prefixed), until the console closes."""
    pos, at_line_start = 0, True
    while True:
        try:
            await vm.console.wait_for(r"[\s\S]", timeout=3600, since=pos)
            closed = False
        except MktmeError:
            closed = True
        text = vm.console.transcript
        chunk, pos = text[pos:], len(text)
        if prefix and chunk:
            lines = chunk.split("\n")
            chunk = "\n".join((prefix if (k or at_line_start) and line else "") + line for k, line in enumerate(lines))
            at_line_start = text.endswith("\n")
        if chunk:
            out(chunk)
        if closed:
            return


async def attend(session: HostSession, *, no_input: bool, trace_interval: float | None = None) -> int:
    """Show the host's VMs, stream their consoles, forward input, until they stop or Ctrl-].

    ``no_input``: leave standard input alone; ``trace_interval``: print each traced VM's memory
    traffic every so many seconds.
    """
    machines = list(session.machines.values())
    interactive = sys.stdin.isatty() and not no_input and len(machines) == 1
    def write(text: str) -> None:
        sys.stdout.write(text.replace("\n", "\r\n") if interactive else text)
        sys.stdout.flush()
    for line in session.host.boot_log:
        print(f"{PROG}: host: {line}", file=sys.stderr)
    for name, vm in session.machines.items():
        q = session.query(name)
        tag = f"KeyID {q['keyid']} ({q['key-type']}, tenant {q['tenant']})" if "keyid" in q else "no MKTME"
        print(f"{PROG}: {name}: QEMU pid {vm.pid}, {tag}", file=sys.stderr)
    print(f"{PROG}: 'qemu-mktme host query' reaches this host" + ("; Ctrl-] quits" if interactive else ""),
          file=sys.stderr)
    stop = asyncio.Event()
    prefix = len(machines) > 1
    background = [asyncio.create_task(_stream_console(vm, write, f"[{vm.name}] " if prefix else ""))
                  for vm in machines]
    if trace_interval is not None:
        background.append(asyncio.create_task(_trace_summary(session, trace_interval)))
    if not no_input and len(machines) == 1:
        background.append(asyncio.create_task(_forward_stdin(machines[0], interactive, stop)))
    ended: list[asyncio.Future[Any]] = [asyncio.ensure_future(asyncio.gather(*(vm.wait() for vm in machines))),
             asyncio.create_task(stop.wait())]
    terminated = TERMINATED.get(None)
    if terminated is not None:
        ended.append(asyncio.create_task(terminated.wait()))
    saved = termios.tcgetattr(sys.stdin) if interactive else None
    try:
        if interactive:
            tty.setraw(sys.stdin)
        await asyncio.wait(ended, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.sleep(0.05)  # let the last console output arrive
    finally:
        if saved is not None:
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)
        for task in background + ended:
            task.cancel()
        await asyncio.gather(*background, *ended, return_exceptions=True)
    codes = {vm.name: vm.returncode for vm in machines}
    if machines and not any(vm.owned for vm in machines):        # qemu-mktme attach: not ours to stop
        gone = all(vm.state.value in ("stopping", "exited") or not vm.qmp.connected for vm in machines)
        print(f"\n{PROG}: detached" + (" (QEMU exited)" if gone else "; QEMU keeps running"), file=sys.stderr)
        return 0
    if any(rc is None for rc in codes.values()):
        print(f"\n{PROG}: stopped the guest" + ("s" if len(codes) > 1 else ""), file=sys.stderr)
        return 0
    for name, rc in codes.items():
        if name not in session.machines:          # it left this host: live migration
            print(f"{PROG}: {name} migrated to another host; this host has nothing left to run", file=sys.stderr)
            continue
        print(f"{PROG}: {name} powered off (QEMU exit status {rc})", file=sys.stderr)
    return 0 if all(rc == 0 for rc in codes.values()) else 1


async def _trace_summary(session: HostSession, interval: float) -> None:
    """Per-KeyID loads, stores and bytes and the hottest pages of every traced VM, periodically."""
    if not session.tracers:
        raise MktmeError("no VM of this host is traced")
    def out(text: str) -> None:
        sys.stderr.write(text.replace("\n", "\r\n") + "\r\n")
        sys.stderr.flush()
    disks = [vm for vm in session.machines.values() if isinstance(vm, EncryptedMachine) and vm.vhost.disks]
    await asyncio.gather(*(run_trace_summary(session.machines[name], tracer, interval, out)
                           for name, tracer in session.tracers.items()),
                         *(_dma_summary(vm, interval, out) for vm in disks))


async def _dma_summary(vm: EncryptedMachine, interval: float, out: Callable[[str], None]) -> None:
    """Per-device DMA counters of ``vm``'s vhost disks, with the memory counters, then totals."""
    try:
        while vm.returncode is None:
            await asyncio.sleep(interval)
            for line in vm.vhost.summary():
                out(line)
    finally:
        for line in vm.vhost.summary("dma total"):
            out(line)


class ProgressBar:
    """``[#####     ] 52%  530/1024 MiB`` on a terminal's stderr; silent otherwise."""

    def __init__(self, label: str) -> None:
        self.label, self.enabled, self.last = label, sys.stderr.isatty(), -1

    def __call__(self, done: int, total: int) -> None:
        pct = 100 * done // max(total, 1)
        if self.enabled and pct != self.last:
            self.last = pct
            bar = "#" * (pct // 4)
            sys.stderr.write(f"\r{self.label} [{bar:<25}] {pct:3d}%  {done >> 20}/{total >> 20} MiB")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.last >= 0:
            sys.stderr.write("\n")
