"""The key broker: releases a tenant's keys only to a host whose TPM proves a good launch.

Our component (small; no library does this flow). One HTTPS endpoint with mutual TLS: the
broker presents the tenant's server certificate, each host its own client certificate of the
tenant's CA (issued when the tenant enrolled it; one in the tenant's CRL, another CA's, or none
is refused at the handshake). JSON in and out:

    POST /v1/nonce     {"keys": [NAME...]} (optional)       -> {"nonce": HEX, "manifest_key": HEX, "tenant": CN}
    POST /v1/manifest-key {}                                -> {"key": HEX}  (image manifests' Ed25519 key)
    POST /v1/release   {"nonce", "ak_public", "quote", "binding", "eventlog", "keys": [NAME...]}
                       -> {"keys": {NAME: SEALED}, "host": NAME, "tenant": CN}   or 403 {"error": "why"}

``tenant`` is the CN of the tenant's client certificate: the owner of its KMIP keys, and the
tenant a host's key service files the released keys under. Endpoints are :data:`Route`
functions in :func:`routes` (``BrokerServer.routes``), each given the request and the
:class:`Peer` (its certificate's CN and serial): a new endpoint is one more entry there.

A release is checked in this order, each refusal saying why and logged on the broker: the nonce
was issued here, is fresh and unused (one use, even when refused); the AK is enrolled in the
tenant's policy, as the host whose certificate the connection shows (or the tenant's own); the
quote's signature, type and nonce; the event log replays to the quoted PCR digest (else it is
forged); the events match the reference values (PCR and event that differ); the binding key is certified by the same AK for the same nonce and fixed to its TPM.
Only then are the keys sealed to the binding key (:func:`.attest.seal_to`): plaintext keys exist
only in the broker's memory. A nonce request may name the keys the host will ask for: the broker
then fetches them from the KMIP server (as the tenant) while the host measures itself and quotes,
and keeps them in its memory for that nonce only (dropped with it: used, refused or expired;
re-fetched when older than :data:`PREFETCH_MAX_AGE`). The decision is the same either way.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import h11

from ..attest import eventlog
from ..attest.client import REQUEST_TIMEOUT
from ..attest.quote import ak_fingerprint, seal_to, verify_binding, verify_quote
from ..attest.tpm import Quote
from ..errors import AttestationError, KeyServerError, TenantError
from .kmip import KmipClient
from .pki import write_crl
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

    def release(self, request: dict[str, Any], peer: str | None = None) -> dict[str, Any]:
        """Check the evidence, release the keys sealed to the host's TPM; ``peer``: the name in the
        client certificate of the connection, which must be the host the AK was enrolled as (or
        the tenant itself); logged with the verdict."""
        via = f" (certificate {peer})" if peer else ""
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
            if peer is not None and peer not in (host, self.name):
                raise AttestationError(f"the quote comes from {host}'s TPM, the connection from host {peer}'s "
                                       "certificate: a host asks for its own keys")
            pcrs, digest = verify_quote(quote, ak, nonce)
            if tuple(sorted(pcrs)) != tuple(sorted(policy.pcrs)):
                raise AttestationError(f"the quote covers PCRs {list(pcrs)}, the policy needs {list(policy.pcrs)}")
            if eventlog.pcr_digest(eventlog.replay(events, policy.pcrs), policy.pcrs) != digest:
                raise AttestationError("forged event log: its replay does not give the quoted PCR digest")
            eventlog.compare(events, policy.reference, policy.pcrs)
            bind_key, bind_name = verify_binding(certify, ak, binding, nonce)
            barred = [name for name in names if not policy.allows(host, name)]
            if barred:
                raise AttestationError(f"key {barred[0]!r} is not for host {host} (the tenant's policy allows it "
                                       f"on {', '.join(policy.key_hosts[barred[0]]) or 'no host'})")
            secrets = self._fetch(names, ahead, issued)
            released = {name: seal_to(bind_key, secret, nonce + bind_name + name.encode()).to_json()
                        for name, secret in zip(names, secrets)}
            secrets.clear()
        except (AttestationError, TenantError) as err:
            _drop(ahead)                                # keys fetched for a refused host: gone now
            self._log(f"REFUSED {host}: {err}{via}")
            if isinstance(err, KeyServerError):
                raise AttestationError(f"no key released: {err}") from None
            raise
        self._log(f"released {', '.join(names)} to {host}{via}")
        return {"keys": released, "host": host, "tenant": self.name}

    @property
    def name(self) -> str:
        """The tenant's name: its client certificate's CN (the owner of its keys in KMIP)."""
        return self.tenant.pki.client_cn()


def _drop(ahead: tuple[tuple[str, ...], Future[list[bytes]]] | None) -> None:
    """Forget keys fetched ahead: not fetched yet, they never will be; fetched, the list is emptied."""
    if ahead is not None and not ahead[1].cancel() and ahead[1].done() and ahead[1].exception() is None:
        ahead[1].result().clear()


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a broker connection: its client certificate (the tenant's CA
    checked it at the handshake). ``cn`` is the host's name for a host certificate."""

    cn: str
    serial: int
    address: str


Route = Callable[[Any, Peer], dict[str, Any]]
"""A broker endpoint: the request's JSON body and the peer -> the answer's JSON body (run in a
worker thread; raise ``AttestationError``/``TenantError`` for a 403, ``BadRequest`` for a 400)."""


class BadRequest(ValueError):
    """A request the broker cannot read (answered 400 with its message)."""


def routes(broker: Broker) -> dict[str, Route]:
    """The broker's endpoints; add one here (or to :attr:`BrokerServer.routes`) to extend it."""
    def nonce(request: Any, peer: Peer) -> dict[str, Any]:
        keys = request.get("keys")
        keys = [str(k) for k in keys] if isinstance(keys, list) and len(keys) <= 16 else None
        return {"nonce": broker.nonce(keys).hex(), "manifest_key": broker.manifest_key().hex(), "tenant": broker.name}

    def manifest_key(request: Any, peer: Peer) -> dict[str, Any]:
        return {"key": broker.manifest_key().hex()}

    def release(request: Any, peer: Peer) -> dict[str, Any]:
        return broker.release(request, peer.cn)
    return {"/v1/nonce": nonce, "/v1/manifest-key": manifest_key, "/v1/release": release}


@dataclass(frozen=True)
class Limits:
    """How much a connection may cost the broker.

    ``handshake``: seconds for the TLS handshake; ``request``: seconds from a request's first byte
    to its last (headers and body); ``idle``: seconds a kept-alive connection may wait for its
    next request; ``connections``: connections served at a time. Past it a newcomer waits (up to
    ``handshake`` seconds; at most ``waiting`` wait, newest first, the oldest waiter is closed
    when more come) for a slot that frees, or for the oldest connection that is not being
    answered to have held its slot for ``grace`` seconds (an honest host handshakes and asks well
    within that): then that one is closed for it. A burst of honest hosts is served as slots
    free; a flood of silent ones is recycled every ``grace``.
    ``workers``: requests the broker works on at a time (the others wait their turn);
    ``header``/``body``: bytes.
    """

    handshake: float = 5.0
    request: float = REQUEST_TIMEOUT
    idle: float = 30.0
    connections: int = 64
    waiting: int = 1024
    grace: float = 1.0
    workers: int = 4
    header: int = 16 << 10
    body: int = MAX_BODY


class _Conn:
    """One client connection's bookkeeping: busy while its request is being answered."""

    __slots__ = ("task", "opened", "busy")

    def __init__(self, task: asyncio.Task[None] | None) -> None:
        self.task = task
        self.opened = time.monotonic()
        self.busy = False


class BrokerServer:
    """The broker over HTTPS with mutual TLS, on ``host`` (default 127.0.0.1) and ``port`` (0:
    any free port), served by an asyncio loop in a thread.

    Written on asyncio's own TLS streams with h11 (python-hyper's HTTP/1.1 parser; it bounds the
    header size and frames bodies): no maintained asyncio HTTP server lets each connection's
    handshake run under its own deadline with an SSL context chosen at accept time (a revocation
    list that changes while the server runs), nor bounds the connections it keeps. Every
    connection runs as its own task under the deadlines of :class:`Limits`: a silent, slow or
    half-sending client costs only its own connection, a flood of them is recycled (oldest first)
    while honest hosts wait their turn. Clients must present a certificate of the tenant's CA that is not in
    its CRL; everything else is refused at the handshake. A request the broker cannot read gets
    one 4xx answer with a JSON ``error``, then the connection closes.
    """

    def __init__(self, broker: Broker, tenant: TenantDir, port: int = 0, *, host: str = "127.0.0.1",
                 limits: Limits = Limits()) -> None:
        self.broker = broker
        self.pki = tenant.pki
        self.limits = limits
        self.routes: dict[str, Route] = routes(broker)
        if not self.pki.crl.exists():                 # a tenant made before revocation existed
            write_crl(self.pki, [])
        self._ctx: ssl.SSLContext | None = None
        self._ctx_stamp: tuple[int, int, int] | None = None     # (0, 0, 0): the CRL is unusable
        self._conns: list[_Conn] = []
        self._waiting: collections.deque[tuple[_Conn, asyncio.Future[None]]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._pool = ThreadPoolExecutor(limits.workers, thread_name_prefix="broker")
        self._loop = asyncio.new_event_loop()
        self._context()                              # a bad certificate fails here, not at the first client
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._serve, host, port, backlog=max(128, limits.connections)))
        except OSError as err:
            self._loop.close()
            raise KeyServerError(f"the broker cannot listen on {host}:{port}: {err.strerror or err}") from None
        self.host, self.port = self._server.sockets[0].getsockname()[:2]
        self._thread = threading.Thread(target=self._loop.run_forever, name="broker", daemon=True)
        self.stats = {"connections": 0, "evicted": 0, "turned_away": 0, "handshake_failed": 0, "timeouts": 0}

    def start(self) -> BrokerServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        async def shut() -> None:
            self._server.close()
            if self._timer is not None:
                self._timer.cancel()
            for c in [*self._conns, *(w for w, _ in self._waiting)]:
                if c.task is not None:
                    c.task.cancel()
            await asyncio.sleep(0)
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.broker.close()

    # ------------------------------------------------------------------ TLS

    def _context(self) -> ssl.SSLContext:
        """The server's SSL context, rebuilt when the CRL changed (one stat per connection).
        A CRL that is gone or unreadable refuses every client (logged once per change): a
        revocation never lapses by accident."""
        try:
            st = os.stat(self.pki.crl)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            ctx = self._ctx
            if ctx is None or stamp != self._ctx_stamp:
                ctx = self._build_context()
                self._ctx, self._ctx_stamp = ctx, stamp
        except (OSError, ssl.SSLError) as err:
            if self._ctx_stamp != (0, 0, 0):
                self.broker._log(f"REFUSING every host: the tenant's CRL {self.pki.crl} cannot be used ({err})")
            self._ctx, self._ctx_stamp = None, (0, 0, 0)
            raise
        return ctx

    def _build_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        cert, key = self.pki.server
        ctx.load_cert_chain(cert, key)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(self.pki.ca))
        ctx.load_verify_locations(cafile=str(self.pki.crl))
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        return ctx

    # ------------------------------------------------------------------ connections

    def _free_slot(self) -> bool:
        """Whether a connection may start: under the bound, or past it once the oldest connection
        that is not being answered has held its slot for ``limits.grace`` (it is closed)."""
        if len(self._conns) < self.limits.connections:
            return True
        now = time.monotonic()
        victim = next((c for c in self._conns if not c.busy and now - c.opened >= self.limits.grace), None)
        if victim is None:
            return False
        self._conns.remove(victim)
        if victim.task is not None:
            victim.task.cancel()
        self.stats["evicted"] += 1
        return True

    def _kick(self) -> None:
        """Hand free slots to the waiting connections, the newest first (under a flood, the older
        waiters are the flood; an honest burst frees its slots within milliseconds anyway); while
        some wait, look again every quarter of ``limits.grace``."""
        while self._waiting and self._free_slot():
            conn, admitted = self._waiting.pop()
            if not admitted.done():
                conn.opened = time.monotonic()
                self._conns.append(conn)
                admitted.set_result(None)
        if self._waiting and self._timer is None:
            def again() -> None:
                self._timer = None
                self._kick()
            self._timer = self._loop.call_later(self.limits.grace / 4, again)

    async def _admit(self, conn: _Conn) -> bool:
        """A slot for ``conn``, waited for (up to the handshake deadline) when all are taken;
        False when the wait ran out or newer connections pushed this one out of the queue."""
        if not self._waiting and self._free_slot():
            self._conns.append(conn)
            return True
        if len(self._waiting) >= self.limits.waiting:
            stale, _ = self._waiting.popleft()
            if stale.task is not None:
                stale.task.cancel()
        admitted: asyncio.Future[None] = self._loop.create_future()
        self._waiting.append((conn, admitted))
        self._kick()
        try:
            async with asyncio.timeout(self.limits.handshake):
                await admitted
        except TimeoutError:
            return False
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(asyncio.current_task())
        self.stats["connections"] += 1
        address = str(writer.get_extra_info("peername", ("?",))[0])
        try:
            if not await self._admit(conn):
                self.stats["turned_away"] += 1
                return
            stream = _TlsStream(reader, writer, self._context())
            try:
                async with asyncio.timeout(self.limits.handshake):
                    await stream.handshake()
            except ssl.SSLError:
                self.stats["handshake_failed"] += 1
                await _linger(reader, writer)              # the alert reaches the client before the close
                return
            except (TimeoutError, OSError):
                self.stats["handshake_failed"] += 1
                return
            await self._http(stream, conn, _peer(stream.tls.getpeercert() or {}, address))
        except (ConnectionError, ssl.SSLError, OSError):
            pass                                         # the peer went away: its loss only
        finally:
            if conn in self._conns:
                self._conns.remove(conn)
                self._kick()
            writer.transport.abort()

    async def _http(self, stream: _TlsStream, conn: _Conn, peer: Peer) -> None:
        """HTTP/1.1 requests on one connection, kept alive, each under the deadlines."""
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.header)
        while True:
            try:
                path, body = await self._read_request(stream, h)
            except _Closed:
                return
            except TimeoutError:
                self.stats["timeouts"] += 1
                if h.their_state is h11.SEND_BODY or (h.their_state is h11.IDLE and h.trailing_data[0]):
                    await self._send(stream, h, 408, {"error": f"request not complete within {self.limits.request:g} s"})
                return
            except _Refused as refusal:
                await self._send(stream, h, refusal.status, {"error": str(refusal)}, refusal.headers)
                await _linger(stream.reader, stream.writer)   # a client still sending reads its answer
                return
            conn.busy = True
            status, answer = await self._dispatch(path, body, peer)
            conn.busy = False
            if not await self._send(stream, h, status, answer) or h.our_state is not h11.DONE \
                    or h.their_state is not h11.DONE:
                return
            h.start_next_cycle()

    async def _read_request(self, stream: _TlsStream, h: h11.Connection) -> tuple[str, bytes]:
        """One request's target and body; ``_Refused`` for what the broker does not take."""
        body = bytearray()
        path = ""
        deadline: float | None = None            # from the request's first byte
        loop = asyncio.get_running_loop()
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as err:
                raise _Refused(err.error_status_hint if 400 <= err.error_status_hint < 500 else 400,
                               f"malformed HTTP request: {err}") from None
            if event is h11.NEED_DATA:
                if deadline is None and (h.their_state is not h11.IDLE or h.trailing_data[0]):
                    deadline = loop.time() + self.limits.request
                wait = self.limits.idle if deadline is None else deadline - loop.time()
                async with asyncio.timeout(max(wait, 0)):
                    data = await stream.read()
                if not data and h.their_state is h11.IDLE and not h.trailing_data[0]:
                    raise _Closed
                if deadline is None:
                    deadline = loop.time() + self.limits.request
                h.receive_data(data)
            elif isinstance(event, h11.Request):
                path = event.target.decode("ascii", "replace")
                if event.method != b"POST":
                    raise _Refused(405, f"method {event.method.decode('ascii', 'replace')} not allowed: POST only",
                                   [("Allow", "POST")])
                if path not in self.routes:
                    raise _Refused(404, f"no such endpoint {path}")
                length = dict(event.headers).get(b"content-length")
                if length is not None and int(length) > self.limits.body:
                    raise _Refused(413, f"request body of {int(length)} bytes, more than {self.limits.body}")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.limits.body:
                    raise _Refused(413, f"request body over {self.limits.body} bytes")
            elif isinstance(event, h11.EndOfMessage):
                return path, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                raise _Closed

    async def _dispatch(self, path: str, body: bytes, peer: Peer) -> tuple[int, dict[str, Any]]:
        def work() -> tuple[int, dict[str, Any]]:
            try:
                try:
                    request = json.loads(body or b"{}")
                except RecursionError:
                    raise BadRequest("malformed request: JSON nested too deeply") from None
                except ValueError as err:
                    raise BadRequest(f"malformed request: not JSON ({err})") from None
                if not isinstance(request, dict):
                    raise BadRequest("malformed request: the body must be a JSON object")
                return 200, self.routes[path](request, peer)
            except BadRequest as err:
                return 400, {"error": str(err)}
            except (AttestationError, TenantError) as err:
                return 403, {"error": str(err)}
            except Exception as err:  # noqa: BLE001  the broker stays up; the host learns it failed
                log.exception("broker: %s", err)
                return 500, {"error": f"broker failure: {type(err).__name__}"}
        return await asyncio.get_running_loop().run_in_executor(self._pool, work)

    async def _send(self, stream: _TlsStream, h: h11.Connection, status: int, obj: dict[str, Any],
                    headers: list[tuple[str, str]] | None = None) -> bool:
        """One JSON answer (closing the connection after a 4xx/5xx); False when it cannot be sent."""
        if h.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return False
        body = json.dumps(obj).encode()
        hdrs = [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                ("Server", "qemu-mktme-broker"), *(headers or [])]
        if status >= 400:
            hdrs.append(("Connection", "close"))
        try:
            data = h.send(h11.Response(status_code=status, headers=hdrs)) + h.send(h11.Data(data=body)) \
                + h.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            return False
        async with asyncio.timeout(self.limits.request):
            await stream.write(data)
        return True


class _TlsStream:
    """TLS over an asyncio TCP stream through OpenSSL's memory BIOs (``SSLContext.wrap_bio``).

    Not asyncio's ``start_tls``: on a failed handshake (no client certificate, another CA, a
    revoked one) asyncio drops the connection before OpenSSL's alert is sent, so the host would
    only see an EOF; here the alert leaves first and the host is told why."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: ssl.SSLContext) -> None:
        self.reader, self.writer = reader, writer
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self._in, self._out, server_side=True)

    async def _flush(self) -> None:
        if self._out.pending:
            self.writer.write(self._out.read())
            await self.writer.drain()

    async def _fill(self) -> bool:
        data = await self.reader.read(64 << 10)
        if not data:
            self._in.write_eof()
            return False
        self._in.write(data)
        return True

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise ConnectionError("the client closed during the TLS handshake") from None
            except ssl.SSLError:
                with contextlib.suppress(OSError):
                    await self._flush()              # the alert: why the client is refused
                raise
        await self._flush()

    async def read(self) -> bytes:
        """Decrypted bytes (b"" when the client closed)."""
        while True:
            try:
                return self.tls.read(64 << 10)
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    return b""
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    async def write(self, data: bytes) -> None:
        self.tls.write(data)
        await self._flush()


def _peer(cert: dict[str, Any], address: str) -> Peer:
    """The peer of a verified client certificate (``SSLObject.getpeercert()``'s dictionary)."""
    cn = next((value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"), "?")
    return Peer(str(cn), int(str(cert.get("serialNumber", "0")), 16), address)


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seconds: float = 1.0) -> None:
    """Close our side gently and read what the client still sends for up to ``seconds``: closing
    a socket with unread input sends a reset, which takes the alert just sent with it."""
    with contextlib.suppress(OSError, TimeoutError):
        writer.write_eof()
        async with asyncio.timeout(seconds):
            while await reader.read(64 << 10):
                pass


class _Closed(Exception):
    """The client closed its connection between requests."""


class _Refused(Exception):
    def __init__(self, status: int, message: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers
