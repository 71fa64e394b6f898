"""A dictionary of deterministic ciphertext: WireTap (2025) on the bus, CipherLeaks (USENIX
Security 2021) from host software, on the table victim.

The victim (:class:`~.victims.TableVictim`) stores the 2^W entries of a public table into one
variable, in order, then the entry each W-bit window of its secret indexes. The attacker never
uses a key. At every store (the tracer's watch tells when) it samples the ciphertext of the
variable's 16-byte XTS block through a **channel**:

- ``bus`` (WireTap): a passive interposer on the DIMM reads DRAM
  (:meth:`~qemu_mktme.host.guest.EncryptedGuest.dram`). Host-side defences (owner bit,
  ciphertext hiding) do not see it.
- ``host`` (CipherLeaks): hypervisor software loads the same physical address through a
  ``no-encrypt`` KeyID (:class:`~.bus.HostMapping`): a CPU access, subject to the memory
  controller's checks.

The first 2^W samples are the dictionary (ciphertext -> table index: the attacker knows the
program stores the public table in order); each later sample is looked up in it. MKTME's
ciphertext is deterministic per address, so every window decodes. With freshness each store
leaves a new ciphertext and nothing decodes; with hiding the host channel reads a constant.
Both channels watch the same run (one boot serves both rows of the matrix).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..errors import AccessTimeout
from ..host.host import Host
from ..live.encrypted import EncryptedMachine
from ..live.launch import launch_machine
from ..qemu.machine import MachineConfig
from ..trace.tracer import Tracer
from .bus import AttackError, HostMapping, check_target, hidden
from .victims import TableVictim

XTS_BLOCK = 16
CHANNELS = ("bus", "host")
ATTACK_OF_CHANNEL = {"bus": "wiretap", "host": "cipherleak"}


@dataclass
class DictionaryResult:
    """One channel's samples of one run and what they decode to."""

    channel: str
    mitigation: str
    secret: str
    width: int
    samples: list[bytes] = field(default_factory=list)
    recovered: str = ""
    seconds: float = 0.0
    runs: int = 1

    @property
    def attack(self) -> str:
        return ATTACK_OF_CHANNEL[self.channel]

    @property
    def known(self) -> int:
        """Bits the dictionary decoded (the rest are '?')."""
        return sum(c != "?" for c in self.recovered)

    @property
    def correct(self) -> int:
        return sum(a == b for a, b in zip(self.secret, self.recovered))

    @property
    def chance(self) -> float:
        """Bits a guess gets right on average: half."""
        return len(self.secret) / 2

    @property
    def distinct(self) -> int:
        return len(set(self.samples))

    @property
    def blocked_reason(self) -> str:
        if self.samples and all(hidden(s) for s in self.samples):
            return (f"every sample read {self.samples[0][:4].hex()}...: the host is not given ciphertext")
        if self.known == 0:
            return (f"no window matched the dictionary: {self.distinct} distinct ciphertexts in "
                    f"{len(self.samples)} stores, no two equal (no determinism)")
        return ""

    @property
    def verdict(self) -> str:
        if self.correct == len(self.secret):
            return "succeeded"
        return "blocked" if self.blocked_reason else "failed"

    def summary(self) -> str:
        head = (f"{self.attack} ({self.channel}): bits recovered {self.correct}/{len(self.secret)} "
                f"(chance: {self.chance:.0f}), {self.known} decoded from the dictionary; "
                f"{self.distinct} distinct ciphertexts in {len(self.samples)} stores, {self.seconds:.2f} s")
        reason = self.blocked_reason
        return head + (f"; blocked: {reason}" if reason and self.verdict == "blocked" else "")


def decode(samples: Sequence[bytes], width: int) -> str:
    """The secret's bits from ciphertext equality alone: the first 2^width samples are the table
    in order; each later sample is its index if it is in that dictionary, '?' otherwise. A
    dictionary with equal entries (no ciphertext to tell them apart) decodes nothing."""
    size = 1 << width
    table = list(samples[:size])
    dictionary = {s: i for i, s in enumerate(table)} if len(set(table)) == size else {}
    return "".join(format(dictionary[s], f"0{width}b") if s in dictionary else "?" * width for s in samples[size:])


RUNS = 3
"""Runs of the victim before the attacker gives up on sampling in time. The guest does not wait
for it: under load a sample can come after the next store. After each sample the tracer is
flushed; a store delivered by then means the sample may show it, and the run is done again (the
bare-metal victim's steps twice, three times as long)."""


async def _observe_run(vm: EncryptedMachine, tracer: Tracer, victim: TableVictim, gpa: int,
                       results: list[DictionaryResult], sample: dict[str, Callable[[], bytes]], timeout: float,
                       slower: int) -> tuple[float, int]:
    """One run of the victim (its steps ``slower`` times longer), each channel sampled at each
    store; returns its duration and how many samples may have come after the next store (the
    tracer, flushed after each sample, had delivered that store already)."""
    await tracer.flush()
    started = time.monotonic()
    late = 0
    async with tracer.watch(gpa, 8, on="store") as stores:
        await victim.run(vm, slower)
        for n in range(victim.stores):
            try:
                await asyncio.wait_for(anext(stores), timeout)
            except (TimeoutError, StopAsyncIteration, AccessTimeout):
                raise AttackError(f"the guest made {n} of {victim.stores} stores") from None
            for r in results:
                r.samples.append(sample[r.channel]())
            await tracer.flush()
            late += stores.waiting > 0
    seconds = time.monotonic() - started
    await victim.done(vm, timeout)
    return seconds, late


async def table_leak(*, mitigation: str, victim: TableVictim, channels: Sequence[str] = CHANNELS,
                     out: Callable[[str], None] = print, timeout: float = 60.0) -> list[DictionaryResult]:
    """Boot a host in ``mitigation`` mode, run the table victim once, sample every store through
    each channel and decode each."""
    if not channels or set(channels) - set(CHANNELS):
        raise AttackError(f"channels are {', '.join(CHANNELS)}, got {', '.join(channels) or 'none'}")
    host = Host(keyid_bits=6, mitigation=mitigation)
    serial = host.keys.add("table-victim", "type=cpu", tenant="victim")
    mapping = HostMapping(host)
    machine: Callable[[MachineConfig], EncryptedMachine] = functools.partial(
        EncryptedMachine, host, key_serial=serial, tenant="victim")
    results = [DictionaryResult(c, mitigation, victim.secret, victim.width) for c in channels]
    async with Tracer() as tracer, await launch_machine(victim.config(), tracer=tracer, machine=machine) as vm:
        gpa = await victim.ready(vm, timeout)
        block = gpa - gpa % XTS_BLOCK
        _, hpa = check_target(vm.guest, block)
        sample: dict[str, Callable[[], bytes]] = {
            "bus": lambda: vm.guest.dram(block, XTS_BLOCK),
            "host": lambda: mapping.read(vm.guest, block, XTS_BLOCK),
        }
        out(f"watching stores to GPA {gpa:#x}; sampling its 16-byte XTS block (HPA {hpa + block % 64:#x}) at each "
            f"one through: " + ", ".join(f"{c} ({ATTACK_OF_CHANNEL[c]})" for c in channels))
        for run in range(1, RUNS + 1):
            for r in results:
                r.samples, r.runs = [], run
            seconds, late = await _observe_run(vm, tracer, victim, gpa, results, sample, timeout, run)
            if not late:
                break
            out(f"run {run}: {late} of {victim.stores} samples may have come after the guest's next store; "
                f"running again" + (" with slower steps" if victim.guest == "baremetal" else ""))
    for r in results:
        r.seconds = seconds
        r.recovered = decode(r.samples, victim.width)
        out(f"secret    {r.secret}")
        out(f"recovered {r.recovered}")
        out(r.summary())
    return results


__all__ = ["CHANNELS", "DictionaryResult", "decode", "table_leak"]
