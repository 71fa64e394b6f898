"""An emulated host's identity and its side of attestation: its TPM, its measured launch, its
node key, and fetching keys from a tenant's broker.

Each host has a state directory (``$QEMU_MKTME_HOSTS_DIR/NAME``, default
``~/.local/state/qemu-mktme/hosts/NAME``, 0700):

    tpm/            swtpm's state: the TPM's seeds, hence its attestation and binding keys
    eventlog.json   the measured launch of the current (or last) boot (digests only)
    node-key.sealed the node key, sealed to the PCRs of a good boot (useless elsewhere)
    tls/            its own client certificate for the tenant's broker, issued at enrolment

so several hosts (a migration source and destination) are several directories, each with its own
TPM. ``AttestedHost.boot`` is a host boot: swtpm starts (PCRs reset), the measured set is extended.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import TenantError, TpmError
from . import eventlog
from .quote import ak_fingerprint, open_sealed
from .client import BrokerClient
from .eventlog import Event
from .measure import extend_all
from .tpm import PCRS, SealedBlob, Swtpm, Tpm

ENV_HOSTS = "QEMU_MKTME_HOSTS_DIR"
NODE_KEY = "node-key.sealed"


def hosts_dir() -> Path:
    env = os.environ.get(ENV_HOSTS)
    return Path(env) if env else Path.home() / ".local/state/qemu-mktme/hosts"


def host_dir(name: str, parent: Path | None = None) -> Path:
    """Host ``name``'s state directory in ``parent`` (default :func:`hosts_dir`); ``TenantError``
    for a name that cannot be one."""
    if not name or "/" in name or name.startswith(".") or len(name) > 64:   # 64: a certificate's CN
        raise TenantError(f"invalid host name {name[:80]!r}: 1 to 64 characters, no '/', not starting with '.'")
    return (parent or hosts_dir()) / name


def host_credentials(directory: Path) -> Path:
    """Where a host keeps its client certificate (``ca-cert.pem``, ``client-cert.pem``, ``client-key.pem``)."""
    return directory / "tls"


class AttestedHost:
    """``with AttestedHost("host0").boot(events) as h: keys = h.fetch(client, ["vm"])``."""

    def __init__(self, name: str = "host0", directory: str | os.PathLike[str] | None = None) -> None:
        self.name = name
        self.directory = Path(directory) if directory else host_dir(name)
        self.swtpm = Swtpm(self.directory / "tpm")
        self.tpm: Tpm | None = None
        self.events: list[Event] = []
        self.result: dict[str, Any] = {"host": name, "attested": False}

    # ------------------------------------------------------------------ boot

    def power_on(self) -> AttestedHost:
        """Start the TPM (PCRs reset): the host's boot, before anything is measured."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.swtpm.start()
        try:
            self.tpm = Tpm(self.swtpm.socket)
        except BaseException:
            self.close()
            raise
        return self

    def boot(self, events: list[Event]) -> AttestedHost:
        """Start the TPM (unless :meth:`power_on` did) and extend ``events``: the measured launch."""
        if self.tpm is None:
            self.power_on()
        try:
            extend_all(self._tpm(), events)
        except BaseException:
            self.close()
            raise
        self.events = list(events)
        tmp = self.directory / "eventlog.json.tmp"
        tmp.write_text(eventlog.dumps(self.events))
        os.replace(tmp, self.directory / "eventlog.json")
        self.result["ak"] = self.ak_fingerprint()
        return self

    def close(self) -> None:
        if self.tpm is not None:
            self.tpm.close()
            self.tpm = None
        self.swtpm.stop()

    def __enter__(self) -> AttestedHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tpm(self) -> Tpm:
        if self.tpm is None:
            raise TpmError(f"host {self.name} has not booted (no TPM)")
        return self.tpm

    def ak_public(self) -> bytes:
        return self._tpm().ak_public()

    def ak_fingerprint(self) -> str:
        return ak_fingerprint(self.ak_public())

    # ------------------------------------------------------------------ attestation

    def evidence(self, nonce: bytes, names: list[str]) -> dict[str, Any]:
        """What the broker needs: quote and binding-key certification for ``nonce``, the event log."""
        tpm = self._tpm()
        quote, certify = tpm.quote_and_certify(nonce)
        return {"nonce": nonce.hex(), "ak_public": tpm.ak_public().hex(),
                "quote": {"attest": quote.attest.hex(), "signature": quote.signature.hex()},
                "binding": {"public": tpm.binding_public().hex(), "attest": certify.attest.hex(),
                            "signature": certify.signature.hex()},
                "eventlog": [e.to_json() for e in self.events], "keys": names}

    def fetch(self, client: BrokerClient, names: list[str], nonce: bytes | None = None) -> dict[str, bytes]:
        """Attest to the broker and unwrap the released keys inside the TPM (ECDH_ZGen).

        ``nonce``: one already fetched from this broker (else fetched here). The keys exist only
        in this process's memory; the result (no key bytes) is kept in :attr:`result` for ``query``.
        """
        t0 = time.monotonic()
        self.result.update(broker=client.url, keys={n: "pending" for n in names})
        try:
            if nonce is None:
                nonce = client.nonce()
            request = self.evidence(nonce, names)
            t1 = time.monotonic()
            sealed, verdict_host = client.release(request)
        except TenantError as err:
            self.result.update(attested=False, error=str(err), keys={n: "refused" for n in names})
            raise
        t2 = time.monotonic()
        tpm = self._tpm()
        bind_name = tpm.binding_name()
        missing = [n for n in names if n not in sealed]
        if missing:
            raise TenantError(f"the broker released no key {missing[0]!r}")
        shared = tpm.ecdh_all([(sealed[n].x, sealed[n].y) for n in names])
        keys = {name: open_sealed(sealed[name], z, nonce + bind_name + name.encode()) for name, z in zip(names, shared)}
        shared.clear()
        t3 = time.monotonic()
        self.result.update(attested=True, verdict=f"released by {client.url} to {verdict_host}",
                           keys={n: "released to this host's TPM" for n in names},
                           seconds={"attest": round(t1 - t0, 4), "broker": round(t2 - t1, 4),
                                    "unwrap": round(t3 - t2, 4)})
        return keys

    # ------------------------------------------------------------------ node key

    def node_key(self) -> bytes:
        """The node key, unsealed from the TPM; created and sealed on the first boot.

        Sealed to PCRs 8-12 of the boot that created it: after a changed QEMU binary, shim or
        package the unseal fails (``TpmError`` saying so) and nothing wrapped under it opens.
        """
        tpm = self._tpm()
        path = self.directory / NODE_KEY
        if not path.exists():
            key = os.urandom(32)
            blob = tpm.seal(key)
            tmp = path.with_name(NODE_KEY + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(blob.to_bytes())
            os.replace(tmp, path)
            return key
        try:
            return tpm.unseal(SealedBlob.from_bytes(path.read_bytes()))
        except TpmError as err:
            raise TpmError(f"host {self.name}: the node key does not unseal: this boot's PCRs {list(PCRS)} "
                           f"differ from the sealed state (changed QEMU, shim, package or platform?) ({err})") from None

    def wrap(self, data: bytes, label: str) -> bytes:
        """``data`` encrypted under the node key (what a host keeps at rest: cached blobs, KEKs)."""
        iv = os.urandom(12)
        return iv + AESGCM(self.node_key()).encrypt(iv, data, label.encode())

    def unwrap(self, blob: bytes, label: str) -> bytes:
        from cryptography.exceptions import InvalidTag
        try:
            return AESGCM(self.node_key()).decrypt(blob[:12], blob[12:], label.encode())
        except InvalidTag:
            raise TenantError(f"host {self.name}: blob {label!r} does not open under this node key") from None

    def describe(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.result))
