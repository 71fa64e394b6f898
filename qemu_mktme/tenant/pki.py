"""The tenant's PKI: a CA and the certificates its key server and clients present, made with
``cryptography``.

One directory in QEMU's own file names (``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``,
``client-cert.pem``, ``client-key.pem``), so the same directory serves PyKMIP, the key broker's
TLS and QEMU's ``tls-creds-x509``. ECDSA P-256; the server certificate names ``localhost`` and
``127.0.0.1``; extended key usages serverAuth / clientAuth. Private keys are written 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
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
VALIDITY = datetime.timedelta(days=365)


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
          validity: datetime.timedelta = VALIDITY) -> None:
    """A leaf certificate for ``cn`` signed by the CA, written as ``cert_name`` / ``key_name``."""
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
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_key(directory / key_name, key)
    _write_cert(directory / cert_name, cert)


def create_pki(directory: str | os.PathLike[str], *, client_cn: str, ca_cn: str = "qemu-mktme tenant CA",
               client_not_before: datetime.datetime | None = None,
               client_validity: datetime.timedelta = VALIDITY) -> Pki:
    """A fresh CA, server and client certificate in ``directory`` (created 0700; refuses to overwrite)."""
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
    issue(d, ca_key, ca_cert, "localhost", server=True, cert_name=SERVER_CERT, key_name=SERVER_KEY)
    issue(d, ca_key, ca_cert, client_cn, server=False, cert_name=CLIENT_CERT, key_name=CLIENT_KEY,
          not_before=client_not_before, validity=client_validity)
    return Pki(d)


def issue_client(pki: Pki, directory: str | os.PathLike[str], cn: str, *,
                 not_before: datetime.datetime | None = None, validity: datetime.timedelta = VALIDITY) -> Pki:
    """Another client certificate of ``pki``'s CA in ``directory`` (with a copy of the CA cert)."""
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_key = serialization.load_pem_private_key(pki.path(CA_KEY).read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    issue(d, ca_key, ca_cert, cn, server=False, cert_name=CLIENT_CERT, key_name=CLIENT_KEY,
          not_before=not_before, validity=validity)
    _write_cert(d / CA_CERT, ca_cert)
    return Pki(d)
