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
* **Where tags live**: in the line's metadata bits (the DIMM's ECC bits on TDX). A bus
  interposer that writes the data bits alone (``PhysicalMemory.write_dram``) leaves the tag as
  the controller wrote it, so the next read fails; one that records and replays data *and*
  metadata (``read_dram_line`` / ``write_dram(meta=)``) passes the check, as on TDX, which does
  not claim protection against physical replay. Only freshness (below) catches that. Other
  differences from TDX: one integrity key per KeyID on the whole platform (not per package), our
  SHA-3 construction rather than TDX's; only reads through private KeyIDs are checked (TDX checks
  TD private KeyIDs); the TD-owner bit is a separate mode (``mac+owner``, :class:`Hiding`).
* **Attached CPU views** (a live guest's RAM, see :mod:`.memory`) hold plaintext the guest
  writes without the engine seeing it: their tags are *implicit* (the tag of
  ``encrypt(buffer)`` under the attachment's KeyID, always valid, as if the controller had
  tagged each guest store). A line becomes explicit only when the DRAM side writes it, or a CPU
  write through another KeyID lands on it: then its tag is stored here and checked. For a
  tampered attached line the buffer is left as it was (the CPU must never receive the tampered
  data) and the tampered ciphertext is kept as the line's DRAM content.

**Freshness** (``LineIntegrity(freshness=CounterTree())``, ``Platform(mitigation="freshness")``):
what SGX's memory encryption engine adds (Gueron, "A Memory Encryption Engine Suitable for General
Purpose Processors", 2016): a version counter per line, held in a counter tree whose root is on
the die (out of reach of the bus), enters the tweak (``HPA || version``) and the MAC (``K ||
HPA || version || ciphertext``). A write-back increments it, so equal plaintext never gives equal
ciphertext twice and a recorded line, data and MAC together, fails once its version moved on.
:class:`CounterTree` counts what that costs in extra memory accesses.

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
class Hiding:
    """Reads of another owner's lines do not return their ciphertext (``fill`` bytes instead).

    ``fill=0`` is TDX's TD-owner bit ("logical integrity": a read through a shared KeyID of a
    line a private KeyID wrote returns zeros); ``fill=0xFF`` is SEV-SNP's ciphertext hiding
    (host reads of guest memory see a constant). Model decision: the owner travels with the DRAM
    cell (TDX keeps the bit in the line's metadata), so an address alias does not get around it.
    """

    fill: int
    name: str


class CounterTree:
    """What an SGX-MEE-like counter tree costs, in extra memory accesses (a model, counted).

    Per protected line: one MAC line and one version line (8 versions or MACs per 64-byte line),
    then the tree's levels (arity 8) up to the root on the die; node lines are kept in an
    on-chip cache of ``cache_lines`` (LRU), where a walk stops. A read fetches the MAC line, the
    version line and the uncached nodes; a write also writes back the MAC line, the version
    line and every node up to the root (each holds a counter of the one below)."""

    ARITY = 8

    def __init__(self, protected_bytes: int = 1 << 30, cache_lines: int = 256) -> None:
        lines = max(1, protected_bytes // LINE)
        self.levels = 0                      # tree levels above the version lines, below the root
        n = -(-lines // self.ARITY)
        while n > self.ARITY:
            n = -(-n // self.ARITY)
            self.levels += 1
        self.cache_lines = cache_lines
        self._cache: dict[tuple[int, int], None] = {}
        self.accesses = 0                    # protected line accesses (reads + write-backs)
        self.extra = 0                       # extra memory accesses they cost

    def access(self, hpa: int, write: bool) -> int:
        """Count one access to the protected line at ``hpa``; returns its extra accesses."""
        extra = 1                            # the MAC line
        node = hpa // LINE
        for level in range(self.levels + 1):  # version line, then the tree's nodes
            node //= self.ARITY
            key = (level, node)
            if key in self._cache:
                self._cache[key] = self._cache.pop(key)
                if not write:
                    break
            else:
                extra += 1
                self._cache[key] = None
                if len(self._cache) > self.cache_lines:
                    del self._cache[next(iter(self._cache))]
        if write:
            extra += 1 + self.levels + 1     # MAC line, version line and every node written back
        self.accesses += 1
        self.extra += extra
        return extra

    def access_lines(self, hpa: int, nlines: int, write: bool) -> None:
        """Count ``nlines`` consecutive line accesses from ``hpa``: the first 4096 one by one,
        the rest at their average (a whole-RAM dump would otherwise cost a call per line)."""
        exact = min(nlines, 4096)
        before = self.extra
        for i in range(exact):
            self.access(hpa + i * LINE, write)
        if nlines > exact:
            extra = round((self.extra - before) / exact * (nlines - exact))
            self.extra += extra
            self.accesses += nlines - exact

    @property
    def per_access(self) -> float:
        return self.extra / self.accesses if self.accesses else 0.0


@dataclass(frozen=True)
class Poison:
    """A line whose stored tag does not match its DRAM content under ``keyid``."""

    hpa: int
    keyid: int
    cause: str          # "dram-write" (bus tampering / replay), "foreign-write" (another KeyID) or
                        # "alias-write" (a write through another address reaching the cell: a DIMM alias)


PoisonHook = Callable[[Poison], None]
"""hook(poison): a line of an attached CPU view will fail its check at the next CPU access."""


class LineIntegrity:
    """Integrity keys per KeyID and the explicit tags (and tampered DRAM lines) of attached views."""

    def __init__(self, rng: Callable[[int], bytes] = secrets.token_bytes, *,
                 freshness: CounterTree | None = None) -> None:
        self._rng = rng
        self.freshness = freshness
        self.versions: dict[int, int] = {}      # address -> version of a line the CPU wrote (on the die)
        self.epoch = 0                          # the version of attached lines (see .memory)
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

    def tag(self, keyid: int, hpa: int, ciphertext: bytes, version: int = 0) -> int:
        """The MAC of one 64-byte line of ciphertext at ``hpa`` under ``keyid``'s integrity key
        (with freshness, the line's ``version`` is covered too)."""
        key = self._keys.get(keyid)
        if key is None:                       # never programmed: an unknown per-boot key
            key = self._keys[keyid] = self._rng(32)
        counter = b"" if self.freshness is None else version.to_bytes(8, "little")
        digest = hashlib.sha3_256(key + hpa.to_bytes(8, "little") + counter + ciphertext).digest()
        return int.from_bytes(digest[:4], "little") & _TAG_MASK

    def store(self, keyid: int, hpa: int, ciphertext: bytes, version: int = 0) -> None:
        """A CPU write through ``keyid`` left ``ciphertext`` at line ``hpa``: tag it."""
        self.tags[hpa] = self.tag(keyid, hpa, ciphertext, version)
        self.dram.pop(hpa, None)
        self.verified[hpa] = keyid

    def forget(self, start: int, end: int) -> None:
        """Lines in [start, end) are implicit again (written through their attachment's KeyID)."""
        if not self.tags and not self.dram and not self.verified and not self.versions:
            return
        first = start - start % LINE
        for table in (self.tags, self.dram, self.verified, self.versions):
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

    def check(self, keyid: int, hpa: int, ciphertext: bytes, stored: int, version: int = 0) -> bool:
        """Whether ``ciphertext`` at line ``hpa`` read through ``keyid`` matches ``stored``."""
        self.checks += 1
        ok = self.tag(keyid, hpa, ciphertext, version) == stored
        self.failures += not ok
        if ok:
            self.verified[hpa] = keyid
        return ok

    def bump(self, hpa: int, current: int) -> int:
        """Freshness: a CPU write-back of the line at ``hpa`` whose version is ``current``: its
        next version, kept per line from now on (the caller counts the cost)."""
        assert self.freshness is not None
        version = self.versions[hpa] = current + 1
        self.verified.pop(hpa, None)
        return version

    def observed(self) -> None:
        """Freshness: attached lines were read from DRAM: each had a write-back before (their
        shared version, ``epoch``, moves on; checks passed before must be done again)."""
        self.epoch += 1
        self.verified.clear()

    def tampered(self, hpa: int) -> None:
        """The DRAM side wrote line ``hpa``: it must be checked again."""
        self.verified.pop(hpa, None)

    def notify(self, poison: Poison) -> None:
        for hook in list(self.hooks):
            hook(poison)
