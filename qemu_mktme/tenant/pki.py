"""The tenant's PKI: a CA and the certificates its key server and clients present, made with
``cryptography``.

One directory in QEMU's own file names (``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``,
``client-cert.pem``, ``client-key.pem``), so the same directory serves PyKMIP, the key broker's
TLS and QEMU's ``tls-creds-x509``. ECDSA P-256; the server certificate names what the tenant
gives (``tenant init --server-name``; default ``localhost`` and ``127.0.0.1``): hosts check the
name they dialled against it. Extended key usages serverAuth / clientAuth. Private keys are
written 0600.

Each enrolled host gets a client certificate of its own (:func:`issue_host`, CN = the host's
name), recorded in ``issued.json`` (serials only). :func:`revoke_host` adds a host's serials to
``ca-crl.pem`` (QEMU's name: its tls-creds-x509 loads it too), a CRL signed by the CA that the broker loads (and reloads when it changes) with
``VERIFY_CRL_CHECK_LEAF``: a revoked host is refused at the TLS handshake.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import TenantError

CA_CERT, CA_KEY = "ca-cert.pem", "ca-key.pem"
SERVER_CERT, SERVER_KEY = "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"
CRL, ISSUED = "ca-crl.pem", "issued.json"
VALIDITY = datetime.timedelta(days=365)
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1")
_DNS_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")


@dataclass(frozen=True)
class Pki:
    """A PKI directory; paths only (``create_pki`` makes one)."""

    directory: Path

    def path(self, name: str) -> Path:
        return self.directory / name

    @property
    def ca(self) -> Path:
        return self.path(CA_CERT)

    @property
    def server(self) -> tuple[Path, Path]:
        return self.path(SERVER_CERT), self.path(SERVER_KEY)

    @property
    def client(self) -> tuple[Path, Path]:
        return self.path(CLIENT_CERT), self.path(CLIENT_KEY)

    def check(self, names: tuple[str, ...] = (CA_CERT, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY)) -> Pki:
        missing = [n for n in names if not self.path(n).is_file()]
        if missing:
            raise TenantError(f"PKI directory {self.directory} lacks {', '.join(missing)} (run 'qemu-mktme tenant init')")
        return self

    def client_cn(self) -> str:
        cert = x509.load_pem_x509_certificate(self.client[0].read_bytes())
        return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value  # type: ignore[return-value]

    @property
    def crl(self) -> Path:
        return self.path(CRL)

    def server_names(self) -> list[str]:
        """The names and addresses the server certificate carries (its subjectAltNames)."""
        cert = x509.load_pem_x509_certificate(self.server[0].read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return [*sans.get_values_for_type(x509.DNSName), *map(str, sans.get_values_for_type(x509.IPAddress))]


def parse_server_name(text: str) -> x509.GeneralName:
    """A subjectAltName for ``text``: an IP address (v4 or v6) or a DNS name; ``TenantError`` else."""
    try:
        return x509.IPAddress(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        pass
    labels = text.rstrip(".").split(".")
    if not text or len(text) > 253 or set(text) - _DNS_CHARS or any(
            not 0 < len(label) <= 63 or label.startswith("-") or label.endswith("-") for label in labels):
        raise TenantError(f"server name {text!r} is neither an IP address nor a DNS name")
    return x509.DNSName(text.rstrip(".").lower())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "qemu-mktme tenant"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def issue(directory: Path, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, cn: str, *,
          server: bool, cert_name: str, key_name: str, not_before: datetime.datetime | None = None,
          validity: datetime.timedelta = VALIDITY, names: Sequence[str] = DEFAULT_SERVER_NAMES) -> x509.Certificate:
    """A leaf certificate for ``cn`` signed by the CA, written as ``cert_name`` / ``key_name``;
    a server certificate names ``names`` (DNS names and IP addresses)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(start + validity)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, content_commitment=False,
                                            data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if server:
        sans = list(dict.fromkeys(parse_server_name(n) for n in names))
        if not sans:
            raise TenantError("a server certificate needs at least one name or address")
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_key(directory / key_name, key)
    _write_cert(directory / cert_name, cert)
    return cert


def create_pki(directory: str | os.PathLike[str], *, client_cn: str, ca_cn: str = "qemu-mktme tenant CA",
               client_not_before: datetime.datetime | None = None,
               client_validity: datetime.timedelta = VALIDITY,
               server_names: Sequence[str] = DEFAULT_SERVER_NAMES) -> Pki:
    """A fresh CA, server and client certificate and an empty CRL in ``directory`` (created 0700;
    refuses to overwrite). The server certificate names ``server_names``."""
    names = list(server_names) or list(DEFAULT_SERVER_NAMES)
    for n in names:
        parse_server_name(n)                  # a bad name is refused before anything is written
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    if (d / CA_CERT).exists():
        raise TenantError(f"{d} already holds a PKI ({CA_CERT}); remove it first or use another directory")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    ca_cert = (x509.CertificateBuilder().subject_name(_name(ca_cn)).issuer_name(_name(ca_cn))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(now + VALIDITY * 5)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    _write_key(d / CA_KEY, ca_key)
    _write_cert(d / CA_CERT, ca_cert)
    issue(d, ca_key, ca_cert, names[0], server=True, cert_name=SERVER_CERT, key_name=SERVER_KEY, names=names)
    issue(d, ca_key, ca_cert, client_cn, server=False, cert_name=CLIENT_CERT, key_name=CLIENT_KEY,
          not_before=client_not_before, validity=client_validity)
    pki = Pki(d)
    write_crl(pki, [])
    return pki


def _ca(pki: Pki) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_key = serialization.load_pem_private_key(pki.path(CA_KEY).read_bytes(), None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TenantError(f"{pki.path(CA_KEY)} is not the tenant's ECDSA CA key")
    return ca_key, x509.load_pem_x509_certificate(pki.ca.read_bytes())


def reissue_server(pki: Pki, names: Sequence[str]) -> list[str]:
    """A new server certificate naming ``names`` (a running key server uses it from its next start)."""
    ca_key, ca_cert = _ca(pki)
    issue(pki.directory, ca_key, ca_cert, names[0], server=True, cert_name=SERVER_CERT, key_name=SERVER_KEY,
          names=names)
    return pki.server_names()


# ---------------------------------------------------------------------------------- hosts


def _issued(pki: Pki) -> dict[str, list[str]]:
    try:
        obj = json.loads(pki.path(ISSUED).read_text())
    except FileNotFoundError:
        return {}
    except ValueError:
        raise TenantError(f"{pki.path(ISSUED)} is not valid JSON") from None
    return {str(k): [str(s) for s in v] for k, v in obj.items()}


def issue_host(pki: Pki, directory: str | os.PathLike[str], host: str, *,
               validity: datetime.timedelta = VALIDITY, server_names: Sequence[str] = ()) -> Pki:
    """Host ``host``'s own client certificate (CN = ``host``) in ``directory``, in QEMU's names
    (``client-cert.pem``, ``client-key.pem`` 0600, and ``ca-cert.pem`` to check the broker by);
    with ``server_names``, also a server certificate naming them (``server-cert.pem``,
    ``server-key.pem``): the directory is then a whole ``tls-creds-x509`` / libvirt
    ``migrate_tls_x509_cert_dir`` for migrations to and from that host. The serials are recorded
    so that :func:`revoke_host` can revoke them. The directory is what the host machine keeps
    (copy it there); nothing in it opens another host's certificate."""
    if not host or set(host) - _DNS_CHARS - {"_"} or len(host) > 64:
        raise TenantError(f"invalid host name {host[:80]!r}: up to 64 letters, digits, '-', '_', '.'")
    for name in server_names:
        parse_server_name(name)
    ca_key, ca_cert = _ca(pki)
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    certs = [issue(d, ca_key, ca_cert, host, server=False, cert_name=CLIENT_CERT, key_name=CLIENT_KEY,
                   validity=validity)]
    if server_names:
        certs.append(issue(d, ca_key, ca_cert, host, server=True, cert_name=SERVER_CERT, key_name=SERVER_KEY,
                           validity=validity, names=server_names))
    _write_cert(d / CA_CERT, ca_cert)
    issued = _issued(pki)
    issued.setdefault(host, []).extend(format(c.serial_number, "x") for c in certs)
    tmp = pki.path(ISSUED + ".tmp")
    tmp.write_text(json.dumps(issued, indent=1, sort_keys=True))
    os.replace(tmp, pki.path(ISSUED))
    return Pki(d)


def host_certificates(pki: Pki) -> dict[str, dict[str, list[str]]]:
    """Per host the serials (hex) issued to it: ``{"valid": [...], "revoked": [...]}``."""
    gone = revoked(pki)
    return {host: {"valid": [s for s in serials if int(s, 16) not in gone],
                   "revoked": [s for s in serials if int(s, 16) in gone]}
            for host, serials in sorted(_issued(pki).items())}


def revoked(pki: Pki) -> set[int]:
    """Serial numbers in the tenant's CRL."""
    try:
        crl = x509.load_pem_x509_crl(pki.crl.read_bytes())
    except FileNotFoundError:
        return set()
    return {r.serial_number for r in crl}


def write_crl(pki: Pki, serials: Iterable[int]) -> Path:
    """``ca-crl.pem``: ``serials`` revoked, signed by the CA, valid as long as the CA (a CRL past
    its nextUpdate would make OpenSSL refuse every client). Replaced atomically."""
    ca_key, ca_cert = _ca(pki)
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(now - datetime.timedelta(minutes=5)).next_update(ca_cert.not_valid_after_utc))
    for serial in sorted(set(serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
    crl = builder.sign(ca_key, hashes.SHA256())
    tmp = pki.path(CRL + ".tmp")
    tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, pki.crl)
    return pki.crl


def revoke_host(pki: Pki, host: str) -> list[int]:
    """Revoke every certificate issued to ``host``; the serials revoked. ``TenantError`` when the
    tenant never issued one to that host."""
    serials = [int(s, 16) for s in _issued(pki).get(host, [])]
    if not serials:
        raise TenantError(f"the tenant never issued a certificate to host {host!r} "
                          f"(issued: {', '.join(sorted(_issued(pki))) or 'none'})")
    write_crl(pki, revoked(pki) | set(serials))
    return serials


def issue_client(pki: Pki, directory: str | os.PathLike[str], cn: str, *,
                 not_before: datetime.datetime | None = None, validity: datetime.timedelta = VALIDITY) -> Pki:
    """Another client certificate of ``pki``'s CA in ``directory`` (with a copy of the CA cert)."""
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_key, ca_cert = _ca(pki)
    issue(d, ca_key, ca_cert, cn, server=False, cert_name=CLIENT_CERT, key_name=CLIENT_KEY,
          not_before=not_before, validity=validity)
    _write_cert(d / CA_CERT, ca_cert)
    return Pki(d)
