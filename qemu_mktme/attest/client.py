"""The host's client of the tenant's key broker (:mod:`qemu_mktme.tenant.broker` is the server).

HTTPS with JSON in and out, mutual TLS (the broker authenticated by the tenant's CA and the
name dialled, the host by its own client certificate): ``nonce``,
``manifest_key`` and ``release`` (the protocol is drawn in the broker's docstring).
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import urllib.parse
from pathlib import Path
from typing import Any

from ..errors import AttestationError, KeyServerError, TenantError
from .quote import Sealed

REQUEST_TIMEOUT = 15.0
"""Seconds a request to (or by) the broker may take."""


REFUSALS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "no client certificate (the tenant enrols each host with its own)",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "its certificate was revoked by the tenant",
    "TLSV1_ALERT_UNKNOWN_CA": "its certificate is not from the tenant's CA",
    "SSLV3_ALERT_BAD_CERTIFICATE": "its certificate is not acceptable (another CA, or not a client certificate)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "its certificate has expired",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "its certificate is not a client certificate",
}
"""TLS alerts a broker sends at the handshake (OpenSSL's reason names), as the host is told."""


class BrokerClient:
    """The host's side of the HTTPS protocol: the broker is authenticated by the tenant's CA and
    the name dialled; the host by ``cert`` (its own client certificate and key, issued when the
    tenant enrolled it: :func:`qemu_mktme.tenant.pki.issue_host`).

    One kept-alive connection serves a client's requests (nonce, release): one TLS handshake.
    """

    def __init__(self, url: str, ca: str | os.PathLike[str], *, cert: tuple[Path, Path] | None = None,
                 timeout: float = REQUEST_TIMEOUT) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "https" or not parsed.hostname:
            raise TenantError(f"tenant server URL must be https://HOST:PORT, got {url!r}")
        self.url = url.rstrip("/")
        self._host, self._port = parsed.hostname, parsed.port or 443
        try:
            self._ctx = ssl.create_default_context(cafile=str(ca))      # the tenant's CA and the dialled name
        except (OSError, ssl.SSLError) as err:
            raise TenantError(f"tenant CA certificate {ca}: {getattr(err, 'strerror', None) or err}") from None
        if cert is not None:
            try:
                self._ctx.load_cert_chain(str(cert[0]), str(cert[1]))
            except (OSError, ssl.SSLError) as err:
                raise TenantError(f"host certificate {cert[0]}: {getattr(err, 'strerror', None) or err}") from None
        self.timeout = timeout
        self._conn: http.client.HTTPSConnection | None = None
        self._manifest_key: bytes | None = None
        self.tenant: str | None = None      # the tenant's name, as its broker (authenticated by its CA) says

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _exchange(self, path: str, body: bytes) -> tuple[int, bytes]:
        reused = self._conn is not None
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout,
                                                         context=self._ctx)
            try:
                self._conn.request("POST", path, body, {"Content-Type": "application/json"})
                resp = self._conn.getresponse()
                return resp.status, resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if not reused or attempt:          # a kept-alive connection the broker closed: once more
                    raise
            except BaseException:
                self.close()
                raise
        raise AssertionError("unreachable")

    def _post(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        try:
            status, data = self._exchange(path, json.dumps(obj).encode())
        except ssl.SSLCertVerificationError as err:
            if "Hostname mismatch" in str(err.verify_message) or "IP address mismatch" in str(err.verify_message):
                raise KeyServerError(f"key broker {self.url}: its certificate does not name {self._host} "
                                     f"({err.verify_message})") from None
            raise KeyServerError(f"key broker {self.url}: its certificate is not from the tenant's CA "
                                 f"({err.verify_message})") from None
        except ssl.SSLError as err:
            reason = REFUSALS.get(str(err.reason))
            if reason is not None:
                raise AttestationError(f"the key broker {self.url} refused this host at the TLS handshake: "
                                       f"{reason}") from None
            raise KeyServerError(f"key broker {self.url}: TLS failed: {err.reason or err}") from None
        except TimeoutError as err:
            raise KeyServerError(f"key broker {self.url} did not answer within {self.timeout:g} s: {err}") from None
        except (OSError, http.client.HTTPException) as err:
            raise KeyServerError(f"key broker {self.url} is not reachable: {err}") from None
        try:
            answer = json.loads(data)
        except ValueError:
            raise KeyServerError(f"key broker {self.url}: HTTP {status}, not JSON") from None
        if status == 403:
            raise AttestationError(f"the key broker refused this host: {answer.get('error')}")
        if status != 200:
            raise KeyServerError(f"key broker {self.url}: HTTP {status}: {answer.get('error')}")
        return answer

    def nonce(self, keys: list[str] | None = None) -> bytes:
        """A fresh nonce (the answer also carries the tenant's manifest key, kept for :meth:`manifest_key`);
        ``keys``: the names the release will ask for (the broker fetches them meanwhile)."""
        answer = self._post("/v1/nonce", {"keys": keys} if keys else {})
        try:
            self._manifest_key = bytes.fromhex(answer["manifest_key"])
            self.tenant = str(answer["tenant"]) if answer.get("tenant") else self.tenant
            return bytes.fromhex(answer["nonce"])
        except (KeyError, TypeError, ValueError):
            raise KeyServerError(f"key broker {self.url}: malformed nonce") from None

    def manifest_key(self):
        """The tenant's Ed25519 manifest key, as the broker (authenticated by the tenant's CA) serves it."""
        from cryptography.hazmat.primitives.asymmetric import ed25519
        try:
            raw = self._manifest_key or bytes.fromhex(self._post("/v1/manifest-key", {})["key"])
            return ed25519.Ed25519PublicKey.from_public_bytes(raw)
        except (KeyError, TypeError, ValueError):
            raise KeyServerError(f"key broker {self.url}: malformed manifest key") from None

    def release(self, request: dict[str, Any]) -> tuple[dict[str, Sealed], str]:
        answer = self._post("/v1/release", request)
        try:
            self.tenant = str(answer["tenant"]) if answer.get("tenant") else self.tenant
            return {n: Sealed.from_json(s) for n, s in answer["keys"].items()}, str(answer["host"])
        except (KeyError, TypeError, AttributeError):
            raise KeyServerError(f"key broker {self.url}: malformed answer") from None
