"""KeyID allocation and sharing: the cloud table (tenant, key) -> KeyID from the KVM Forum talk.

KeyIDs are scarce (6 KeyID bits give 63). VMs of one tenant with one key share a KeyID; a KeyID
goes back to the free pool when its last user goes, and is reused least-recently-freed first, so
that a KeyID whose lines may still sit in caches is handed out as late as possible (software
must still flush, see mktme.md §4). When none is free the answer is ENOKEY.

Keys are identified by a fingerprint (a keyed hash with a per-allocator random salt), so this
table never holds key material.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import hmac
import os
from dataclasses import dataclass, field

from ..errors import KeyServiceError


@dataclass
class Allocation:
    """One KeyID in use: whose, for which key, and who uses it."""

    keyid: int
    tenant: str
    fingerprint: bytes = field(repr=False)
    users: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def refcount(self) -> int:
        return sum(self.users.values())


class KeyIdAllocator:
    """KeyIDs 1..max_keyid; KeyID 0 is the platform (TME) KeyID and never allocated."""

    def __init__(self, max_keyid: int) -> None:
        if max_keyid < 1:
            raise ValueError(f"max_keyid must be >= 1 (MKTME enabled with KeyID bits), got {max_keyid}")
        self.max_keyid = max_keyid
        self._free: collections.deque[int] = collections.deque(range(1, max_keyid + 1))
        self._by_key: dict[tuple[str, bytes], Allocation] = {}
        self._by_keyid: dict[int, Allocation] = {}
        self._salt = os.urandom(32)

    def fingerprint(self, *parts: bytes | str) -> bytes:
        """A key's identity for sharing decisions, without keeping the key."""
        mac = hmac.new(self._salt, digestmod=hashlib.sha256)
        for part in parts:
            data = part.encode() if isinstance(part, str) else part
            mac.update(len(data).to_bytes(4, "little") + data)
        return mac.digest()

    def lookup(self, tenant: str, fingerprint: bytes) -> Allocation | None:
        return self._by_key.get((tenant, fingerprint))

    def acquire(self, tenant: str, fingerprint: bytes, user: str) -> tuple[Allocation, bool]:
        """Reference the KeyID for (tenant, key), allocating one if needed; (allocation, is_new).

        ``KeyServiceError(ENOKEY)`` when a new KeyID is needed and none is free.
        """
        alloc = self._by_key.get((tenant, fingerprint))
        new = alloc is None
        if alloc is None:
            if not self._free:
                raise KeyServiceError(errno.ENOKEY, f"all {self.max_keyid} KeyIDs are in use")
            keyid = self._free.popleft()
            alloc = Allocation(keyid, tenant, fingerprint)
            self._by_key[(tenant, fingerprint)] = alloc
            self._by_keyid[keyid] = alloc
        alloc.users[user] += 1
        return alloc, new

    def release(self, keyid: int, user: str) -> bool:
        """Drop one reference of ``user``; True when the KeyID became free (clear its key)."""
        alloc = self._by_keyid.get(keyid)
        if alloc is None or alloc.users[user] <= 0:
            raise ValueError(f"KeyID {keyid} holds no reference of {user!r}")
        alloc.users[user] -= 1
        if alloc.users[user] == 0:
            del alloc.users[user]
        if alloc.refcount:
            return False
        del self._by_keyid[keyid]
        del self._by_key[(alloc.tenant, alloc.fingerprint)]
        self._free.append(keyid)
        return True

    def rename_user(self, keyid: int, old: str, new: str) -> None:
        """Move one reference from ``old`` to ``new`` (a handle passing its KeyID to a VM)."""
        alloc = self._by_keyid[keyid]
        if alloc.users[old] <= 0:
            raise ValueError(f"KeyID {keyid} holds no reference of {old!r}")
        alloc.users[old] -= 1
        if not alloc.users[old]:
            del alloc.users[old]
        alloc.users[new] += 1

    def allocation(self, keyid: int) -> Allocation | None:
        return self._by_keyid.get(keyid)

    @property
    def in_use(self) -> list[Allocation]:
        """Who uses which KeyID, by KeyID."""
        return [self._by_keyid[k] for k in sorted(self._by_keyid)]

    @property
    def free_count(self) -> int:
        return len(self._free)

    def next_free(self) -> int | None:
        """The KeyID the next allocation would get (least recently freed)."""
        return self._free[0] if self._free else None
