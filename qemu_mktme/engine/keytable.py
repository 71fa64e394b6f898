"""One package's MKTME key table and the ciphers memory uses per KeyID.

A table maps KeyID -> :class:`KeyEntry`; PCONFIG replaces the whole mapping at once (copy on
write), so a reader never sees it half updated. A :class:`LineCipher` turns plaintext lines into
what DRAM holds and back; ``PLAINTEXT`` is the identity (NO_ENCRYPT, bypass, exclusion range).
Key bytes stay inside :class:`~qemu_mktme.engine.xts.XtsKey`: nothing here prints them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import numpy.typing as npt

from ..arch.msr import Algorithm
from .xts import XtsKey, decrypt_lines, encrypt_lines

U8Array = npt.NDArray[np.uint8]


class LineCipher:
    """What the encryption engine does to whole lines of one KeyID (identity here)."""

    name = "plaintext"

    def encrypt(self, src: U8Array, hpa: int, out: U8Array) -> None:
        if out is not src:
            np.copyto(out, src)

    def decrypt(self, src: U8Array, hpa: int, out: U8Array) -> None:
        if out is not src:
            np.copyto(out, src)

    def __repr__(self) -> str:
        return f"<{self.name}>"


PLAINTEXT = LineCipher()


class XtsLineCipher(LineCipher):
    """AES-XTS per line with the line's HPA as tweak."""

    def __init__(self, key: XtsKey, name: str) -> None:
        self.key = key
        self.name = name

    def encrypt(self, src: U8Array, hpa: int, out: U8Array) -> None:
        encrypt_lines(self.key, src, hpa, out=out)

    def decrypt(self, src: U8Array, hpa: int, out: U8Array) -> None:
        decrypt_lines(self.key, src, hpa, out=out)


class KeyMode(Enum):
    UNPROGRAMMED = "unprogrammed"  # never programmed since boot: an unknown per-boot key
    ENCRYPT = "encrypt"  # KEYID_SET_KEY_DIRECT or KEYID_SET_KEY_RANDOM
    CLEAR = "clear"  # KEYID_CLEAR_KEY: behaves as KeyID 0 (TME key or bypass)
    NO_ENCRYPT = "no-encrypt"  # KEYID_NO_ENCRYPT: plaintext in DRAM


@dataclass(frozen=True)
class KeyEntry:
    """A programmed KeyID. ``key`` is set for ENCRYPT only; ``random`` tells RANDOM from DIRECT."""

    mode: KeyMode
    algorithm: Algorithm | None = None
    random: bool = False
    cipher: LineCipher | None = field(default=None, repr=False, compare=False)

    @property
    def key(self) -> XtsKey | None:
        return self.cipher.key if isinstance(self.cipher, XtsLineCipher) else None

    def same_programming(self, other: KeyEntry) -> bool:
        """Same mode, algorithm and key bytes (compared in constant time).

        Two RANDOM keys count as the same programming: every package draws its own key by
        design, and a line is only ever handled by its home package's engine.
        """
        if (self.mode, self.algorithm, self.random) != (other.mode, other.algorithm, other.random):
            return False
        if self.random:
            return True
        return self.key is None and other.key is None or (
            self.key is not None and other.key is not None and self.key == other.key
        )

    def describe(self) -> str:
        alg = f" {self.algorithm.label}" if self.algorithm is not None else ""
        how = " (random)" if self.random else ""
        return f"{self.mode.value}{alg}{how}"


UNPROGRAMMED = KeyEntry(KeyMode.UNPROGRAMMED)


class KeyTable:
    """The key table of one package: an immutable mapping replaced whole on each update."""

    def __init__(self) -> None:
        self.entries: dict[int, KeyEntry] = {}
        self.busy = False  # the table lock, held by another logical processor

    def get(self, keyid: int) -> KeyEntry:
        return self.entries.get(keyid, UNPROGRAMMED)

    def updated(self, keyid: int, entry: KeyEntry) -> dict[int, Any]:
        new = dict(self.entries)
        new[keyid] = entry
        return new

    def __repr__(self) -> str:
        return f"KeyTable({len(self.entries)} KeyIDs programmed{', busy' if self.busy else ''})"
