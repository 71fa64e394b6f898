"""What a bus agent (a DIMM interposer, a DMA-capable device on the memory bus) does to a VM.

It reads and writes DRAM, never through a KeyID: :meth:`PhysicalMemory.read_dram` and
``write_dram``. Every address is checked against the target VM first, so an attack never
touches another VM's memory; a VM whose KeyID does not encrypt has nothing to attack.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..arch.addresses import CACHE_LINE_SIZE
from ..errors import AddressError, MktmeError
from ..host.guest import EncryptedGuest


class AttackError(MktmeError):
    """The attack cannot be run as asked (bad address, nothing encrypted, never written)."""


@dataclass(frozen=True)
class LineRecord:
    """The DRAM content of one 64-byte line of a VM, as the bus carried it."""

    vm: str
    gpa: int
    hpa: int
    ciphertext: bytes


def check_target(guest: EncryptedGuest, gpa: int) -> tuple[int, int]:
    """(line GPA, line HPA) of ``gpa`` in ``guest``; ``AttackError`` when it cannot be attacked."""
    kind = guest.describe_key()["type"]
    if kind in ("no-encrypt", "clear"):
        raise AttackError(f"VM {guest.name} runs without MKTME encryption (KeyID {guest.keyid} is {kind}): "
                          "its DRAM is plaintext, there is nothing to attack")
    line = gpa - gpa % CACHE_LINE_SIZE
    try:
        hpa = int(guest.hpa_of(line, CACHE_LINE_SIZE))
    except AddressError:
        raise AttackError(f"GPA {gpa:#x} is not RAM of VM {guest.name}") from None
    return line, hpa


def record_line(guest: EncryptedGuest, gpa: int) -> LineRecord:
    """Record the ciphertext of the line holding ``gpa`` (``AttackError`` if never written)."""
    line, hpa = check_target(guest, gpa)
    offset = hpa - guest.hpa_base
    if not guest.data_extents(offset, CACHE_LINE_SIZE):      # a hole of the RAM backend
        raise AttackError(f"the line at GPA {line:#x} of VM {guest.name} was never written: "
                          "its ciphertext is the encryption of zeros, there is nothing to replay")
    return LineRecord(guest.name, line, hpa, guest.platform.memory.read_dram(hpa, CACHE_LINE_SIZE))


def replay_line(guest: EncryptedGuest, record: LineRecord) -> None:
    """Write ``record``'s ciphertext back into DRAM at its line (the VM must be the same one)."""
    if record.vm != guest.name:
        raise AttackError(f"the record is of VM {record.vm}, not {guest.name}")
    line, hpa = check_target(guest, record.gpa)
    if hpa != record.hpa:
        raise AttackError(f"GPA {record.gpa:#x} of VM {guest.name} moved from HPA {record.hpa:#x} to {hpa:#x}")
    guest.platform.memory.write_dram(hpa, record.ciphertext)
