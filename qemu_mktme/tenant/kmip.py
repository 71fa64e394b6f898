"""The tenant's key server: PyKMIP's server and client, configured here, quiet towards users.

PyKMIP does KMIP (TTLV over mutual TLS 1.2, objects owned by the client certificate's CN); this
module only writes its configuration with every path explicit (its defaults point at
``/etc/pykmip`` and ``/var/log/pykmip``), uses the ``TLS1.2`` auth suite (``Basic`` fails with
NO_SHARED_CIPHER on OpenSSL 3), bounds every client call (socket timeout, a few retries when the
server is down or slow) and keeps PyKMIP's deprecation warnings (``ssl.PROTOCOL_TLS``,
SQLAlchemy's ``declarative_base``, cryptography's "decrepit" ciphers) out of our users' output.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import KeyServerError, logged
from .pki import Pki

KEY_BITS = 256
TIMEOUT = 5
"""Seconds a KMIP request may take before it counts as failed (and is retried)."""
RETRIES = 2
RETRY_DELAY = 0.3


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """PyKMIP's import and use without its deprecation warnings and log lines reaching the user."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _kmip():
    try:
        with quiet():
            from kmip import enums
            from kmip.core import exceptions as kmip_exceptions
            from kmip.pie import client, exceptions as pie_exceptions
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise KeyServerError(f"PyKMIP is not installed ({err}): pip install 'qemu-mktme[tenant]'") from None
    logging.getLogger("kmip").setLevel(logging.CRITICAL)
    logging.getLogger("kmip").propagate = False
    return enums, client, pie_exceptions, kmip_exceptions


def server_config(state: Path, pki: Pki, port: int, hostname: str = "127.0.0.1") -> Path:
    """Write PyKMIP's ``server.conf`` for ``state`` (policies and database inside it) and return it."""
    cert, key = pki.server
    (state / "policies").mkdir(mode=0o700, exist_ok=True)
    conf = state / "server.conf"
    conf.write_text("[server]\n"
                    f"hostname={hostname}\n"
                    f"port={port}\n"
                    f"certificate_path={cert}\n"
                    f"key_path={key}\n"
                    f"ca_path={pki.ca}\n"
                    "auth_suite=TLS1.2\n"
                    "enable_tls_client_auth=True\n"
                    f"policy_path={state / 'policies'}\n"
                    f"database_path={state / 'pykmip.db'}\n"
                    "logging_level=INFO\n")
    return conf


@dataclass(frozen=True)
class KmipEndpoint:
    """Where a KMIP server listens and the client identity to use with it. ``check_name``: the
    server's certificate must name ``hostname`` (PyKMIP's client checks the CA only); off only
    for the key server's own client of the PyKMIP it runs."""

    port: int
    pki: Pki
    hostname: str = "127.0.0.1"
    check_name: bool = True


class KmipClient:
    """AES-256 keys on a KMIP server, as the client certificate's CN (the tenant).

    Every call opens its own TLS session, or with ``persistent`` reuses one (reopened when it
    fails), with :data:`TIMEOUT` and :data:`RETRIES`; failures are ``KeyServerError`` saying what
    happened. Calls are serialised (PyKMIP's client is not thread-safe). A persistent client (the
    broker's) checks a key's Name attribute once per unique identifier and remembers it: a KMIP
    Name is the tenant's label of that object, and every Get still checks the identifier, the
    algorithm and the length of what comes back (one KMIP operation per key instead of two).
    """

    def __init__(self, endpoint: KmipEndpoint, *, timeout: float = TIMEOUT, retries: int = RETRIES,
                 persistent: bool = False) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.retries = retries
        self.persistent = persistent          # keep one session open (the broker): no handshake per release
        self._conn = None
        self._lock = threading.Lock()
        self._named: set[tuple[str, str]] = set()     # (uid, name) pairs the server confirmed
        endpoint.pki.check(("ca-cert.pem", "client-cert.pem", "client-key.pem"))

    def _config(self) -> Path:
        conf = self.endpoint.pki.directory / "kmip-client.conf"
        cert, key = self.endpoint.pki.client
        text = ("[client]\n"
                f"host={self.endpoint.hostname}\nport={self.endpoint.port}\n"
                f"certfile={cert}\nkeyfile={key}\nca_certs={self.endpoint.pki.ca}\n"
                "cert_reqs=CERT_REQUIRED\nssl_version=PROTOCOL_TLS\n"
                f"timeout={max(1, int(self.timeout))}\n")
        if not conf.exists() or conf.read_text() != text:
            conf.write_text(text)
        return conf

    def _open(self, client_mod, enums):
        cert, key = self.endpoint.pki.client
        c = client_mod.ProxyKmipClient(hostname=self.endpoint.hostname, port=self.endpoint.port,
                                       cert=str(cert), key=str(key), ca=str(self.endpoint.pki.ca),
                                       config_file=str(self._config()), kmip_version=enums.KMIPVersion.KMIP_1_2)
        c.proxy.timeout = self.timeout        # ProxyKmipClient would keep KMIPProxy's 30 s
        c.open()
        if self.endpoint.check_name:
            try:
                _check_name(c.proxy.socket.getpeercert(binary_form=True), self.endpoint.hostname)
            except KeyServerError:
                c.close()
                raise
        return c

    def _drop(self) -> None:
        if self._conn is not None:
            with logged(__name__, "closing the KMIP connection"):
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _call(self, what: str, fn):
        enums, client_mod, pie_exc, kmip_exc = _kmip()
        last: Exception | None = None
        attempt = 0
        while attempt <= self.retries:
            if attempt:
                time.sleep(RETRY_DELAY * attempt)
            attempt += 1
            with self._lock, quiet():
                reused = self._conn is not None
                try:
                    if self._conn is None:
                        self._conn = self._open(client_mod, enums)
                    try:
                        return fn(self._conn, enums)
                    finally:
                        if not self.persistent:
                            self._drop()
                except KeyServerError:
                    self._drop()
                    raise
                except (pie_exc.KmipOperationFailure, kmip_exc.KmipError) as err:
                    if reused and not isinstance(err, pie_exc.KmipOperationFailure):
                        self._drop()                     # a kept session the server closed (idle deadline)
                        attempt -= 1
                        continue
                    reason = getattr(err, "reason", None)
                    name = getattr(reason, "name", None) or type(err).__name__
                    raise KeyServerError(f"key server refused {what}: {name}: {getattr(err, 'message', err)}") from None
                except ssl.SSLError as err:
                    self._drop()
                    if reused:
                        attempt -= 1
                        continue
                    raise KeyServerError(f"key server {self._where()}: TLS failed for {what}: {err.reason or err}") from None
                except (ConnectionError, TimeoutError, OSError) as err:
                    self._drop()
                    last = err
                except Exception as err:  # noqa: BLE001  PyKMIP wraps socket trouble in its own exceptions
                    self._drop()
                    if reused:                           # a kept session gone stale: once more on a new one
                        attempt -= 1
                        continue
                    if "timed out" in str(err) or "Connection" in type(err).__name__ or "closed" in str(err):
                        last = err
                        continue
                    raise KeyServerError(f"key server {self._where()}: {what}: {err}") from None
        kind = "did not answer in time" if isinstance(last, (socket.timeout, TimeoutError)) or "timed out" in str(last) \
            else "is not reachable"
        raise KeyServerError(f"key server {self._where()} {kind} ({what}, {self.retries + 1} attempts): {last}")

    def _where(self) -> str:
        return f"{self.endpoint.hostname}:{self.endpoint.port}"

    def create_key(self, name: str) -> str:
        """A new active AES-256 key named ``name`` on the server; its unique identifier."""
        def create(c, enums):
            uid = c.create(enums.CryptographicAlgorithm.AES, KEY_BITS, name=name)
            c.activate(uid)
            return uid
        return self._call(f"create key {name!r}", create)

    def get_key(self, uid: str, name: str | None = None) -> bytes:
        """The AES-256 key ``uid`` (named ``name``, when given); ``KeyServerError`` when the server
        answers with something else."""
        return self.get_keys([(uid, name)])[0]

    def get_keys(self, wanted: list[tuple[str, str | None]]) -> list[bytes]:
        """Several keys (uid, expected name or None) in one KMIP session (one TLS handshake)."""
        def get(c, enums):
            found = []
            for uid, name in wanted:
                obj = c.get(uid)
                names: list[str] = [name] if (uid, name) in self._named else []
                if name is not None and not names:  # Get carries the key block only; Name is an attribute
                    _, attributes = c.get_attributes(uid, ["Name"])
                    names = [str(a.attribute_value.name_value.value) for a in attributes]
                found.append((uid, name, obj, names))
            return found, enums
        found, enums = self._call(f"get key {', '.join(u for u, _ in wanted)}", get)
        keys = []
        for uid, name, obj, names in found:
            got_uid = getattr(obj, "unique_identifier", None)
            if got_uid is not None and str(got_uid) != str(uid):
                raise KeyServerError(f"key server answered for key {got_uid} when asked for {uid}")
            if name is not None and name not in names:
                raise KeyServerError(f"key server answered for key {', '.join(names) or '(unnamed)'} (id {uid}) "
                                     f"when asked for {name!r}")
            if getattr(obj, "cryptographic_algorithm", None) != enums.CryptographicAlgorithm.AES \
                    or len(getattr(obj, "value", b"")) * 8 != KEY_BITS:
                raise KeyServerError(f"key server object {uid} is not an AES-{KEY_BITS} key")
            keys.append(bytes(obj.value))
            if name is not None and self.persistent:
                self._named.add((uid, name))
        return keys

    def destroy_key(self, uid: str) -> None:
        def destroy(c, enums):
            with logged(__name__, f"revoking key {uid} before destroying it"):
                c.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, uid)
            c.destroy(uid)
        self._call(f"destroy key {uid}", destroy)


def _check_name(der: bytes | None, hostname: str) -> None:
    """``KeyServerError`` unless the server certificate ``der`` names ``hostname`` (an IP address
    or a DNS name) in its subjectAltNames."""
    import ipaddress

    from cryptography import x509
    cert = x509.load_der_x509_certificate(der or b"")
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise KeyServerError(f"key server {hostname}: its certificate names no host") from None
    names = [*map(str, sans.get_values_for_type(x509.IPAddress)), *sans.get_values_for_type(x509.DNSName)]
    try:
        wanted = str(ipaddress.ip_address(hostname))
    except ValueError:
        wanted = hostname.lower().rstrip(".")
    if wanted not in [n.lower() for n in names]:
        raise KeyServerError(f"key server {hostname}: its certificate does not name {hostname} "
                             f"(it names {', '.join(names)})")


# ---------------------------------------------------------------------------------- server


@dataclass(frozen=True)
class SessionLimits:
    """What one KMIP connection may cost the server: ``handshake`` seconds for TLS, ``idle``
    seconds waiting for a request's first byte, ``request`` seconds for the rest of it,
    ``sessions`` connections at a time, ``message`` bytes per request."""

    handshake: float = 5.0
    idle: float = 30.0
    request: float = 10.0
    sessions: int = 32
    message: int = 1 << 20


def serve_bounded(server, limits: SessionLimits = SessionLimits(), stop: threading.Event | None = None) -> None:
    """PyKMIP's ``KmipServer`` (started) served with bounds, until SIGTERM or SIGINT (on the
    main thread) or until ``stop`` is set.

    PyKMIP's own ``serve()`` hands each accepted connection to a session thread whose only bound
    is the process-wide 10 s socket timeout it sets: the TLS handshake ends after 10 s, but an
    authenticated peer that goes silent keeps its thread forever (its loop logs the timeout and
    reads again), a request header may announce 4 GiB, and nothing bounds the threads (its
    listen backlog is 5). This loop accepts on PyKMIP's socket and runs PyKMIP's session class
    with deadlines (handshake, first byte, whole request), a size bound, and at most
    ``limits.sessions`` sessions: past that, the oldest session that is not inside a request is
    shut down for the newcomer (one that never finished its handshake first); when every one is
    inside a request, the newcomer is closed.
    """
    import signal
    with quiet():
        from kmip.core import utils
        from kmip.services.server import session as session_mod
    import struct

    live: list[_BoundedSessionBase] = []
    lock = threading.Lock()

    class Session(session_mod.KmipSession, _BoundedSessionBase):  # type: ignore[misc]
        def run(self) -> None:
            try:
                self._deadline = time.monotonic() + limits.handshake
                self._connection.settimeout(limits.handshake)
                self._connection.do_handshake()
                self.established = True
                while True:
                    self._handle_message_loop()
            except Exception as err:  # noqa: BLE001  any failure ends this session only
                self._logger.info("session ends: %s", err)
            finally:
                with lock:
                    if self in live:
                        live.remove(self)
                with contextlib.suppress(OSError):
                    self._connection.close()

        def _receive_request(self):
            self.busy = False
            self._deadline = time.monotonic() + limits.idle
            first = self._receive_bytes(1)
            self.busy = True
            self._deadline = time.monotonic() + limits.request
            header = first + self._receive_bytes(7)
            size = struct.unpack("!I", header[4:])[0]
            if size > limits.message:
                raise ValueError(f"request of {size} bytes, more than {limits.message}")
            return utils.BytearrayStream(header + self._receive_bytes(size))

        def _receive_bytes(self, message_size: int) -> bytes:
            parts, got = [], 0
            while got < message_size:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("deadline passed")
                self._connection.settimeout(left)
                part = self._connection.recv(min(message_size - got, 64 << 10))
                if not part:
                    raise ConnectionError("peer closed")
                parts.append(part)
                got += len(part)
            return b"".join(parts)

    stopping = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum: int, frame: object) -> None:
            stopping.set()
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    sock = server._socket
    sock.listen(128)
    sock.settimeout(0.5)
    number = 0
    while not stopping.is_set():
        try:
            conn, address = sock.accept()
        except OSError:                      # the 0.5 s tick (to see SIGTERM), or a failed accept
            continue
        with lock:
            if len(live) >= limits.sessions:
                idle = [s for s in live if not s.busy]
                # sessions that never finished their handshake first (no certificate shown yet): the
                # broker's kept-alive session outlives a flood of silent peers
                victim = next((s for s in idle if not s.established), None) or next(iter(idle), None)
                if victim is None:
                    conn.close()
                    continue
                live.remove(victim)
                with contextlib.suppress(OSError):   # the fd only: its thread owns the SSL object
                    socket.socket.shutdown(victim._connection, socket.SHUT_RDWR)
            number += 1
            s = Session(server._engine, conn, address, name=f"{number:08}",
                        enable_tls_client_auth=server.config.settings.get("enable_tls_client_auth"),
                        auth_settings=server.config.settings.get("auth_plugins"))
            s.daemon = True
            live.append(s)
        s.start()


class _BoundedSessionBase:
    """What :func:`serve_bounded` adds to PyKMIP's session: whether it is inside a request and
    whether it finished its handshake."""

    busy = False
    established = False
    _deadline = 0.0
    _connection: ssl.SSLSocket
