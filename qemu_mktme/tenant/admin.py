"""The tenant's own operations: create keys, record reference values, enrol and revoke hosts,
encrypt an image.

What ``qemu-mktme tenant init|add-key|policy`` and ``image encrypt`` call. Keys are created in
(and read back from) the running KMIP server; only names and unique identifiers are stored.
Enrolling a host records its TPM's attestation key and gives it its own client certificate
(:func:`enrol_credentials`); revoking it (:func:`revoke_host`) puts its certificates in the
tenant's CRL and takes its AK out of the policy: the running broker refuses it at the handshake.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from ..errors import TenantError
from ..qemu.boot import BootSpec
from ..attest import image as image_mod
from . import keyserver
from ..attest.hostid import AttestedHost, host_credentials, host_dir
from ..attest.measure import measured_set
from . import pki as pki_mod
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
                integrity: str | None = None, key_hosts: dict[str, list[str]] | None = None) -> Policy:
    """Reference values from this (known-good) machine's measured set, and each host's AK enrolled.
    ``key_hosts``: key name -> the enrolled hosts it may be released to (others: every host).

    Enrolling boots the host's TPM briefly to read its attestation key (derived from the TPM's
    seed, so it is the same at every boot).
    """
    tenant.require()
    if not hosts:
        raise TenantError("enrol at least one host (--host NAME)")
    strangers = sorted({h for names in (key_hosts or {}).values() for h in names} - set(hosts))
    if strangers:
        raise TenantError(f"a key is allowed on host {strangers[0]!r}, which is not enrolled (--host)")
    events = measured_set(boot, keyid_bits=keyid_bits, packages=packages, qemu=qemu, integrity=integrity)
    enrolled = {}
    for name in hosts:
        directory = (host_dirs or {}).get(name) or host_dir(name)
        with AttestedHost(name, directory).boot([]) as host:
            enrolled[host.ak_fingerprint()] = name
        enrol_credentials(tenant, name, host_credentials(Path(directory)))
    policy = Policy(PCRS, events, enrolled, dict(key_hosts or {}))
    tenant.save_policy(policy)
    return policy


RENEW_BEFORE = datetime.timedelta(days=30)


def enrol_credentials(tenant: TenantDir, host: str, directory: str | os.PathLike[str], *,
                      server_names: Sequence[str] = ()) -> Path:
    """Host ``host``'s own client certificate of the tenant's CA in ``directory`` (QEMU's file
    names, with the CA certificate that authenticates the broker); with ``server_names`` (the
    host's addresses), a server certificate for migrations to it too (:func:`.pki.issue_host`).
    A certificate already there for that host, from this CA, not revoked and valid for another
    30 days (and, with ``server_names``, a server certificate naming them) is kept: enrolling
    again changes nothing; else new ones are issued. Copy the directory to the host's machine."""
    d = Path(directory)
    current = _current_certificate(tenant.pki, host, d)
    if current is None or (server_names and not _names_served(d, server_names)):
        pki_mod.issue_host(tenant.pki, d, host, server_names=server_names)
    return d


def _names_served(directory: Path, names: Sequence[str]) -> bool:
    try:
        return set(pki_mod.Pki(directory).server_names()) >= {str(pki_mod.parse_server_name(n).value) for n in names}
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False


def _current_certificate(pki: pki_mod.Pki, host: str, directory: Path) -> x509.Certificate | None:
    try:
        cert = x509.load_pem_x509_certificate((directory / pki_mod.CLIENT_CERT).read_bytes())
        ca = x509.load_pem_x509_certificate(pki.ca.read_bytes())
        cert.verify_directly_issued_by(ca)
        if not (directory / pki_mod.CLIENT_KEY).is_file():
            return None
    except (OSError, ValueError, TypeError, InvalidSignature):
        return None
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    fresh = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC) > RENEW_BEFORE
    if not cn or cn[0].value != host or not fresh or cert.serial_number in pki_mod.revoked(pki):
        return None
    return cert


@dataclass(frozen=True)
class Revocation:
    """What ``tenant policy --revoke HOST`` did."""

    host: str
    serials: list[int]
    unenrolled: list[str]           # AK fingerprints taken out of the policy


def revoke_host(tenant: TenantDir, host: str) -> Revocation:
    """Revoke every certificate issued to ``host`` (the broker refuses it at the handshake from
    its next connection on) and take its attestation keys out of the tenant's policy."""
    tenant.require()
    serials = pki_mod.revoke_host(tenant.pki, host)
    gone: list[str] = []
    try:
        policy = tenant.policy()
    except TenantError:
        policy = None
    if policy is not None:
        gone = [fp for fp, name in policy.hosts.items() if name == host]
        if gone:
            tenant.save_policy(Policy(policy.pcrs, policy.reference,
                                      {fp: n for fp, n in policy.hosts.items() if n != host},
                                      {k: [h for h in names if h != host] for k, names in policy.key_hosts.items()}))
    return Revocation(host, serials, gone)


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
