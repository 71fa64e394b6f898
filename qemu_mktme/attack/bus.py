"""The attacker's primitives over a VM's memory, with the checks that keep an attack on its target.

- A **bus agent** (a DIMM interposer) reads and writes DRAM, never through a KeyID:
  :func:`record_line` / :func:`replay_line`, on the data bits alone or on data *and* metadata
  (ECC / MAC) bits (``metadata=True``: :meth:`PhysicalMemory.read_dram_line`).
- **Host software** (:class:`HostMapping`) maps physical memory through a KeyID the host
  programmed ``no-encrypt``, so its loads return what DRAM holds: a victim's ciphertext
  (CipherLeaks), or, through a DIMM alias, the ciphertext of a victim line from an address that
  is not the victim's (BadRAM, Battering RAM). It is a CPU access: the memory controller's
  checks (owner bit, ciphertext hiding, MAC) apply to it.

Every address is checked against the target VM first, so an attack never touches another VM's
memory; a VM whose KeyID does not encrypt has nothing to attack.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..arch.addresses import CACHE_LINE_SIZE, HPA, KeyID
from ..engine.memory import LineMeta
from ..errors import AddressError, MktmeError
from ..host.guest import EncryptedGuest
from ..host.host import Host


class AttackError(MktmeError):
    """The attack cannot be run as asked (bad address, nothing encrypted, never written)."""


@dataclass(frozen=True)
class LineRecord:
    """The DRAM content of one 64-byte line of a VM, as the bus carried it."""

    vm: str
    gpa: int
    hpa: int
    ciphertext: bytes
    meta: LineMeta | None = None        # the metadata bits too (``record_line(metadata=True)``)


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


def record_line(guest: EncryptedGuest, gpa: int, *, metadata: bool = False) -> LineRecord:
    """Record the ciphertext of the line holding ``gpa`` (``AttackError`` if never written);
    with ``metadata``, its metadata bits too."""
    line, hpa = check_target(guest, gpa)
    offset = hpa - guest.hpa_base
    if not guest.data_extents(offset, CACHE_LINE_SIZE):      # a hole of the RAM backend
        raise AttackError(f"the line at GPA {line:#x} of VM {guest.name} was never written: "
                          "its ciphertext is the encryption of zeros, there is nothing to replay")
    if metadata:
        data, meta = guest.platform.memory.read_dram_line(hpa)
        return LineRecord(guest.name, line, hpa, data, meta)
    return LineRecord(guest.name, line, hpa, guest.platform.memory.read_dram(hpa, CACHE_LINE_SIZE))


def replay_line(guest: EncryptedGuest, record: LineRecord) -> None:
    """Write ``record``'s ciphertext back into DRAM at its line (the VM must be the same one)."""
    if record.vm != guest.name:
        raise AttackError(f"the record is of VM {record.vm}, not {guest.name}")
    line, hpa = check_target(guest, record.gpa)
    if hpa != record.hpa:
        raise AttackError(f"GPA {record.gpa:#x} of VM {guest.name} moved from HPA {record.hpa:#x} to {hpa:#x}")
    guest.platform.memory.write_dram(hpa, record.ciphertext, meta=record.meta)


def hidden(data: bytes) -> bool:
    """Whether a host read returned a fill pattern rather than ciphertext (the TD-owner bit's
    zeros, ciphertext hiding's 0xFF): 16 equal bytes of AES output happen with odds of 2^-120."""
    return len(data) >= 16 and data in (b"\x00" * len(data), b"\xff" * len(data))


class HostMapping:
    """Host software's view of physical memory through a ``no-encrypt`` KeyID it programs
    (freed with :meth:`close`). ``alias_bit``: it maps the *ghost* of a victim address (the
    address that differs in that bit), which only reaches the victim's cell while the DIMM map
    aliases that bit."""

    def __init__(self, host: Host, *, alias_bit: int | None = None, name: str = "attacker-raw-view") -> None:
        self.host = host
        self.alias_bit = alias_bit
        self.serial = host.keys.add(name, "type=no-encrypt", tenant="host")
        self.keyid = KeyID(int(str(host.keys.describe(self.serial)["keyid"])))

    def address(self, guest: EncryptedGuest, gpa: int) -> tuple[int, int]:
        """(line GPA, the physical address this mapping uses for it)."""
        line, hpa = check_target(guest, gpa)
        return line, hpa if self.alias_bit is None else hpa ^ 1 << self.alias_bit

    def read(self, guest: EncryptedGuest, gpa: int, nbytes: int = CACHE_LINE_SIZE) -> bytes:
        """A host load of ``nbytes`` at ``gpa``'s line (through the ghost address with an alias)."""
        line, pa = self.address(guest, gpa)
        memory = guest.platform.memory
        return memory.read(guest.layout.compose(HPA(pa + (gpa - line)), self.keyid), nbytes)

    def write(self, guest: EncryptedGuest, gpa: int, data: bytes) -> None:
        """A host store of ``data`` at ``gpa``'s line (through the ghost address with an alias)."""
        line, pa = self.address(guest, gpa)
        guest.platform.memory.write(guest.layout.compose(HPA(pa + (gpa - line)), self.keyid), data)

    def close(self) -> None:
        self.host.keys.revoke(self.serial, tenant="host")
