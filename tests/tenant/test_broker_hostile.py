"""Hostile peers against the key broker: real sockets, real mutual TLS, an in-process
``BrokerServer`` with short deadlines. Each attack holds its connections open while a host
with a good certificate asks for a nonce: the host gets its answer while the attacker is still
connected (it waited for nobody), and the attacker's connection is closed at its deadline.
Refusals: no certificate, another CA's, a revoked host's (at the handshake, told why), a
broker certificate that does not name the dialled address (by the host), and every request the
broker cannot read (one 4xx answer)."""

from __future__ import annotations

import socket
import ssl
import sys
import time
from pathlib import Path

import pytest

from helpers import load_script, patience

from qemu_mktme.errors import AttestationError, KeyServerError
from qemu_mktme.tenant import admin
from qemu_mktme.attest.client import BrokerClient
from qemu_mktme.tenant.broker import Broker, BrokerServer, Limits
from qemu_mktme.tenant.kmip import KmipClient, KmipEndpoint
from qemu_mktme.tenant.pki import CLIENT_CERT, CLIENT_KEY, create_pki
from qemu_mktme.tenant.store import TenantDir

def _probe():
    return sys.modules.get("probe_keyserver") or load_script("probe_keyserver")


def _limits() -> Limits:
    return Limits(handshake=patience(0.5), request=patience(0.5), idle=patience(0.75), connections=8, workers=2,
                  grace=patience(0.25))


class Served:
    def __init__(self, base: Path, host: str = "127.0.0.1", server_names: tuple[str, ...] = ()) -> None:
        self.tenant = TenantDir(base / "tenant")
        self.tenant.init("hostile", server_names)
        kmip = KmipClient(KmipEndpoint(1, self.tenant.pki))        # never called: no case names a key
        self.notes: list[str] = []
        self.server = BrokerServer(Broker(self.tenant, kmip, logger=self.notes.append), self.tenant, host=host,
                                   limits=_limits()).start()
        self.host = host
        self.base = base
        self.certs = {h: self.enrol(h) for h in ("h1", "h2")}

    def enrol(self, host: str) -> tuple[Path, Path]:
        d = admin.enrol_credentials(self.tenant, host, self.base / "hosts" / host / "tls")
        return d / CLIENT_CERT, d / CLIENT_KEY

    @property
    def port(self) -> int:
        return self.server.port

    def client(self, host: str = "h1", *, dial: str | None = None, cert=None) -> BrokerClient:
        return BrokerClient(f"https://{dial or self.host}:{self.port}", self.tenant.pki.ca,
                            cert=self.certs[host] if cert is None else cert, timeout=patience(5))

    def ctx(self, host: str = "h1") -> ssl.SSLContext:
        return _probe().client_context(self.tenant.pki.ca, self.certs[host])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    s = Served(tmp_path_factory.mktemp("hostile"))
    yield s
    s.server.stop()


def _open(sock: socket.socket) -> bool:
    """Whether the server still holds ``sock`` open (no EOF, no reset waiting)."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except (ConnectionError, OSError):
        return False
    finally:
        sock.setblocking(True)


def _served_beside(served: Served, attackers: list[socket.socket]) -> None:
    """A good host's nonce while ``attackers`` hold their connections: answered, and before the
    server dropped the first attacker (the host waited for no one)."""
    time.sleep(0.1)
    client = served.client()
    try:
        assert len(client.nonce()) == 32
    finally:
        client.close()
    assert _open(attackers[0]), "the attacker was dropped before the good host was served"


def _closed_by_server(sock: socket.socket, deadline: float) -> bytes:
    closed, sent = _probe().closed_within(sock, deadline + patience(2))
    assert closed is not None, f"the server still holds the attacker's connection after {deadline:g} s"
    return sent


def test_an_idle_tcp_connection_costs_only_itself(served):
    (idle,) = _probe().idle_tcp(served.port)
    with idle:
        _served_beside(served, [idle])
        _closed_by_server(idle, served.server.limits.handshake)


def test_half_a_client_hello_costs_only_itself(served):
    with _probe().half_hello(served.port) as half:
        _served_beside(served, [half])
        _closed_by_server(half, served.server.limits.handshake)


def test_a_session_that_says_nothing_after_tls_costs_only_itself(served):
    with _probe().tls(served.port, served.ctx("h2")) as quiet:
        client = served.client()
        assert len(client.nonce()) == 32
        client.close()
        assert quiet.pending() == 0
        _closed_by_server(quiet, served.server.limits.idle)


@pytest.mark.parametrize("body", [False, True], ids=["headers", "body"])
def test_a_half_sent_request_gets_408_at_its_deadline(served, body):
    with _probe().half_request(served.port, served.ctx(), body=body) as half:
        client = served.client("h2")
        assert len(client.nonce()) == 32
        client.close()
        sent = _closed_by_server(half, served.server.limits.request)
    assert sent.startswith(b"HTTP/1.1 408 "), sent[:80]
    assert b"request not complete within" in sent


def test_a_flood_past_the_bound_is_recycled_while_a_host_is_served(served):
    limits = served.server.limits
    evicted = served.server.stats["evicted"]
    flood = _probe().idle_tcp(served.port, 3 * limits.connections)
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        client = served.client()
        assert len(client.nonce()) == 32
        client.close()
        assert time.monotonic() - t0 < limits.handshake                  # did not wait out the flood's deadline
        assert len(served.server._conns) <= limits.connections
        assert served.server.stats["evicted"] - evicted >= limits.connections
        assert sum(_open(s) for s in flood) < 3 * limits.connections
    finally:
        for s in flood:
            s.close()


def test_a_burst_of_honest_hosts_past_the_bound_is_answered_in_full(served):
    """Issue 24's load: many more hosts at once than the broker serves at a time; each gets its
    nonce (the ones past the bound wait for a slot, none is closed)."""
    import concurrent.futures
    n = 6 * served.server.limits.connections

    def ask(i: int) -> int:
        client = served.client("h1" if i % 2 else "h2")
        try:
            return len(client.nonce())
        finally:
            client.close()
    turned_away = served.server.stats["turned_away"]
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        assert list(pool.map(ask, range(n))) == [32] * n
    assert served.server.stats["turned_away"] == turned_away


def test_no_client_certificate_is_refused_at_the_handshake(served):
    with pytest.raises(AttestationError, match="refused this host at the TLS handshake: no client certificate"):
        BrokerClient(f"https://127.0.0.1:{served.port}", served.tenant.pki.ca).nonce()
    # and the raw handshake shows it: the request never reaches the broker
    ctx = ssl.create_default_context(cafile=str(served.tenant.pki.ca))
    with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED|certificate required"):
        _probe().raw_request(served.port, ctx, _probe().post("/v1/nonce", b"{}"))


def test_a_certificate_of_another_ca_is_refused_at_the_handshake(served, tmp_path):
    other = create_pki(tmp_path / "other", client_cn="h1")               # same name, another CA
    with pytest.raises(AttestationError, match="refused this host at the TLS handshake: its certificate is not "
                                               "from the tenant's CA|refused this host at the TLS handshake"):
        served.client(cert=other.client).nonce()
    # a server certificate of the right CA is no client certificate either
    with pytest.raises(AttestationError, match="refused this host at the TLS handshake"):
        served.client(cert=served.tenant.pki.server).nonce()


def test_a_revoked_host_is_refused_at_the_handshake_while_another_is_served(served):
    h1, h3 = served.client("h1"), None
    served.certs["h3"] = served.enrol("h3")
    h3 = served.client("h3")
    assert len(h3.nonce()) == 32
    h3.close()
    revocation = admin.revoke_host(served.tenant, "h3")               # the running broker picks it up
    assert revocation.serials
    with pytest.raises(AttestationError, match="refused this host at the TLS handshake: its certificate was "
                                               "revoked by the tenant"):
        served.client("h3").nonce()
    assert len(h1.nonce()) == 32
    h1.close()
    # enrolling h3 again gives it a new certificate (the revoked one stays revoked)
    served.certs["h3"] = served.enrol("h3")
    assert len(served.client("h3").nonce()) == 32


def test_an_unusable_crl_refuses_every_host_until_it_is_fixed(served):
    crl = served.tenant.pki.crl
    good = crl.read_bytes()
    try:
        crl.write_bytes(b"-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n")
        with pytest.raises(KeyServerError):
            served.client().nonce()
        assert any("REFUSING every host" in n for n in served.notes)
    finally:
        crl.write_bytes(good)
    assert len(served.client().nonce()) == 32


def test_nested_json_gets_400(served):
    status, answer = _probe().raw_request(served.port, served.ctx(), _probe().post("/v1/release", _probe().nested()))
    assert status == 400 and "nested too deeply" in answer["error"]


def test_an_oversized_body_gets_413_before_it_is_read(served):
    limit = served.server.limits.body
    with _probe().tls(served.port, served.ctx()) as s:
        s.sendall(f"POST /v1/nonce HTTP/1.1\r\nHost: b\r\nContent-Length: {limit + 1}\r\n\r\n".encode())
        sent = _closed_by_server(s, 1.0)                  # answered at once, no body sent
    assert sent.startswith(b"HTTP/1.1 413 "), sent[:80]
    chunked = (b"POST /v1/nonce HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"".join(b"1000\r\n" + b" " * 0x1000 + b"\r\n" for _ in range(limit // 0x1000 + 1)) + b"0\r\n\r\n")
    status, answer = _probe().raw_request(served.port, served.ctx(), chunked)
    assert status == 413 and "over" in answer["error"]


@pytest.mark.parametrize("request_bytes, status, says", [
    (b"GET /v1/nonce HTTP/1.1\r\nHost: b\r\n\r\n", 405, "POST only"),
    (b"POST /v1/keys HTTP/1.1\r\nHost: b\r\nContent-Length: 2\r\n\r\n{}", 404, "no such endpoint"),
    (b"POST /v1/release HTTP/1.1\r\nHost: b\r\nContent-Length: 2\r\n\r\n\xff\xfe", 400, "not JSON"),
    (b"POST /v1/release HTTP/1.1\r\nHost: b\r\nContent-Length: 3\r\n\r\n[1]", 400, "JSON object"),
    (b"POST /v1/release HTTP/1.1\r\nHost: b\r\nContent-Length: 2\r\n\r\n{}", 403, "malformed release request"),
    (b"\x00\x01 HELLO\r\n\r\n", 400, "malformed HTTP request"),
    (b"POST /v1/nonce HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 400, "malformed HTTP request"),    # no Host
    (b"POST /v1/nonce HTTP/1.1\r\nHost: b\r\nContent-Length: x\r\n\r\n{}", 400, "malformed HTTP request"),
    (b"POST /v1/nonce HTTP/1.1\r\nHost: b\r\nX: " + b"a" * (80 << 10) + b"\r\n\r\n", 431, "malformed HTTP request"),
], ids=["GET", "unknown-path", "not-json", "array", "empty-release", "garbage", "no-host", "bad-length",
        "huge-header"])
def test_every_malformed_request_gets_one_clear_4xx(served, request_bytes, status, says):
    got, answer = _probe().raw_request(served.port, served.ctx(), request_bytes)
    assert (got, says in answer.get("error", "")) == (status, True), answer


def test_the_host_checks_the_name_it_dialled(served, tmp_path):
    """The module's tenant names localhost and 127.0.0.1; a broker of it on 127.0.0.2 is refused by
    a host dialling 127.0.0.2. A tenant whose certificate names 127.0.0.2 is accepted there."""
    kmip = KmipClient(KmipEndpoint(1, served.tenant.pki))
    elsewhere = BrokerServer(Broker(served.tenant, kmip), served.tenant, host="127.0.0.2", limits=_limits()).start()
    try:
        with pytest.raises(KeyServerError, match="its certificate does not name 127.0.0.2"):
            BrokerClient(f"https://127.0.0.2:{elsewhere.port}", served.tenant.pki.ca,
                         cert=served.certs["h1"]).nonce()
    finally:
        elsewhere.stop()
    named = Served(tmp_path, host="127.0.0.2", server_names=("broker.test", "127.0.0.2"))
    try:
        assert named.tenant.pki.server_names() == ["broker.test", "127.0.0.2"]
        assert len(named.client().nonce()) == 32
        with pytest.raises(KeyServerError, match="does not name 127.0.0.1|not reachable"):
            named.client(dial="127.0.0.1").nonce()
    finally:
        named.server.stop()
