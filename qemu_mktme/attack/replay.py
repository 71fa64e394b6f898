"""Replay / rollback on the bus, on the Linux ``pin`` workload (``qemu-mktme attack replay``).

The guest keeps its wrong-PIN counter in RAM (three wrong PINs lock it). The attacker records
the DRAM ciphertext of the counter's line while it holds 0, types wrong PINs on the console,
and writes the recorded ciphertext back whenever one try is left. MKTME has no freshness: the
old ciphertext decrypts to the old counter, the guest sees 0 wrong tries again and never
notices, so the attacker has unlimited tries. With ``integrity="mac"`` the replayed line fails
its MAC: the guest's next access to it is a machine check and the VM is stopped.

    result = await pin_replay(integrity=False, pin="4711", guesses=["1000", ..., "4711"])
"""

from __future__ import annotations

import asyncio
import functools
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..errors import logged
from .. import images
from ..host.host import Host
from ..live.encrypted import EncryptedMachine
from ..live.launch import launch_machine
from ..live.machinecheck import MachineCheckEvent
from ..qemu.machine import MachineConfig
from ..trace.tracer import Tracer
from .bus import AttackError, record_line, replay_line

_ANSWER = re.compile(images.LINUX.marker(r"pin (wrong: \S*|ok: unlocked|locked after \d+ wrong PINs)\n"))
_PROMPT = re.compile(images.LINUX.marker(r"pin\? \(wrong so far: (\d+) of 3\)\n"))
GUEST_LIMIT = 3


@dataclass
class ReplayResult:
    """One run of the scenario: what the attacker did and what the guest did."""

    integrity: bool
    line_gpa: int = 0
    line_hpa: int = 0
    attempts: int = 0
    replays: int = 0
    unlocked: bool = False
    locked: bool = False
    machine_check: MachineCheckEvent | None = None
    log: list[str] = field(default_factory=list)
    guest_output: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def outcome(self) -> str:
        if self.machine_check is not None:
            return f"replay caught: #MC, VM stopped after {self.attempts} PINs"
        if self.unlocked:
            return f"unlocked with {self.attempts} PINs (the guest allows {GUEST_LIMIT})"
        if self.locked:
            return f"locked after {self.attempts} PINs"
        return f"{self.attempts} PINs tried, still locked out of the secret"


def _counter(vm: EncryptedMachine, gpa: int) -> int:
    """The counter as the guest sees it: its own RAM (the CPU view), not through the engine."""
    return int.from_bytes(vm.ram.read(gpa, 4), "little")


async def pin_replay(*, integrity: bool, pin: str, guesses: Sequence[str], out: Callable[[str], None] = print,
                     timeout: float = 60.0, memory: int | None = None) -> ReplayResult:
    """Run the ``pin`` guest under MKTME (``integrity``: with the MAC) and attack its counter."""
    if not guesses:
        raise ValueError("give at least one PIN to try")
    r = ReplayResult(integrity)

    def say(text: str) -> None:
        r.log.append(text)
        out(text)

    started = time.monotonic()
    host = Host(keyid_bits=6, integrity="mac" if integrity else None)
    serial = host.keys.add("pin-victim", "type=cpu", tenant="victim")
    boot = images.guest_boot("linux", workload="pin", params={"secret": pin})
    config = MachineConfig(boot=boot, memory=memory or images.default_memory("linux"), name="victim")
    machine = functools.partial(EncryptedMachine, host, key_serial=serial, tenant="victim")
    # The shim is needed only to see the guest consume poison: without integrity the guest runs untraced.
    async with Tracer() as tracer, await launch_machine(config, tracer=tracer if integrity else None,
                                                        machine=machine) as vm:
        m = await vm.console.wait_for(images.LINUX.marker(r"pin counter at (0x[0-9a-f]+)\n"), timeout)
        r.line_gpa = int(m[1], 16)
        await vm.console.wait_for(_PROMPT, timeout)
        record = record_line(vm.guest, r.line_gpa)
        r.line_hpa = record.hpa
        say(f"recorded line GPA {record.gpa:#x} (HPA {record.hpa:#x}) from the bus: "
            f"{record.ciphertext[:16].hex()}... (the guest's counter: {_counter(vm, r.line_gpa)})")
        stopped = vm.poison_watch.stopped if vm.poison_watch is not None else asyncio.Event()
        for guess in guesses:
            mark = vm.console.mark()
            await vm.console.write(guess + "\n")
            r.attempts += 1
            answer = asyncio.ensure_future(vm.console.wait_for(_ANSWER, timeout, since=mark))
            mc = asyncio.ensure_future(stopped.wait())
            done, _ = await asyncio.wait({answer, mc}, return_when=asyncio.FIRST_COMPLETED)
            for task in (answer, mc):
                if task not in done:
                    task.cancel()
                    with logged(__name__, "stopping a console watch", asyncio.CancelledError, Exception):
                        await task
            if answer in done:
                line = answer.result()[0].strip()
                r.guest_output.append(line)
                say(f"PIN {guess}: guest: {line}")
                if vm.guest.poisoned_lines and not stopped.is_set():
                    # The guest read the poisoned counter to answer: the shim saw that load, the
                    # stop is on its way (the guest ran on meanwhile, on its own unreplayed values).
                    await asyncio.wait_for(stopped.wait(), timeout)
            if stopped.is_set():
                assert vm.poison_watch is not None
                r.machine_check = vm.poison_watch.events[0]
                say(str(r.machine_check))
                break
            text = answer.result()[1]
            if text.startswith("ok"):
                r.unlocked = True
                break
            if text.startswith("locked"):
                r.locked = True
                break
            prompt = await vm.console.wait_for(_PROMPT, timeout)
            r.guest_output.append(prompt[0].strip())
            wrong = int(prompt[1])
            if wrong == GUEST_LIMIT - 1:
                before = _counter(vm, r.line_gpa)
                replay_line(vm.guest, record)
                r.replays += 1
                after = _counter(vm, r.line_gpa)
                poisoned = r.line_gpa in vm.guest.poisoned_lines
                say(f"replayed line GPA {r.line_gpa:#x}: counter as the guest sees it {before} -> {after}"
                    + ("; the line is poisoned (MAC mismatch)" if poisoned else ""))
    r.seconds = time.monotonic() - started
    return r


def default_guesses(pin: str, wrong: int) -> list[str]:
    """``wrong`` distinct wrong 4-digit PINs, then ``pin``."""
    out: list[str] = []
    n = 1000
    while len(out) < wrong:
        if f"{n:04d}" != pin:
            out.append(f"{n:04d}")
        n += 1
    return out + [pin]


def random_pin() -> str:
    return f"{secrets.randbelow(10000):04d}"


__all__ = ["AttackError", "ReplayResult", "default_guesses", "pin_replay", "random_pin"]
