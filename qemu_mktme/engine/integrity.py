"""Per-line integrity for ``Platform(integrity="mac")``: what TDX adds on top of MKTME, modelled.

MKTME alone has no integrity: ciphertext written back over a line decrypts to the old plaintext.
This model adds a MAC per 64-byte line, as TDX's "cryptographic integrity" does:

* **tag = SHA3-256(K_keyid || HPA || ciphertext)** truncated to :data:`TAG_BITS` (28, as TDX):
  a prefix-keyed SHA-3 MAC (sound for SHA-3, which has no length extension; KMAC's idea without
  its encoding), a third of HMAC's cost per line. ``K_keyid`` is a per-KeyID integrity key drawn at random when PCONFIG programs the KeyID
  (and for KeyID 0 at activation); reprogramming a KeyID makes every older tag of it fail.
* The memory controller writes the tag with the line on every CPU write (through the KeyID of the
  write) and checks it on every CPU read (through the KeyID of the read). A mismatch **poisons**
  the line: the read raises :class:`~qemu_mktme.errors.MachineCheck` and the data never reaches
  the CPU. A full-line CPU write through a KeyID stores a fresh tag and so clears the poison.
* **Where tags live** (model decision, and where it differs from TDX): tags are held by the
  memory controller, out of reach of the DRAM side (``PhysicalMemory.write_dram``, the bus
  interposer). On TDX the MAC sits in the DIMM's ECC/metadata bits, so an interposer that
  records and replays a line *together with its metadata* passes the check: TDX does not claim
  protection against physical replay. Here a replay is always caught, which is what the
  comparison in ``qemu-mktme attack replay`` shows. Other differences: one integrity key per
  KeyID on the whole platform (not per package), our SHA-3 construction rather than TDX's, and no TD-owner bit ("logical integrity"): a read through another KeyID fails
  the MAC instead of returning zeros.
* **Attached CPU views** (a live guest's RAM, see :mod:`.memory`) hold plaintext the guest
  writes without the engine seeing it: their tags are *implicit* (the tag of
  ``encrypt(buffer)`` under the attachment's KeyID, always valid, as if the controller had
  tagged each guest store). A line becomes explicit only when the DRAM side writes it, or a CPU
  write through another KeyID lands on it: then its tag is stored here and checked. For a
  tampered attached line the buffer is left as it was (the CPU must never receive the tampered
  data) and the tampered ciphertext is kept as the line's DRAM content.

Pure Python over ``hashlib``; nothing here runs per guest access.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass

TAG_BITS = 28
_TAG_MASK = (1 << TAG_BITS) - 1
LINE = 64


@dataclass(frozen=True)
class Poison:
    """A line whose stored tag does not match its DRAM content under ``keyid``."""

    hpa: int
    keyid: int
    cause: str          # "dram-write" (bus tampering / replay) or "foreign-write" (another KeyID)


PoisonHook = Callable[[Poison], None]
"""hook(poison): a line of an attached CPU view will fail its check at the next CPU access."""


class LineIntegrity:
    """Integrity keys per KeyID and the explicit tags (and tampered DRAM lines) of attached views."""

    def __init__(self, rng: Callable[[int], bytes] = secrets.token_bytes) -> None:
        self._rng = rng
        self._keys: dict[int, bytes] = {}
        self.tags: dict[int, int] = {}          # line HPA -> stored tag (explicit lines)
        self.dram: dict[int, bytes] = {}        # line HPA -> tampered ciphertext of an attached line
        self.verified: dict[int, int] = {}      # line HPA -> KeyID it passes for (until written again)
        self.hooks: list[PoisonHook] = []
        self.checks = 0
        self.failures = 0

    def __repr__(self) -> str:
        return f"<LineIntegrity {TAG_BITS}-bit MAC, {len(self.tags)} explicit lines, {len(self.dram)} tampered>"

    def rekey(self, keyid: int) -> None:
        """A fresh integrity key for ``keyid`` (PCONFIG programmed it): its older tags now fail."""
        self._keys[keyid] = self._rng(32)
        for line in [h for h, k in self.verified.items() if k == keyid]:
            del self.verified[line]

    def tag(self, keyid: int, hpa: int, ciphertext: bytes) -> int:
        """The MAC of one 64-byte line of ciphertext at ``hpa`` under ``keyid``'s integrity key."""
        key = self._keys.get(keyid)
        if key is None:                       # never programmed: an unknown per-boot key
            key = self._keys[keyid] = self._rng(32)
        digest = hashlib.sha3_256(key + hpa.to_bytes(8, "little") + ciphertext).digest()
        return int.from_bytes(digest[:4], "little") & _TAG_MASK

    def store(self, keyid: int, hpa: int, ciphertext: bytes) -> None:
        """A CPU write through ``keyid`` left ``ciphertext`` at line ``hpa``: tag it."""
        self.tags[hpa] = self.tag(keyid, hpa, ciphertext)
        self.dram.pop(hpa, None)
        self.verified[hpa] = keyid

    def forget(self, start: int, end: int) -> None:
        """Lines in [start, end) are implicit again (written through their attachment's KeyID)."""
        if not self.tags and not self.dram and not self.verified:
            return
        first = start - start % LINE
        for table in (self.tags, self.dram, self.verified):
            if not table:
                continue
            if (end - first) // LINE <= len(table):
                for line in range(first, end, LINE):
                    table.pop(line, None)
            else:
                for line in [h for h in table if start <= h < end]:
                    del table[line]

    def explicit(self, start: int, end: int) -> list[int]:
        """Explicit lines in [start, end), sorted."""
        if not self.tags:
            return []
        first = start - start % LINE
        if (end - first) // LINE <= len(self.tags):
            return [h for h in range(first, end, LINE) if h in self.tags]
        return sorted(h for h in self.tags if start <= h < end)

    def check(self, keyid: int, hpa: int, ciphertext: bytes, stored: int) -> bool:
        """Whether ``ciphertext`` at line ``hpa`` read through ``keyid`` matches ``stored``."""
        self.checks += 1
        ok = self.tag(keyid, hpa, ciphertext) == stored
        self.failures += not ok
        if ok:
            self.verified[hpa] = keyid
        return ok

    def tampered(self, hpa: int) -> None:
        """The DRAM side wrote line ``hpa``: it must be checked again."""
        self.verified.pop(hpa, None)

    def notify(self, poison: Poison) -> None:
        for hook in list(self.hooks):
            hook(poison)
