#!/usr/bin/env python3
"""Probe: hostile peers against the tenant's key server, the key broker (HTTPS, mutual TLS) and
PyKMIP (KMIP over mutual TLS), each while a well-behaved client asks for its answer.

Cases, on each port where they apply: an idle TCP connection; half a TLS ClientHello; a TLS
session that then says nothing (broker: with a host certificate); half-sent request headers; a
half-sent body; a flood of idle connections past the server's bound; no client certificate; a
certificate of another CA; a 100,000-level nested JSON body; an oversized body. What must hold:

- the well-behaved client (a host's nonce from the broker, the tenant's key from KMIP) gets its
  answer within ``--bound`` seconds while each attack holds its connections open;
- an attacker's silent connection is closed by the server within its deadline (plus a margin);
- each refused request gets one 4xx answer (or a refusal at the handshake), never a silent close.

    .venv/bin/python scripts/probe_keyserver.py            # prints a line per case; exit 1 on a violation

``tests/probe/test_keyserver_probe.py`` runs it in CI (the idle-after-TLS case with its full
30 s deadline only here).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # this checkout's package

from qemu_mktme.attest.client import BrokerClient  # noqa: E402
from qemu_mktme.errors import TenantError  # noqa: E402
from qemu_mktme.tenant import admin, broker, keyserver, pki  # noqa: E402
from qemu_mktme.tenant.store import TenantDir  # noqa: E402

HOST = "127.0.0.1"


# ---------------------------------------------------------------------------------- attackers


def client_context(ca: Path, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


def idle_tcp(port: int, n: int = 1, host: str = HOST) -> list[socket.socket]:
    """``n`` TCP connections that never send a byte."""
    return [socket.create_connection((host, port), timeout=5) for _ in range(n)]


def half_hello(port: int, host: str = HOST) -> socket.socket:
    """A TLS record header announcing a ClientHello of 512 bytes, and 16 of them."""
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(b"\x16\x03\x01\x02\x00" + b"\x01\x00\x01\xfc" + b"\x03\x03" + b"\0" * 10)
    return s


def tls(port: int, ctx: ssl.SSLContext, host: str = HOST) -> ssl.SSLSocket:
    """A TLS session (handshake done on the client's side)."""
    return ctx.wrap_socket(socket.create_connection((host, port), timeout=5), server_hostname=host)


def half_request(port: int, ctx: ssl.SSLContext, *, body: bool, host: str = HOST) -> ssl.SSLSocket:
    """Request headers cut in the middle, or complete headers and a tenth of the announced body."""
    s = tls(port, ctx, host)
    if body:
        s.sendall(b"POST /v1/nonce HTTP/1.1\r\nHost: b\r\nContent-Length: 100\r\n\r\n{\"keys\":")
    else:
        s.sendall(b"POST /v1/nonce HTTP/1.1\r\nHost: b\r\nContent-Le")
    return s


def closed_within(sock: socket.socket, seconds: float) -> tuple[float | None, bytes]:
    """Seconds until the server closed ``sock`` (None: still open after ``seconds``) and what it sent."""
    t0 = time.monotonic()
    got = b""
    sock.settimeout(0.2)
    while time.monotonic() - t0 < seconds:
        try:
            data = sock.recv(65536)
        except (TimeoutError, ssl.SSLWantReadError):
            continue
        except (OSError, ssl.SSLError):
            return time.monotonic() - t0, got
        if not data:
            return time.monotonic() - t0, got
        got += data
    return None, got


def raw_request(port: int, ctx: ssl.SSLContext, data: bytes, host: str = HOST,
                timeout: float = 10.0) -> tuple[int, dict[str, object]]:
    """Send ``data`` (a whole HTTP request, however malformed) and read one answer."""
    with tls(port, ctx, host) as s:
        s.settimeout(timeout)
        s.sendall(data)
        resp = http.client.HTTPResponse(s)      # type: ignore[arg-type]
        resp.begin()
        body = resp.read()
    try:
        return resp.status, json.loads(body)
    except ValueError:
        return resp.status, {"raw": body[:200].decode(errors="replace")}


def post(path: str, body: bytes, headers: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: broker\r\nContent-Type: application/json\r\n{headers}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def nested(levels: int = 100_000) -> bytes:
    return b"[" * levels + b"]" * levels


class Siege:
    """Attackers kept connected for as long as it runs: ``idle`` silent TCP connections to each of
    ``ports`` and as many half ClientHellos, each one opened again as soon as the server drops it
    (``reopened`` counts those). ``with Siege([broker, kmip]): ...``."""

    def __init__(self, ports: list[int], idle: int = 4, host: str = HOST) -> None:
        self.ports, self.idle, self.host = ports, idle, host
        self.reopened = 0
        self._socks: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="siege", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for i, sock in enumerate(self._socks):
                sock.setblocking(False)
                try:
                    dropped = sock.recv(1, socket.MSG_PEEK) == b""
                except BlockingIOError:
                    dropped = False
                except OSError:
                    dropped = True
                if dropped and not self._stop.is_set():
                    sock.close()
                    port = self._ports_of[i]
                    with contextlib.suppress(OSError):
                        self._socks[i] = idle_tcp(port, 1, self.host)[0] if i % 2 == 0 else half_hello(port, self.host)
                        self.reopened += 1

    def __enter__(self) -> Siege:
        self._socks = []
        self._ports_of: list[int] = []
        for port in self.ports:
            for _ in range(self.idle):
                self._socks += [idle_tcp(port, 1, self.host)[0], half_hello(port, self.host)]
                self._ports_of += [port, port]
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for sock in self._socks:
            sock.close()


# ---------------------------------------------------------------------------------- good clients


def timed(fn: Callable[[], object]) -> tuple[float, str]:
    t0 = time.monotonic()
    try:
        fn()
        outcome = "ok"
    except (TenantError, OSError) as err:
        outcome = f"failed: {err}"
    return time.monotonic() - t0, outcome


@contextlib.contextmanager
def holding(socks: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield socks
    finally:
        for s in socks:
            s.close()


def cases(broker_port: int, kmip_port: int, ca: Path, host_cert: tuple[Path, Path],
          stranger: tuple[Path, Path], flood: int) -> dict[str, Callable[[], list[socket.socket]]]:
    """Attacks that hold connections open, by name."""
    good_ctx = client_context(ca, host_cert)
    return {
        "broker: idle TCP": lambda: idle_tcp(broker_port),
        "broker: half ClientHello": lambda: [half_hello(broker_port)],
        "broker: idle after TLS": lambda: [tls(broker_port, good_ctx)],
        "broker: half-sent headers": lambda: [half_request(broker_port, good_ctx, body=False)],
        "broker: half-sent body": lambda: [half_request(broker_port, good_ctx, body=True)],
        f"broker: flood of {flood} idle connections": lambda: idle_tcp(broker_port, flood),
        "kmip: idle TCP": lambda: idle_tcp(kmip_port),
        "kmip: half ClientHello": lambda: [half_hello(kmip_port)],
        f"kmip: flood of {flood} idle connections": lambda: idle_tcp(kmip_port, flood),
    }


def refusals(broker_port: int, ca: Path, host_cert: tuple[Path, Path],
             stranger: tuple[Path, Path], max_body: int) -> dict[str, tuple[Callable[[], object], str]]:
    """Requests the broker must refuse, with what the refusal must say."""
    good = client_context(ca, host_cert)
    return {
        "no client certificate": (lambda: BrokerClient(f"https://{HOST}:{broker_port}", ca).nonce(),
                                  "refused this host at the TLS handshake: no client certificate"),
        "certificate of another CA": (
            lambda: BrokerClient(f"https://{HOST}:{broker_port}", ca, cert=stranger).nonce(),
            "refused this host at the TLS handshake"),
        "nested JSON (100,000 levels)": (lambda: raw_request(broker_port, good, post("/v1/nonce", nested())),
                                         "400 JSON nested too deeply"),
        "oversized body": (lambda: raw_request(broker_port, good, post("/v1/nonce", b" " * (max_body + 1))), "413"),
        "GET": (lambda: raw_request(broker_port, good, b"GET /v1/nonce HTTP/1.1\r\nHost: b\r\n\r\n"), "405"),
        "unknown endpoint": (lambda: raw_request(broker_port, good, post("/v1/keys", b"{}")), "404"),
        "not JSON": (lambda: raw_request(broker_port, good, post("/v1/release", b"\xff\xfe")), "400"),
        "a JSON array": (lambda: raw_request(broker_port, good, post("/v1/release", b"[1]")), "400"),
        "garbage request line": (lambda: raw_request(broker_port, good, b"\x00\x01 HELLO\r\n\r\n"), "400"),
    }


def burst(url: str, ca: Path, cert: tuple[Path, Path], n: int, keys: list[str] | None,
          timeout: float) -> tuple[int, float, list[str]]:
    """``n`` honest hosts at once, each a new connection asking for a nonce (the broker fetching
    ``keys`` from KMIP for each): how many were answered, in how many seconds, and the failures."""
    import concurrent.futures

    def ask(_: int) -> None:
        client = BrokerClient(url, ca, cert=cert, timeout=timeout)
        try:
            client.nonce(keys)
        finally:
            client.close()
    t0 = time.monotonic()
    failures: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        for f in [pool.submit(ask, i) for i in range(n)]:
            try:
                f.result()
            except (TenantError, OSError) as err:
                failures.append(f"{type(err).__name__}: {err}")
    return n - len(failures), time.monotonic() - t0, failures


def run(tenant: TenantDir, info: keyserver.KeyServerInfo, work: Path, *, bound: float = 5.0, flood: int = 100,
        close_margin: float = 3.0, idle_tls_wait: float = 0.0, wait_close: bool = True) -> dict[str, object]:
    """Every case against a running key server; the report lists each case and its problems.
    ``wait_close``: also wait for the server to drop each attacker at its deadline (5-15 s each)."""
    host_cert = tuple(admin.enrol_credentials(tenant, "probe-host", work / "probe-host") / n
                      for n in (pki.CLIENT_CERT, pki.CLIENT_KEY))
    other = pki.create_pki(work / "stranger", client_cn=tenant.pki.client_cn())
    stranger = other.client
    key_name = next(iter(tenant.keys()), None)
    kmip_client = keyserver.kmip_client(tenant, info, retries=0)
    client = BrokerClient(info.url, tenant.pki.ca, cert=host_cert)    # type: ignore[arg-type]

    def good() -> None:
        client.close()                                           # a new connection, a new handshake
        client.nonce([key_name] if key_name else None)           # the broker fetches the key from KMIP
        if key_name:
            kmip_client.get_key(tenant.key_uid(key_name))
    report: dict[str, object] = {"cases": []}
    lines: list[dict[str, object]] = report["cases"]  # type: ignore[assignment]
    deadlines = {"idle TCP": broker.Limits().handshake, "ClientHello": broker.Limits().handshake,
                 "half-sent": broker.Limits().request, "idle after TLS": broker.Limits().idle}
    for name, attack in cases(info.broker_port, info.kmip_port, tenant.pki.ca, host_cert, stranger,  # type: ignore[arg-type]
                              flood).items():
        with holding(attack()) as socks:
            time.sleep(0.2)
            seconds, outcome = timed(good)
            problems = [] if outcome == "ok" and seconds < bound else [f"good client: {outcome} in {seconds:.2f} s"]
            closed: float | None = None
            limit = next((v for k, v in deadlines.items() if k in name), None)
            if wait_close and limit is not None and (name != "broker: idle after TLS" or idle_tls_wait):
                wait = (idle_tls_wait if "after TLS" in name else limit) + close_margin
                closed, sent = closed_within(socks[0], wait)
                if closed is None:
                    problems.append(f"attacker still connected after {wait:g} s")
                if "half-sent" in name and b" 408 " not in sent.split(b"\r\n", 1)[0]:
                    problems.append(f"no 408 answer for a request cut short (got {sent[:60]!r})")
        lines.append({"case": name, "good_seconds": round(seconds, 3), "attacker_closed_after": closed,
                      "problems": problems})
    for name, (request, expect) in refusals(info.broker_port, tenant.pki.ca, host_cert, stranger,  # type: ignore[arg-type]
                                            broker.MAX_BODY).items():
        try:
            got = repr(request())
        except (TenantError, OSError, http.client.HTTPException) as err:
            got = f"{type(err).__name__}: {err}"
        status = expect.split()[0]
        ok = (status.isdigit() and got.startswith(f"({status},")) or (not status.isdigit() and expect in got)
        if ok and "nested" in expect:
            ok = "nested too deeply" in got
        lines.append({"case": name, "answer": got[:160], "problems": [] if ok else [f"expected {expect}"]})
    answered, seconds, failures = burst(info.url, tenant.pki.ca, host_cert, 100,  # type: ignore[arg-type]
                                        [key_name] if key_name else None, timeout=bound * 4)
    lines.append({"case": "100 honest hosts at once", "answered": answered, "seconds": round(seconds, 2),
                  "problems": failures[:3]})
    client.close()
    kmip_client.close()
    report["violations"] = sum(bool(c["problems"]) for c in lines)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bound", type=float, default=5.0, help="seconds the good client may take")
    parser.add_argument("--flood", type=int, default=200, help="idle connections in the flood cases")
    parser.add_argument("--quick", action="store_true", help="skip waiting out the broker's 30 s idle deadline")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="probe-keyserver-") as tmp:
        tenant = TenantDir(Path(tmp) / "tenant")
        tenant.init("probe")
        info = keyserver.start(tenant)
        try:
            admin.add_key(tenant, "vm")
            report = run(tenant, info, Path(tmp), bound=args.bound, flood=args.flood,
                         idle_tls_wait=0.0 if args.quick else broker.Limits().idle)
        finally:
            keyserver.stop(tenant)
    for c in report["cases"]:  # type: ignore[attr-defined]
        print(json.dumps(c))
    print(f"violations={report['violations']}")
    return 1 if report["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
