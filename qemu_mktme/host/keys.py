"""The ``mktme`` key service: the proposed Linux key type, as the host kernel would run it.

User space (the cloud agent, QEMU) deals in **key handles** (key serials), never in KeyIDs. When
a key is added, the service finds or allocates the KeyID for (tenant, key) in the cloud table
(:mod:`.keyids`) and programs it with PCONFIG **on every package**, writing the
MKTME_KEY_PROGRAM_STRUCT into host memory, running the instruction, and wiping the struct. A
``cpu`` key is KEYID_SET_KEY_RANDOM, ``user`` KEYID_SET_KEY_DIRECT, ``clear`` KEYID_CLEAR_KEY,
``no-encrypt`` KEYID_NO_ENCRYPT. DEVICE_BUSY and ENTROPY_ERROR are retried a bounded number of
times; any other failure, or running out of retries, undoes what was programmed and is ENOKEY.

Errors carry the errno the kernel would return: EINVAL (bad payload), EACCES (another tenant's
key), EKEYREVOKED (revoked key), EBUSY (changing a key that guest memory uses), ENOKEY (no
KeyID, or programming failed), ENOENT (no such key).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
from dataclasses import dataclass, field

from ..arch import pconfig as pc
from ..arch.addresses import PAGE_SIZE
from ..errors import KeyServiceError
from ..engine.platform import Platform
from .keyids import Allocation, KeyIdAllocator
from ..keymaterial import algorithm_name
from .payload import KeyType, Payload, parse

log = logging.getLogger(__name__)

MAX_RETRIES = 16
_COMMANDS = {
    KeyType.CPU: pc.Command.KEYID_SET_KEY_RANDOM,
    KeyType.USER: pc.Command.KEYID_SET_KEY_DIRECT,
    KeyType.CLEAR: pc.Command.KEYID_CLEAR_KEY,
    KeyType.NO_ENCRYPT: pc.Command.KEYID_NO_ENCRYPT,
}
_RETRY = {pc.Status.DEVICE_BUSY, pc.Status.ENTROPY_ERROR}


@dataclass
class Key:
    """A key in the service. The payload (with key bytes for ``user``) never appears in repr."""

    serial: int
    description: str
    tenant: str
    payload: Payload = field(repr=False)
    keyid: int
    revoked: bool = False
    users: set[str] = field(default_factory=set)

    @property
    def user_ref(self) -> str:
        """The name under which this handle holds its KeyID reference."""
        return f"key:{self.serial}"

    def describe(self) -> dict[str, object]:
        """What ``keyctl describe`` would show, plus the (kernel-internal) KeyID for the host model."""
        return {
            "serial": self.serial, "description": self.description, "tenant": self.tenant,
            "type": self.payload.type.value,
            "algorithm": algorithm_name(self.payload.algorithm) if self.payload.algorithm is not None else None,
            "keyid": self.keyid, "state": "revoked" if self.revoked else "valid",
            "users": sorted(self.users),
        }


class KeyService:
    """Key handles over the platform's key tables. ``struct_hpa`` is a host page for the struct."""

    def __init__(self, platform: Platform, keyids: KeyIdAllocator, struct_hpa: int,
                 *, max_retries: int = MAX_RETRIES) -> None:
        if struct_hpa % PAGE_SIZE:
            raise ValueError("struct_hpa must be page aligned")
        self.platform = platform
        self.keyids = keyids
        self.struct_hpa = struct_hpa
        self.max_retries = max_retries
        self._keys: dict[int, Key] = {}
        self._serials = itertools.count(0x1000_0001 + int.from_bytes(os.urandom(2), "little") * 16)
        self.pconfig_calls = 0
        self.retries = 0

    # ------------------------------------------------------------------ add / update / revoke

    def add(self, description: str, payload: str | bytes | Payload, *, tenant: str) -> int:
        """``add_key("mktme", description, payload)``: a new handle (serial) for ``tenant``."""
        parsed = payload if isinstance(payload, Payload) else parse(payload)
        if not description:
            raise KeyServiceError(errno.EINVAL, "a key needs a description")
        serial = next(self._serials)
        alloc = self._bind(parsed, tenant, f"key:{serial}")
        self._keys[serial] = Key(serial, description, tenant, parsed, alloc.keyid)
        log.info("mktme: key %#x (%s) for tenant %s -> KeyID %d", serial, parsed, tenant, alloc.keyid)
        return serial

    def update(self, serial: int, payload: str | bytes | Payload, *, tenant: str) -> None:
        """``keyctl update``: new key material (or ``type=clear``) for an unused handle."""
        key = self._owned(serial, tenant)
        if key.users:
            raise KeyServiceError(errno.EBUSY, f"key {serial:#x} is in use by {', '.join(sorted(key.users))}")
        parsed = payload if isinstance(payload, Payload) else parse(payload)
        alloc = self._bind(parsed, tenant, f"key:{serial}:next")
        self.keyids.rename_user(alloc.keyid, f"key:{serial}:next", key.user_ref)
        self._drop(key.keyid, key.user_ref)
        key.payload, key.keyid = parsed, alloc.keyid

    def revoke(self, serial: int, *, tenant: str) -> None:
        """``keyctl revoke``: no new users; the KeyID goes once the last user has gone."""
        key = self._owned(serial, tenant)
        key.revoked = True
        if not key.users:
            self._retire(key)

    # ------------------------------------------------------------------ use by guest memory

    def use(self, serial: int, user: str, *, tenant: str) -> int:
        """Take a reference for ``user`` (e.g. a VM's memory) and return the KeyID to tag with.

        This is what ``encrypt_mprotect(addr, len, prot, serial)`` does inside the kernel.
        """
        key = self._owned(serial, tenant)
        if user in key.users:
            raise ValueError(f"{user!r} already uses key {serial:#x}")
        key.users.add(user)
        return key.keyid

    def unuse(self, serial: int, user: str) -> None:
        key = self._keys.get(serial)
        if key is None or user not in key.users:
            raise ValueError(f"{user!r} does not use key {serial:#x}")
        key.users.discard(user)
        if key.revoked and not key.users:
            self._retire(key)

    # ------------------------------------------------------------------ queries

    def describe(self, serial: int) -> dict[str, object]:
        return self._get(serial).describe()

    def payload(self, serial: int, tenant: str) -> Payload:
        """The payload of ``tenant``'s key ``serial``, key bytes included (to seal it, e.g. in a snapshot).

        Only the owning tenant gets it, as ``keyctl read`` of a user key gives its owner the bytes.
        """
        return self._owned(serial, tenant).payload

    def keys(self) -> list[Key]:
        return [self._keys[s] for s in sorted(self._keys)]

    def table(self) -> list[dict[str, object]]:
        """The cloud table: every KeyID in use, its tenant, handles and their users."""
        rows = []
        for alloc in self.keyids.in_use:
            handles = [k for k in self._keys.values() if k.keyid == alloc.keyid]
            rows.append({
                "keyid": alloc.keyid, "tenant": alloc.tenant,
                "handles": [f"{k.serial:#x}" for k in handles],
                "users": sorted({u for k in handles for u in k.users}),
                "mode": self.platform.key_entry(alloc.keyid).describe(),
            })
        return rows

    # ------------------------------------------------------------------ internals

    def _get(self, serial: int) -> Key:
        key = self._keys.get(serial)
        if key is None:
            raise KeyServiceError(errno.ENOENT, f"no key {serial:#x}")
        return key

    def _owned(self, serial: int, tenant: str) -> Key:
        key = self._get(serial)
        if key.tenant != tenant:
            raise KeyServiceError(errno.EACCES, f"key {serial:#x} belongs to another tenant")
        if key.revoked:
            raise KeyServiceError(errno.EKEYREVOKED, f"key {serial:#x} has been revoked")
        return key

    def _fingerprint(self, p: Payload, user: str) -> bytes:
        if p.type is KeyType.CPU:
            return self.keyids.fingerprint("cpu", user, os.urandom(16))  # never shared
        alg = algorithm_name(p.algorithm) if p.algorithm is not None else ""
        return self.keyids.fingerprint(p.type.value, alg, p.key or b"", p.tweak or b"")

    def _bind(self, p: Payload, tenant: str, user: str) -> Allocation:
        alloc, new = self.keyids.acquire(tenant, self._fingerprint(p, user), user)
        if new:
            try:
                self._program(alloc.keyid, p)
            except BaseException:
                self.keyids.release(alloc.keyid, user)
                raise
        return alloc

    def _drop(self, keyid: int, user: str) -> None:
        if self.keyids.release(keyid, user):
            self._clear(keyid)

    def _retire(self, key: Key) -> None:
        del self._keys[key.serial]
        self._drop(key.keyid, key.user_ref)

    def _program(self, keyid: int, p: Payload) -> None:
        """PCONFIG KEYID ``keyid`` on every package, all or nothing (ENOKEY on failure)."""
        algorithm = p.algorithm if p.algorithm is not None else self.platform.algorithms[0]
        struct = pc.KeyProgramStruct.for_algorithm(keyid, _COMMANDS[p.type], algorithm,
                                                   p.key or b"", p.tweak or b"")
        done = []
        try:
            for package in range(self.platform.packages):
                self._pconfig(struct, package)
                done.append(package)
        except KeyServiceError:
            for package in done:
                self._clear(keyid, packages=[package])
            raise

    def _clear(self, keyid: int, packages: list[int] | None = None) -> None:
        """KEYID_CLEAR_KEY: a freed KeyID keeps no tenant key in the hardware."""
        struct = pc.KeyProgramStruct.for_algorithm(keyid, pc.Command.KEYID_CLEAR_KEY, self.platform.algorithms[0])
        for package in packages if packages is not None else range(self.platform.packages):
            try:
                self._pconfig(struct, package)
            except KeyServiceError as err:  # clearing must not fail silently
                log.error("mktme: clearing KeyID %d on package %d failed: %s", keyid, package, err)

    def _pconfig(self, struct: pc.KeyProgramStruct, package: int) -> None:
        mem = self.platform.memory
        mem.write(self.struct_hpa, struct.pack())  # KeyID 0: host kernel memory
        try:
            for _attempt in range(self.max_retries + 1):
                self.pconfig_calls += 1
                result = self.platform.pconfig(pc.PCONFIG_LEAF_MKTME_KEY_PROGRAM, self.struct_hpa, package=package)
                if not result.zf:
                    return
                if result.status not in _RETRY:
                    break
                self.retries += 1
        finally:
            mem.write(self.struct_hpa, bytes(pc.STRUCT_NBYTES))  # no key left in memory
        raise KeyServiceError(errno.ENOKEY, f"PCONFIG of KeyID {struct.keyid} on package {package} "
                              f"failed: {result.status.name}")
