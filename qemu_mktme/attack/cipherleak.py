"""The ciphertext side channel (``qemu-mktme attack cipherleak``), after CipherLeaks (USENIX
Security 2021), on MKTME's deterministic AES-XTS.

The Linux ``bits`` workload stores each bit of a secret into one fixed 64-bit variable. The
hypervisor sees each write's ciphertext: the tracer's watch finds every guest store to the
variable, and at each one the attack loads the variable's 16-byte XTS block through a KeyID the
host programmed ``no-encrypt`` (:class:`~.bus.HostMapping`: host software, as in CipherLeaks,
where the hypervisor reads the guest's save area). No key is used: the program is public, so the attacker
knows it zeroes the variable before it starts, and the ciphertext sampled then is "0". Equal
ciphertext at the same address means equal plaintext, so each later sample decodes as 0 when it
equals that reference and 1 otherwise. With the guest's per-write counter in the same block (the
published mitigation) every sample differs from the reference and from each other: the attacker
learns nothing and its guess is right only as often as chance allows.

Both passes run in one boot (the workload asks for each pass on its console).
"""

from __future__ import annotations

import asyncio
import functools
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .. import images
from ..errors import AccessTimeout
from ..host.host import Host
from ..live.encrypted import EncryptedMachine
from ..live.launch import launch_machine
from ..qemu.machine import MachineConfig
from ..trace.tracer import Tracer
from .bus import AttackError, HostMapping, check_target

XTS_BLOCK = 16
_READY = re.compile(images.LINUX.marker(r"bits ready .*\n"))


@dataclass
class LeakResult:
    """One pass: the secret, what the attacker recovered from ciphertext alone, and how fast."""

    mitigated: bool
    secret: str
    recovered: str = ""
    samples: list[bytes] = field(default_factory=list)
    distinct_ciphertexts: int = 0
    seconds: float = 0.0

    @property
    def correct(self) -> int:
        return sum(a == b for a, b in zip(self.secret, self.recovered))

    @property
    def fraction(self) -> float:
        return self.correct / len(self.secret) if self.secret else 0.0

    def summary(self) -> str:
        what = "with the per-write counter" if self.mitigated else "plain"
        return (f"{what}: bits recovered {self.correct}/{len(self.secret)} ({self.fraction:.0%}) in "
                f"{self.seconds:.2f} s; {self.distinct_ciphertexts} distinct ciphertexts in {len(self.samples)} stores")


def decode(reference: bytes, samples: Sequence[bytes]) -> str:
    """Bits from ciphertext equality alone: 0 where a sample equals the known-zero reference."""
    return "".join("0" if s == reference else "1" for s in samples)


def random_secret(nbits: int) -> str:
    return "".join(str(secrets.randbits(1)) for _ in range(nbits))


async def cipherleak(*, secret: str, passes: Sequence[bool] = (False, True), period: float = 0.05,
                     out: Callable[[str], None] = print, timeout: float = 60.0,
                     mitigation: str = "none") -> list[LeakResult]:
    """Boot the ``bits`` guest under MKTME (a platform ``mitigation`` mode) and attack each
    pass (``True``: mitigated)."""
    if not secret or set(secret) - {"0", "1"}:
        raise AttackError(f"the secret must be a string of 0 and 1, got {secret!r}")
    host = Host(keyid_bits=6, mitigation=mitigation)
    serial = host.keys.add("bits-victim", "type=cpu", tenant="victim")
    mapping = HostMapping(host)
    boot = images.guest_boot("linux", workload="bits", params={"secret": secret, "period": f"{period:g}"})
    config = MachineConfig(boot=boot, memory=images.default_memory("linux"), name="victim")
    machine = functools.partial(EncryptedMachine, host, key_serial=serial, tenant="victim")
    results = []
    async with Tracer() as tracer, await launch_machine(config, tracer=tracer, machine=machine) as vm:
        m = await vm.console.wait_for(images.LINUX.marker(r"bits at (0x[0-9a-f]+) n=\d+\n"), timeout)
        addr = int(m[1], 16)
        block = addr - addr % XTS_BLOCK
        check_target(vm.guest, block)
        out(f"watching stores to GPA {addr:#x}; loading its 16-byte block (HPA {int(vm.guest.hpa_of(block)):#x}) "
            f"through no-encrypt KeyID {mapping.keyid} at each one")
        for mitigated in passes:
            await vm.console.wait_for(_READY, timeout)
            await tracer.flush()
            reference = mapping.read(vm.guest, block, XTS_BLOCK)   # the program zeroed it: known "0"
            r = LeakResult(mitigated, secret)
            async with tracer.watch(addr, 8, on="store") as stores:
                await vm.console.write("1\n" if mitigated else "0\n")
                started = None
                while len(r.samples) < len(secret):
                    try:
                        await _next(stores, timeout)
                    except AccessTimeout:
                        raise AttackError(f"the guest made {len(r.samples)} of {len(secret)} stores") from None
                    r.samples.append(mapping.read(vm.guest, block, XTS_BLOCK))  # the hypervisor's load
                    started = started or time.monotonic()
                r.seconds = time.monotonic() - (started or time.monotonic())
            r.recovered = decode(reference, r.samples)
            r.distinct_ciphertexts = len(set(r.samples))
            await vm.console.wait_for(images.LINUX.marker(r"bits done n=\d+ mitigate=[01]\n"), timeout)
            out(f"secret    {secret}")
            out(f"recovered {r.recovered}")
            out(r.summary())
            results.append(r)
        await vm.console.wait_for(_READY, timeout)
        await vm.console.write("q\n")
    return results


async def _next(stores, timeout: float):  # type: ignore[no-untyped-def]
    try:
        return await asyncio.wait_for(anext(stores), timeout)
    except TimeoutError:
        raise AccessTimeout(stores.gpa, stores.nbytes, "store", timeout) from None


__all__ = ["LeakResult", "cipherleak", "decode", "random_secret"]
