"""Rolling a guest's PIN counter back: four ways to capture a line and write it back later.

The victim (:class:`~.victims.PinVictim`) keeps its wrong-PIN counter in RAM; three wrong PINs
lock it. The attacker captures the counter's line while it holds 0, types wrong PINs, and writes
the capture back whenever one try is left. Without freshness the old ciphertext decrypts to the
old counter: unlimited tries. How the line is captured and written back is the attack:

- ``replay-data`` (a bus interposer on the data pins): DRAM's data bits only. A per-line MAC
  (in the metadata bits, left as they were) no longer matches: poison, ``#MC`` on consumption.
- ``replay-meta`` (an interposer on the data and ECC pins): data and metadata bits together. A
  MAC without freshness matches the old data again; only a version counter on the die notices.
- ``badram`` (De Meulemeester et al., IEEE S&P 2025; host software only): the DIMM's SPD declared
  one address bit too many at boot, so the victim's cell is also reached from a *ghost* address
  the host owns. The host maps the ghost through a ``no-encrypt`` KeyID, loads the line (its
  ciphertext) and later stores it back. The memory controller checks and tags the *ghost*
  address: a MAC sees a write through another address and KeyID, the owner bit and ciphertext
  hiding keep the load from returning ciphertext, the BIOS's alias check refuses to boot.
- ``batteringram`` (De Meulemeester et al., IEEE S&P 2026): the same, with an interposer that
  switches the alias on only for the capture and the write-back, after the boot-time check.

    result = await rollback(attack="badram", mitigation="none", victim=PinVictim("linux", "4711"),
                            guesses=default_guesses("4711", 6))
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..engine.dimm import DimmAliasError
from ..errors import QemuExited
from ..host.guest import EncryptedGuest
from ..host.host import Host
from ..live.encrypted import EncryptedMachine
from ..live.launch import launch_machine
from ..live.machinecheck import MachineCheckEvent
from ..qemu.machine import MachineConfig
from ..trace.tracer import Tracer
from .bus import AttackError, HostMapping, LineRecord, hidden, record_line, replay_line
from .victims import PIN_LIMIT, Answer, PinVictim

ROLLBACKS = ("replay-data", "replay-meta", "badram", "batteringram")
DEFAULT_ALIAS_BIT = 36
"""The DIMM address bit the alias attacks use: 64 GiB, above every VM's RAM (from 4 GiB, 1 GiB
each) and below the 40-bit physical space left by 6 KeyID bits."""
GUEST_LIMIT = PIN_LIMIT


@dataclass
class ReplayResult:
    """One run: what the attacker did and what the guest did."""

    integrity: bool
    attack: str = "replay-data"
    mitigation: str = "none"
    line_gpa: int = 0
    line_hpa: int = 0
    attempts: int = 0
    replays: int = 0
    unlocked: bool = False
    locked: bool = False
    blocked: str = ""
    machine_check: MachineCheckEvent | None = None
    log: list[str] = field(default_factory=list)
    guest_output: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def verdict(self) -> str:
        """succeeded / detected / blocked / failed (the guest locked, nothing noticed)."""
        if self.blocked:
            return "blocked"
        if self.machine_check is not None:
            return "detected"
        return "succeeded" if self.unlocked and self.attempts > GUEST_LIMIT else "failed"

    @property
    def outcome(self) -> str:
        if self.blocked:
            return f"blocked: {self.blocked}"
        if self.machine_check is not None:
            return f"replay caught: #MC, VM stopped after {self.attempts} PINs"
        if self.unlocked:
            return f"unlocked with {self.attempts} PINs (the guest allows {GUEST_LIMIT})"
        if self.locked:
            return f"locked after {self.attempts} PINs"
        return f"{self.attempts} PINs tried, still locked out of the secret"


class _Capture:
    """Capture and write back one line, the way ``attack`` does."""

    def __init__(self, attack: str, host: Host, alias_bit: int) -> None:
        self.attack, self.host, self.alias_bit = attack, host, alias_bit
        self.mapping = HostMapping(host, alias_bit=alias_bit) if attack in ("badram", "batteringram") else None
        self.record: LineRecord | None = None
        self.data = b""

    @contextlib.contextmanager
    def _alias(self):  # type: ignore[no-untyped-def]
        """Battering RAM: the interposer switches the alias on for one access only."""
        if self.attack != "batteringram":
            yield
            return
        self.host.platform.set_dimm_alias(self.alias_bit)
        try:
            yield
        finally:
            self.host.platform.set_dimm_alias(None)

    def capture(self, guest: EncryptedGuest, gpa: int) -> str:
        """Capture the line; returns what was seen (``AttackError`` when nothing usable)."""
        if self.mapping is None:
            self.record = record_line(guest, gpa, metadata=self.attack == "replay-meta")
            meta = self.record.meta
            tag = f", tag {meta.tag:#09x}" if meta is not None and meta.tag is not None else ""
            return (f"recorded line GPA {self.record.gpa:#x} (HPA {self.record.hpa:#x}) from the bus: "
                    f"{self.record.ciphertext[:16].hex()}...{tag}")
        with self._alias():
            line, ghost = self.mapping.address(guest, gpa)
            self.data = self.mapping.read(guest, line)
        where = (f"through the ghost HPA {ghost:#x} (alias bit {self.alias_bit}"
                 + (", switched on for this access only" if self.attack == "batteringram" else "")
                 + f") and no-encrypt KeyID {self.mapping.keyid}")
        if hidden(self.data):
            raise AttackError(f"the capture {where} read {self.data[:8].hex()}... (64 bytes of {self.data[0]:#04x}): "
                              "no ciphertext")
        return f"captured line GPA {line:#x} {where}: {self.data[:16].hex()}..."

    def write_back(self, guest: EncryptedGuest, gpa: int) -> None:
        if self.mapping is None:
            assert self.record is not None
            replay_line(guest, self.record)
            return
        with self._alias():
            self.mapping.write(guest, gpa, self.data)


async def rollback(*, attack: str, mitigation: str, victim: PinVictim, guesses: Sequence[str],
                   alias_bit: int = DEFAULT_ALIAS_BIT, out: Callable[[str], None] = print,
                   timeout: float = 60.0) -> ReplayResult:
    """Boot a host in ``mitigation`` mode, run ``victim`` on it and roll its counter back with
    ``attack`` (one of :data:`ROLLBACKS`) while typing ``guesses``."""
    if attack not in ROLLBACKS:
        raise AttackError(f"a rollback is one of {', '.join(ROLLBACKS)}, not {attack!r}")
    if not guesses:
        raise AttackError("give at least one PIN to try")
    r = ReplayResult(mitigation in ("mac", "mac+owner", "freshness"), attack, mitigation)

    def say(text: str) -> None:
        r.log.append(text)
        out(text)

    started = time.monotonic()
    try:
        host = Host(keyid_bits=6, mitigation=mitigation, dimm_alias=alias_bit if attack == "badram" else None)
    except DimmAliasError as err:
        r.blocked = f"the host did not boot: {err}"
        say(r.blocked)
        r.seconds = time.monotonic() - started
        return r
    if mitigation == "alias-check":
        say("the BIOS alias check found no alias at boot" + (
            f" (the interposer will alias bit {alias_bit} later)" if attack == "batteringram" else ""))
    serial = host.keys.add("pin-victim", "type=cpu", tenant="victim")
    cap = _Capture(attack, host, alias_bit)
    machine: Callable[[MachineConfig], EncryptedMachine] = functools.partial(
        EncryptedMachine, host, key_serial=serial, tenant="victim")
    traced = host.platform.memory.integrity is not None   # the shim sees the guest consume poison
    async with Tracer() as tracer, await launch_machine(victim.config(), tracer=tracer if traced else None,
                                                        machine=machine) as vm:
        r.line_gpa = await victim.ready(vm, timeout)
        r.line_hpa = int(vm.guest.hpa_of(r.line_gpa))
        try:
            say(cap.capture(vm.guest, r.line_gpa) + f" (the guest's counter: {_counter(vm, r.line_gpa)})")
        except AttackError as err:
            r.blocked = str(err)
            say(f"blocked: {err}")
            r.seconds = time.monotonic() - started
            return r
        stopped = vm.poison_watch.stopped if vm.poison_watch is not None else asyncio.Event()
        for guess in guesses:
            r.attempts += 1
            answer = await _answer(victim, vm, guess, stopped, timeout)
            if answer is not None:
                r.guest_output.append(answer.line)
                say(f"PIN {guess}: guest: {answer.line}")
                if vm.guest.poisoned_lines and not stopped.is_set():
                    # the guest read the poisoned counter to answer: the shim saw that load and
                    # the stop is on its way (the guest ran on, on its own unreplayed values)
                    await asyncio.wait_for(stopped.wait(), timeout)
            if stopped.is_set():
                assert vm.poison_watch is not None
                r.machine_check = vm.poison_watch.events[0]
                say(str(r.machine_check))
                break
            assert answer is not None
            if answer.kind == "unlocked":
                r.unlocked = True
                break
            if answer.kind == "locked":
                r.locked = True
                break
            if answer.wrong == GUEST_LIMIT - 1:
                before = _counter(vm, r.line_gpa)
                cap.write_back(vm.guest, r.line_gpa)
                r.replays += 1
                after = _counter(vm, r.line_gpa)
                poisoned = r.line_gpa in vm.guest.poisoned_lines
                via = "" if cap.mapping is None else " through the ghost address"
                say(f"wrote the capture back at GPA {r.line_gpa:#x}{via}: counter as the guest sees it {before} -> {after}"
                    + ("; the line is poisoned (MAC mismatch)" if poisoned else ""))
    r.seconds = time.monotonic() - started
    return r


async def _answer(victim: PinVictim, vm: EncryptedMachine, guess: str, stopped: asyncio.Event,
                  timeout: float) -> Answer | None:
    """The guest's answer to ``guess``, or None when the VM stopped on a machine check first."""
    answer = asyncio.ensure_future(victim.guess(vm, guess, timeout))
    mc = asyncio.ensure_future(stopped.wait())
    done, _ = await asyncio.wait({answer, mc}, return_when=asyncio.FIRST_COMPLETED)
    for task in (answer, mc):
        if task not in done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if answer not in done:
        return None
    try:
        return answer.result()
    except QemuExited:
        # The machine check stops the VM and its QEMU goes away: the guest's pending answer can
        # see QEMU gone before this loop sees the stop (a loaded machine: the tracer's backlog
        # can hold the poisoned load for seconds, so a quarter of the caller's patience, not a
        # fixed 5 s). The stop is what happened; anything else is the error it says.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stopped.wait(), max(5.0, timeout / 4))
        if stopped.is_set():
            return None
        raise


def _counter(vm: EncryptedMachine, gpa: int) -> int:
    """The counter as the guest sees it: its own RAM (the CPU view), not through the engine."""
    return int.from_bytes(vm.ram.read(gpa, 4), "little")


async def pin_replay(*, integrity: bool, pin: str, guesses: Sequence[str], out: Callable[[str], None] = print,
                     timeout: float = 60.0, guest: str = "linux", metadata: bool = False) -> ReplayResult:
    """The bus replay on the Linux ``pin`` workload, MKTME as shipped or with the MAC
    (``metadata``: the interposer replays the metadata bits too)."""
    return await rollback(attack="replay-meta" if metadata else "replay-data", mitigation="mac" if integrity else "none",
                          victim=PinVictim(guest, pin), guesses=guesses, out=out, timeout=timeout)


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


__all__ = ["DEFAULT_ALIAS_BIT", "ROLLBACKS", "AttackError", "ReplayResult", "default_guesses", "pin_replay",
           "random_pin", "rollback"]
