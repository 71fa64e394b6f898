"""Hostile peers against PyKMIP served by :func:`qemu_mktme.tenant.kmip.serve_bounded`, with
short deadlines, in a process of its own (PyKMIP forks a manager and installs signal handlers):
a silent peer is dropped at the handshake deadline, an authenticated session that goes quiet at
the idle deadline, one that announces a 4 GiB request at once, one that trickles a request at
the request deadline; a flood past the session bound is shut down, oldest handshake first, while
the tenant's kept-alive session and new clients are served."""

from __future__ import annotations

import os
import select
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time

import pytest

from helpers import patience

from qemu_mktme.tenant.kmip import KmipClient, KmipEndpoint
from qemu_mktme.tenant.store import TenantDir

SESSIONS = 4

SERVER = """
import sys, warnings
warnings.simplefilter("ignore")
from pathlib import Path
from qemu_mktme.tenant.kmip import SessionLimits, quiet, serve_bounded, server_config
from qemu_mktme.tenant.pki import Pki
with quiet():
    from kmip.services.server.server import KmipServer
state, pki, port, handshake, idle, request, sessions = sys.argv[1:8]
conf = server_config(Path(state), Pki(Path(pki)), int(port))
server = KmipServer(config_path=str(conf), log_path=str(Path(state) / "server.log"), live_policies=False)
server.start()
print("listening", flush=True)
serve_bounded(server, SessionLimits(handshake=float(handshake), idle=float(idle), request=float(request),
                                    sessions=int(sessions)))
"""


@pytest.fixture(scope="module")
def kmip(tmp_path_factory):
    base = tmp_path_factory.mktemp("kmip-hostile")
    tenant = TenantDir(base / "tenant")
    tenant.init("kh")
    state = base / "kmip"
    state.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    limits = (patience(0.5), patience(1.0), patience(0.5))
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(state), str(tenant.pki.directory), str(port),
                             *map(str, limits), str(SESSIONS)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True, cwd=base,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert proc.stdout.readline().strip() == b"listening"
        client = KmipClient(KmipEndpoint(port, tenant.pki), persistent=True, retries=0)
        deadline = time.monotonic() + patience(10)
        while True:
            try:
                uid = client.create_key("k")
                break
            except Exception:  # noqa: BLE001  the socket listens a moment after the line
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield tenant, port, uid, client, dict(zip(("handshake", "idle", "request"), limits))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)          # with PyKMIP's manager and policy monitor
        proc.wait()


def _tls(tenant: TenantDir, port: int) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(tenant.pki.ca))
    ctx.check_hostname = False
    ctx.load_cert_chain(*map(str, tenant.pki.client))
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5))


def _closed_after(sock: socket.socket, seconds: float) -> float | None:
    t0 = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - t0 < seconds:
        try:
            if not sock.recv(4096):
                return time.monotonic() - t0
        except (TimeoutError, ssl.SSLWantReadError):
            continue
        except OSError:
            return time.monotonic() - t0
    return None


def _fresh_get(tenant: TenantDir, port: int, uid: str) -> bytes:
    return KmipClient(KmipEndpoint(port, tenant.pki), retries=0).get_key(uid)


def test_a_silent_peer_is_dropped_at_the_handshake_deadline(kmip):
    tenant, port, uid, client, limits = kmip
    with socket.create_connection(("127.0.0.1", port)) as idle:
        assert len(_fresh_get(tenant, port, uid)) == 32
        assert _closed_after(idle, limits["handshake"] + patience(2)) is not None


def test_an_authenticated_session_gone_quiet_is_dropped_at_the_idle_deadline(kmip):
    tenant, port, uid, client, limits = kmip
    with _tls(tenant, port) as quiet:
        assert len(client.get_key(uid)) == 32
        closed = _closed_after(quiet, limits["idle"] + patience(2))
    assert closed is not None and closed >= limits["idle"] * 0.8


def test_a_kept_session_the_server_dropped_is_reopened_once(kmip):
    """The broker keeps one KMIP session; past the server's idle deadline the next call opens a
    new one instead of failing."""
    tenant, port, uid, client, limits = kmip
    assert len(client.get_key(uid)) == 32
    session = client._conn
    t0 = time.monotonic()                 # the server's close (close_notify or EOF) makes the socket readable
    closed, _, _ = select.select([session.proxy.socket], [], [], limits["idle"] + patience(2))
    assert closed and time.monotonic() - t0 >= limits["idle"] * 0.8
    assert len(client.get_key(uid)) == 32 and client._conn is not session


def test_a_huge_announced_request_and_a_trickled_one_end_their_sessions(kmip):
    tenant, port, uid, client, limits = kmip
    with _tls(tenant, port) as huge:
        huge.sendall(b"\x42\x00\x78\x01" + struct.pack("!I", 0xFFFFFFF0))      # 4 GiB announced
        assert _closed_after(huge, patience(2)) is not None                     # at once, nothing read
    with _tls(tenant, port) as slow:
        slow.sendall(b"\x42\x00\x78\x01" + struct.pack("!I", 64) + b"\x00" * 8)
        assert _closed_after(slow, limits["request"] + patience(2)) is not None
    assert len(_fresh_get(tenant, port, uid)) == 32


def test_a_flood_past_the_session_bound_spares_the_kept_alive_session(kmip):
    tenant, port, uid, client, limits = kmip
    assert len(client.get_key(uid)) == 32                  # the persistent session is established
    session = client._conn
    flood = [socket.create_connection(("127.0.0.1", port)) for _ in range(5 * SESSIONS)]
    try:
        time.sleep(0.5)
        assert sum(_closed_after(s, 0.05) is not None for s in flood) >= 3 * SESSIONS
        assert len(client.get_key(uid)) == 32 and client._conn is session     # not the one shut down
        assert len(_fresh_get(tenant, port, uid)) == 32
    finally:
        for s in flood:
            s.close()
