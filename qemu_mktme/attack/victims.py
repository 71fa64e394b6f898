"""The victims of the attack lab: unmodified guests running a program whose secret matters.

Two kinds, each on the Linux guest (stock kernel and busybox: the real thing, seconds to boot)
and on the bare-metal guest (our tiny long-mode guest: a fraction of a second, for the quick
matrix in ``make test``):

- a **PIN victim** keeps its wrong-PIN counter in RAM (three wrong PINs lock it): the Linux
  ``pin`` workload, the bare-metal ``pinset``/``pin`` commands. Rolling the counter back gives
  unlimited tries.
- a **table victim** stores, into one 64-bit variable, first each entry of a public table (known
  values, in a known order), then the entry each W-bit window of a secret indexes, as a
  fixed-window exponentiation does: the Linux ``table`` workload, the bare-metal ``table``
  command. Equal ciphertext at one address means equal plaintext, so the first stores give a
  dictionary and the rest decode.

The attacker types on the console only what a user of the victim would (PINs; "run").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .. import images
from ..qemu.machine import MachineConfig
from .bus import AttackError

GUESTS = ("baremetal", "linux")
PIN_LIMIT = 3
BAREMETAL_MEMORY = "256M"
BAREMETAL_PIN_COUNTER = 0x500000
BAREMETAL_TABLE_VARIABLE = 0x501000
BAREMETAL_ROUNDS_PER_SECOND = 25_000_000
"""Busy rounds per second of the bare-metal guest under TCG with the shim (measured: ~27 M)."""
_LINUX_ANSWER = re.compile(images.LINUX.marker(r"pin (wrong: \S*|ok: unlocked|locked after \d+ wrong PINs)\n"))
_LINUX_PROMPT = re.compile(images.LINUX.marker(r"pin\? \(wrong so far: (\d+) of 3\)\n"))
_BAREMETAL_ANSWER = re.compile(r"ok pin (wrong (\d+)|unlocked|locked (\d+))\n")


def _check_guest(guest: str) -> None:
    if guest not in GUESTS:
        raise AttackError(f"the victim runs on one of {', '.join(GUESTS)}, not {guest!r}")


def table_entry(index: int) -> int:
    """Entry ``index`` of the victims' public table (both guests compute the same)."""
    return ((index + 1) * 0x0101010101010101 ^ 0x5DEECE66D) & (1 << 64) - 1


@dataclass(frozen=True)
class Answer:
    """The guest's answer to one PIN: ``kind`` wrong / unlocked / locked, and the wrong PINs it
    counts after it (as it printed them)."""

    kind: str
    wrong: int
    line: str


class PinVictim:
    """A guest whose secret is behind a PIN with a retry counter in RAM."""

    def __init__(self, guest: str, pin: str) -> None:
        _check_guest(guest)
        if not re.fullmatch(r"\d{4}", pin):
            raise AttackError(f"a PIN is 4 digits, got {pin!r}")
        self.guest, self.pin = guest, pin

    def config(self, name: str = "victim") -> MachineConfig:
        if self.guest == "linux":
            boot = images.guest_boot("linux", workload="pin", params={"secret": self.pin})
            return MachineConfig(boot=boot, memory=images.default_memory("linux"), name=name)
        return MachineConfig(boot=images.guest_boot("baremetal"), memory=BAREMETAL_MEMORY, name=name)

    async def ready(self, vm, timeout: float) -> int:  # type: ignore[no-untyped-def]
        """Wait until the victim asks for its first PIN; returns the counter's GPA."""
        if self.guest == "linux":
            m = await vm.console.wait_for(images.LINUX.marker(r"pin counter at (0x[0-9a-f]+)\n"), timeout)
            await vm.console.wait_for(_LINUX_PROMPT, timeout)
            return int(m[1], 16)
        await vm.console.wait_for(re.escape(images.BAREMETAL.prompt), timeout)
        await vm.console.command(f"pinset {BAREMETAL_PIN_COUNTER:#x} {int(self.pin)}", r"ok pinset .*\n", timeout)
        return BAREMETAL_PIN_COUNTER

    async def guess(self, vm, guess: str, timeout: float) -> Answer:  # type: ignore[no-untyped-def]
        """Type one PIN and read the answer (cancel it when the VM stops on a machine check)."""
        if self.guest == "linux":
            mark = vm.console.mark()
            await vm.console.write(guess + "\n")
            m = await vm.console.wait_for(_LINUX_ANSWER, timeout, since=mark)
            text = m[1]
            if text.startswith("ok"):
                return Answer("unlocked", 0, m[0].strip())
            if text.startswith("locked"):
                return Answer("locked", PIN_LIMIT, m[0].strip())
            prompt = await vm.console.wait_for(_LINUX_PROMPT, timeout, since=mark)
            return Answer("wrong", int(prompt[1]), f"{m[0].strip()}; {prompt[0].strip()}")
        m = await vm.console.command(f"pin {int(guess)}", _BAREMETAL_ANSWER, timeout)
        if m[1] == "unlocked":
            return Answer("unlocked", 0, m[0].strip())
        if m[1].startswith("locked"):
            return Answer("locked", int(m[3]), m[0].strip())
        return Answer("wrong", int(m[2]), m[0].strip())


class TableVictim:
    """A guest that stores secret-indexed entries of a public table into one variable."""

    def __init__(self, guest: str, secret: str, width: int = 2, period: float = 0.05) -> None:
        _check_guest(guest)
        if not re.fullmatch(r"[01]{1,512}", secret):
            raise AttackError(f"the secret is 1 to 512 bits as 0 and 1, got {secret!r}")
        if width not in (1, 2, 3, 4):
            raise AttackError(f"the table window is 1 to 4 bits, got {width}")
        if len(secret) % width:
            raise AttackError(f"the secret's {len(secret)} bits are not whole {width}-bit windows")
        self.guest, self.secret, self.width, self.period = guest, secret, width, period

    @property
    def windows(self) -> int:
        return len(self.secret) // self.width

    @property
    def stores(self) -> int:
        """Stores to the variable in one run: the table, then one per window."""
        return (1 << self.width) + self.windows

    def config(self, name: str = "victim") -> MachineConfig:
        if self.guest == "linux":
            boot = images.guest_boot("linux", workload="table", params={
                "secret": self.secret, "width": self.width, "period": f"{self.period:g}"})
            return MachineConfig(boot=boot, memory=images.default_memory("linux"), name=name)
        return MachineConfig(boot=images.guest_boot("baremetal"), memory=BAREMETAL_MEMORY, name=name)

    async def ready(self, vm, timeout: float) -> int:  # type: ignore[no-untyped-def]
        """Wait until the victim can run; returns the variable's GPA."""
        if self.guest == "linux":
            m = await vm.console.wait_for(images.LINUX.marker(r"table at (0x[0-9a-f]+) n=\d+ width=\d\n"), timeout)
            await vm.console.wait_for(images.LINUX.marker(r"table ready .*\n"), timeout)
            return int(m[1], 16)
        await vm.console.wait_for(re.escape(images.BAREMETAL.prompt), timeout)
        return BAREMETAL_TABLE_VARIABLE

    async def run(self, vm, slower: int = 1) -> None:  # type: ignore[no-untyped-def]
        """Start one run (the stores follow; :meth:`done` waits for its end). The bare-metal
        victim's steps can be made ``slower`` times longer (the Linux one's period is fixed at boot)."""
        self._mark = vm.console.mark()
        if self.guest == "linux":
            await vm.console.write("r\n")
        else:
            # busy rounds between stores: about ``period`` seconds under TCG with the shim
            delay = max(1, int(self.period * slower * BAREMETAL_ROUNDS_PER_SECOND))
            await vm.console.write(f"table {BAREMETAL_TABLE_VARIABLE:#x} {self.secret} {self.width} {delay}\r")

    async def done(self, vm, timeout: float) -> None:  # type: ignore[no-untyped-def]
        """Wait for the end of the run and for the victim to be ready for the next one."""
        pattern = (images.LINUX.marker(r"table done n=\d+\n(.|\n)*") + images.LINUX.marker(r"table ready .*\n") if self.guest == "linux"
                   else r"ok table \d+\n(.|\n)*" + re.escape(images.BAREMETAL.prompt))
        await vm.console.wait_for(pattern, timeout, since=self._mark)


__all__ = ["GUESTS", "PIN_LIMIT", "Answer", "PinVictim", "TableVictim", "table_entry"]
