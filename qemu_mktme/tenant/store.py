"""The tenant's state directory: PKI, key names, reference values, manifest-signing key.

    TENANT/pki/          CA, server and client certificates (QEMU's file names)
    TENANT/kmip/         PyKMIP's configuration, database and log
    TENANT/keys.json     key name -> KMIP unique identifier (no key material)
    TENANT/policy.json   the reference measured launch and the enrolled hosts' attestation keys
    TENANT/signing-key.pem   Ed25519 key that signs image manifests (0600)
    TENANT/keyserver.json    the running key server: pid, ports (while it runs)

The directory is ``$QEMU_MKTME_TENANT_DIR``, else ``~/.local/share/qemu-mktme/tenant``; it is
created 0700. Key material stays in the KMIP server, never here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from ..errors import TenantError
from ..files.atomic import write_synced
from ..attest import eventlog
from ..attest.eventlog import Event
from .pki import Pki, create_pki, parse_server_name

ENV_TENANT = "QEMU_MKTME_TENANT_DIR"
KEY_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def default_dir() -> Path:
    env = os.environ.get(ENV_TENANT)
    return Path(env) if env else Path.home() / ".local/share/qemu-mktme/tenant"


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    write_synced(tmp, json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n")
    os.replace(tmp, path)


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except ValueError:
        raise TenantError(f"{path} is not valid JSON") from None


@dataclass(frozen=True)
class Policy:
    """What the broker checks: the PCRs quoted, the reference events, the enrolled AKs, and which
    hosts each key may go to (``key_hosts``: key name -> host names; a key not named there goes to
    every enrolled host)."""

    pcrs: tuple[int, ...]
    reference: list[Event]
    hosts: dict[str, str]           # AK fingerprint -> host name
    key_hosts: dict[str, list[str]] = field(default_factory=dict)

    def allows(self, host: str, key: str) -> bool:
        """Whether key ``key`` may be released to enrolled host ``host``."""
        allowed = self.key_hosts.get(key)
        return allowed is None or host in allowed

    def to_json(self) -> dict[str, Any]:
        return {"pcrs": list(self.pcrs), "reference": [e.to_json() for e in self.reference], "hosts": self.hosts,
                "key_hosts": self.key_hosts}

    @classmethod
    def from_json(cls, obj: Any) -> Policy:
        try:
            key_hosts = {str(k): [str(h) for h in v] for k, v in dict(obj.get("key_hosts") or {}).items()}
            return cls(tuple(int(p) for p in obj["pcrs"]), eventlog.loads(obj["reference"]), dict(obj["hosts"]),
                       key_hosts)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise TenantError("policy.json is malformed (pcrs, reference, hosts, key_hosts)") from None


class TenantDir:
    """A tenant state directory (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path else default_dir()

    @property
    def pki(self) -> Pki:
        return Pki(self.path / "pki")

    @property
    def kmip_dir(self) -> Path:
        return self.path / "kmip"

    @property
    def signing_key_path(self) -> Path:
        return self.path / "signing-key.pem"

    def exists(self) -> bool:
        return (self.pki.ca).is_file()

    def require(self) -> TenantDir:
        if not self.exists():
            raise TenantError(f"no tenant in {self.path} (run 'qemu-mktme tenant init')")
        self.pki.check()
        return self

    def init(self, name: str, server_names: Sequence[str] = ()) -> None:
        """PKI with client CN ``name`` (the KMIP owner of this tenant's keys) and a signing key;
        the key server's certificate names ``server_names`` (default localhost and 127.0.0.1)."""
        if not name or set(name) - KEY_NAME_CHARS:
            raise TenantError(f"invalid tenant name {name!r}: letters, digits, '_', '.', '-'")
        for n in server_names:
            parse_server_name(n)
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        create_pki(self.path / "pki", client_cn=name, server_names=server_names)
        self.kmip_dir.mkdir(mode=0o700, exist_ok=True)
        key = ed25519.Ed25519PrivateKey.generate()
        fd = os.open(self.signing_key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))

    # ------------------------------------------------------------------ key names

    def keys(self) -> dict[str, dict[str, str]]:
        return _read_json(self.path / "keys.json", {})

    def key_uid(self, name: str) -> str:
        entry = self.keys().get(name)
        if entry is None:
            raise TenantError(f"the tenant has no key named {name!r} (have: {', '.join(self.keys()) or 'none'})")
        return entry["uid"]

    def record_key(self, name: str, uid: str, kind: str) -> None:
        keys = self.keys()
        keys[name] = {"uid": uid, "kind": kind}
        _write_json(self.path / "keys.json", keys)

    # ------------------------------------------------------------------ policy

    def policy(self) -> Policy:
        obj = _read_json(self.path / "policy.json", None)
        if obj is None:
            raise TenantError(f"the tenant in {self.path} has no policy yet (run 'qemu-mktme tenant policy')")
        return Policy.from_json(obj)

    def save_policy(self, policy: Policy) -> None:
        _write_json(self.path / "policy.json", policy.to_json())

    # ------------------------------------------------------------------ manifest signing

    def signing_key(self) -> ed25519.Ed25519PrivateKey:
        key = serialization.load_pem_private_key(self.signing_key_path.read_bytes(), None)
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        return key

    def verify_key(self) -> ed25519.Ed25519PublicKey:
        return self.signing_key().public_key()
