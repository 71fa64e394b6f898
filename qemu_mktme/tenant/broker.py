"""The key broker: releases a tenant's keys only to a host whose TPM proves a good launch.

Our component (small; no library does this flow). One HTTPS endpoint (the tenant's server
certificate), JSON in and out:

    POST /v1/nonce     {"keys": [NAME...]} (optional)       -> {"nonce": HEX, "manifest_key": HEX, "tenant": CN}
    POST /v1/manifest-key {}                                -> {"key": HEX}  (image manifests' Ed25519 key)
    POST /v1/release   {"nonce", "ak_public", "quote", "binding", "eventlog", "keys": [NAME...]}
                       -> {"keys": {NAME: SEALED}, "host": NAME, "tenant": CN}   or 403 {"error": "why"}

``tenant`` is the CN of the tenant's client certificate: the owner of its KMIP keys, and the
tenant a host's key service files the released keys under.

A release is checked in this order, each refusal saying why and logged on the broker: the nonce
was issued here, is fresh and unused (one use, even when refused); the AK is enrolled in the
tenant's policy; the quote's signature, type and nonce; the event log replays to the quoted
PCR digest (else it is forged); the events match the reference values (PCR and event that
differ); the binding key is certified by the same AK for the same nonce and fixed to its TPM.
Only then are the keys sealed to the binding key (:func:`.attest.seal_to`): plaintext keys exist
only in the broker's memory. A nonce request may name the keys the host will ask for: the broker
then fetches them from the KMIP server (as the tenant) while the host measures itself and quotes,
and keeps them in its memory for that nonce only (dropped with it: used, refused or expired;
re-fetched when older than :data:`PREFETCH_MAX_AGE`). The decision is the same either way.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..attest import eventlog
from ..attest.client import REQUEST_TIMEOUT
from ..attest.quote import ak_fingerprint, seal_to, verify_binding, verify_quote
from ..attest.tpm import Quote
from ..errors import AttestationError, KeyServerError, TenantError
from .kmip import KmipClient
from .store import TenantDir

log = logging.getLogger(__name__)

NONCE_LIFETIME = 60.0
MAX_NONCES = 4096
MAX_BODY = 1 << 20
PREFETCH_MAX_AGE = 10.0
"""Seconds a key fetched at nonce time may wait for its release (else it is fetched again)."""
MAX_PREFETCH = 8
"""Nonces with keys fetched ahead at a time (a flood of nonce requests cannot make it fetch more)."""


class Broker:
    """The decision logic; ``kmip`` fetches key bytes by name (``TenantDir`` names -> KMIP uids)."""

    def __init__(self, tenant: TenantDir, kmip: KmipClient, *, logger: Callable[[str], None] | None = None) -> None:
        self.tenant = tenant
        self.kmip = kmip
        self._nonces: dict[bytes, float] = {}
        self._prefetch: dict[bytes, tuple[tuple[str, ...], Future[list[bytes]]]] = {}
        self._fetcher = ThreadPoolExecutor(1, thread_name_prefix="kmip-prefetch")
        self._lock = threading.Lock()
        self._log = logger or (lambda m: log.info("%s", m))

    def nonce(self, keys: list[str] | None = None) -> bytes:
        """A fresh nonce; ``keys``: names the host will ask for, fetched from KMIP from now on."""
        n = os.urandom(32)
        now = time.monotonic()
        with self._lock:
            self._nonces = {k: t for k, t in self._nonces.items() if now - t < NONCE_LIFETIME}
            while len(self._nonces) >= MAX_NONCES:            # a flood of requests: oldest first out
                del self._nonces[next(iter(self._nonces))]
            self._nonces[n] = now
            for gone in [k for k in self._prefetch if k not in self._nonces]:
                _drop(self._prefetch.pop(gone))
            if keys and len(self._prefetch) < MAX_PREFETCH:
                try:
                    wanted: list[tuple[str, str | None]] = [(self.tenant.key_uid(name), name) for name in keys]
                except TenantError:
                    return n                                  # refused at release, with its reason
                self._prefetch[n] = (tuple(keys), self._fetcher.submit(self.kmip.get_keys, wanted))
        return n

    def close(self) -> None:
        self._fetcher.shutdown(wait=False, cancel_futures=True)

    def _fetch(self, names: list[str], ahead: tuple[tuple[str, ...], Future[list[bytes]]] | None,
               issued: float) -> list[bytes]:
        """The keys ``names`` from KMIP: those fetched at nonce time when they are the ones asked
        for and fresh enough, else fetched now."""
        if ahead is not None and list(ahead[0]) == names and time.monotonic() - issued < PREFETCH_MAX_AGE:
            try:
                return ahead[1].result(timeout=REQUEST_TIMEOUT)
            except Exception as err:  # noqa: BLE001 - a failed prefetch is retried, with its own error
                log.debug("prefetched keys for a nonce: %s: %s", type(err).__name__, err)
        _drop(ahead)
        return self.kmip.get_keys([(self.tenant.key_uid(name), name) for name in names])

    def manifest_key(self) -> bytes:
        """The tenant's image-manifest verification key (raw Ed25519), served over the tenant's TLS."""
        from cryptography.hazmat.primitives import serialization
        return self.tenant.verify_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def _take_nonce(self, nonce: bytes) -> tuple[float, tuple[tuple[str, ...], Future[list[bytes]]] | None]:
        """The nonce's issue time and its keys fetched ahead (both gone from the broker's tables)."""
        with self._lock:
            issued = self._nonces.pop(nonce, None)
            ahead = self._prefetch.pop(nonce, None)
        if issued is None:
            raise AttestationError("stale nonce: not issued by this broker, or already used")
        if time.monotonic() - issued > NONCE_LIFETIME:
            raise AttestationError(f"stale nonce: older than {NONCE_LIFETIME:g} s")
        return issued, ahead

    def release(self, request: dict[str, Any]) -> dict[str, Any]:
        host = "unknown host"
        ahead = None
        try:
            try:
                nonce = bytes.fromhex(request["nonce"])
                ak = bytes.fromhex(request["ak_public"])
                quote = Quote(bytes.fromhex(request["quote"]["attest"]), bytes.fromhex(request["quote"]["signature"]))
                binding = bytes.fromhex(request["binding"]["public"])
                certify = Quote(bytes.fromhex(request["binding"]["attest"]),
                                bytes.fromhex(request["binding"]["signature"]))
                names = [str(n) for n in request["keys"]]
                events = eventlog.loads(request["eventlog"])
            except (KeyError, TypeError, ValueError):
                raise AttestationError("malformed release request") from None
            issued, ahead = self._take_nonce(nonce)
            policy = self.tenant.policy()
            fingerprint = ak_fingerprint(ak)
            host = policy.hosts.get(fingerprint, f"AK {fingerprint[:16]}")
            if fingerprint not in policy.hosts:
                raise AttestationError(f"quote from a TPM the tenant never enrolled (AK {fingerprint[:16]}...)")
            pcrs, digest = verify_quote(quote, ak, nonce)
            if tuple(sorted(pcrs)) != tuple(sorted(policy.pcrs)):
                raise AttestationError(f"the quote covers PCRs {list(pcrs)}, the policy needs {list(policy.pcrs)}")
            if eventlog.pcr_digest(eventlog.replay(events, policy.pcrs), policy.pcrs) != digest:
                raise AttestationError("forged event log: its replay does not give the quoted PCR digest")
            eventlog.compare(events, policy.reference, policy.pcrs)
            bind_key, bind_name = verify_binding(certify, ak, binding, nonce)
            secrets = self._fetch(names, ahead, issued)
            released = {name: seal_to(bind_key, secret, nonce + bind_name + name.encode()).to_json()
                        for name, secret in zip(names, secrets)}
            secrets.clear()
        except (AttestationError, TenantError) as err:
            _drop(ahead)                                # keys fetched for a refused host: gone now
            self._log(f"REFUSED {host}: {err}")
            if isinstance(err, KeyServerError):
                raise AttestationError(f"no key released: {err}") from None
            raise
        self._log(f"released {', '.join(names)} to {host}")
        return {"keys": released, "host": host, "tenant": self.name}

    @property
    def name(self) -> str:
        """The tenant's name: its client certificate's CN (the owner of its keys in KMIP)."""
        return self.tenant.pki.client_cn()


def _drop(ahead: tuple[tuple[str, ...], Future[list[bytes]]] | None) -> None:
    """Forget keys fetched ahead: not fetched yet, they never will be; fetched, the list is emptied."""
    if ahead is not None and not ahead[1].cancel() and ahead[1].done() and ahead[1].exception() is None:
        ahead[1].result().clear()


def _handler(broker: Broker) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "qemu-mktme-broker"
        # headers and body leave in two writes: with Nagle on, the body waits for the client's
        # delayed ACK of the headers (~40 ms per request on loopback)
        disable_nagle_algorithm = True

        def log_message(self, fmt: str, *args: Any) -> None:   # no per-request noise
            pass

        def _answer(self, status: int, obj: dict[str, Any]) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802  (http.server's name)
            try:
                length = int(self.headers.get("Content-Length", "0"))
                if not 0 <= length <= MAX_BODY:
                    raise ValueError
                request = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                self._answer(400, {"error": "malformed request"})
                return
            try:
                if self.path == "/v1/nonce":
                    keys = request.get("keys") if isinstance(request, dict) else None
                    keys = [str(k) for k in keys] if isinstance(keys, list) and len(keys) <= 16 else None
                    self._answer(200, {"nonce": broker.nonce(keys).hex(), "manifest_key": broker.manifest_key().hex(),
                                       "tenant": broker.name})
                elif self.path == "/v1/manifest-key":
                    self._answer(200, {"key": broker.manifest_key().hex()})
                elif self.path == "/v1/release":
                    self._answer(200, broker.release(request))
                else:
                    self._answer(404, {"error": f"no such endpoint {self.path}"})
            except (AttestationError, TenantError) as err:
                self._answer(403, {"error": str(err)})
            except Exception as err:  # noqa: BLE001  the broker stays up; the host learns it failed
                log.exception("broker: %s", err)
                self._answer(500, {"error": f"broker failure: {type(err).__name__}"})
    return Handler


class BrokerServer:
    """The broker over HTTPS on 127.0.0.1 (``port`` 0: any free port), in a thread."""

    def __init__(self, broker: Broker, tenant: TenantDir, port: int = 0) -> None:
        self.broker = broker
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler(broker))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        cert, key = tenant.pki.server
        ctx.load_cert_chain(cert, key)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="broker", daemon=True)

    def start(self) -> BrokerServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.broker.close()
