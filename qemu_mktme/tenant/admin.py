"""The tenant's own operations: create keys, record reference values, encrypt an image.

What ``qemu-mktme tenant init|add-key|policy`` and ``image encrypt`` call. Keys are created in
(and read back from) the running KMIP server; only names and unique identifiers are stored.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import TenantError
from ..qemu.boot import BootSpec
from ..attest import image as image_mod
from . import keyserver
from ..attest.hostid import AttestedHost
from ..attest.measure import measured_set
from .store import KEY_NAME_CHARS, Policy, TenantDir
from ..attest.tpm import PCRS

KINDS = ("memory", "disk")


def add_key(tenant: TenantDir, name: str, kind: str = "memory") -> str:
    """A new AES-256 key ``name`` in the tenant's KMIP server; its KMIP unique identifier."""
    tenant.require()
    if not name or set(name) - KEY_NAME_CHARS:
        raise TenantError(f"invalid key name {name!r}: letters, digits, '_', '.', '-'")
    if kind not in KINDS:
        raise TenantError(f"key kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if name in tenant.keys():  # noqa: SIM118 - the tenant directory, not a dict
        raise TenantError(f"the tenant has a key named {name!r} already")
    uid = keyserver.kmip_client(tenant).create_key(name)
    tenant.record_key(name, uid, kind)
    return uid


def make_policy(tenant: TenantDir, boot: BootSpec, *, hosts: list[str], keyid_bits: int = 6, packages: int = 1,
                qemu: str | os.PathLike[str] | None = None, host_dirs: dict[str, Path] | None = None,
                integrity: str | None = None) -> Policy:
    """Reference values from this (known-good) machine's measured set, and each host's AK enrolled.

    Enrolling boots the host's TPM briefly to read its attestation key (derived from the TPM's
    seed, so it is the same at every boot).
    """
    tenant.require()
    if not hosts:
        raise TenantError("enrol at least one host (--host NAME)")
    events = measured_set(boot, keyid_bits=keyid_bits, packages=packages, qemu=qemu, integrity=integrity)
    enrolled = {}
    for name in hosts:
        with AttestedHost(name, (host_dirs or {}).get(name)).boot([]) as host:
            enrolled[host.ak_fingerprint()] = name
    policy = Policy(PCRS, events, enrolled)
    tenant.save_policy(policy)
    return policy


def encrypt_image(tenant: TenantDir, source: str | os.PathLike[str], target: str | os.PathLike[str],
                  *, key_name: str | None = None) -> Path:
    """``target``: ``source`` as LUKS qcow2 under a new disk key in the KMIP server, with a signed
    manifest beside it. Returns the manifest's path."""
    tenant.require()
    name = key_name or f"disk-{Path(target).stem}"
    uid = add_key(tenant, name, "disk")
    key = keyserver.kmip_client(tenant).get_key(uid)
    image_mod.encrypt(source, target, key)
    del key
    return image_mod.write_manifest(target, name, tenant.pki.client_cn(), tenant.signing_key())
