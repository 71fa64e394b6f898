"""The tenant's PKI and key server: real PyKMIP over mutual TLS 1.2 on 127.0.0.1 (no QEMU).

Keys belong to the client certificate's CN; a certificate of another CA, an expired one, a
server that is down or never answers: each is one clear ``KeyServerError``, within bounds.
"""

from __future__ import annotations

import datetime
import os
import json
import socket
import subprocess
import sys
import threading
import time

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from qemu_mktme.errors import KeyServerError, TenantError
from qemu_mktme.tenant import keyserver
from qemu_mktme.tenant.kmip import KmipClient, KmipEndpoint
from qemu_mktme.tenant.pki import create_pki, issue_client
from qemu_mktme.tenant.store import TenantDir

from helpers import patience
import contextlib


def test_pki_has_qemus_file_names_and_usable_certificates(tmp_path):
    pki = create_pki(tmp_path / "pki", client_cn="acme")
    names = sorted(p.name for p in pki.directory.iterdir())
    assert names == ["ca-cert.pem", "ca-key.pem", "client-cert.pem", "client-key.pem", "server-cert.pem",
                     "server-key.pem"]
    for key in ("ca-key.pem", "client-key.pem", "server-key.pem"):
        assert (pki.directory / key).stat().st_mode & 0o077 == 0
    ca = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    server = x509.load_pem_x509_certificate(pki.server[0].read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    eku = x509.load_pem_x509_certificate(pki.client[0].read_bytes()).extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku and pki.client_cn() == "acme"
    with pytest.raises(TenantError, match="already holds a PKI"):
        create_pki(tmp_path / "pki", client_cn="acme")
    # QEMU's own TLS credentials accept the directory (tls-creds-x509 loads and checks it)
    out = subprocess.run(["qemu-img", "info", "--object", f"tls-creds-x509,id=t0,dir={pki.directory},endpoint=server,"
                          "verify-peer=on", "--image-opts", "driver=null-co"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_keys_are_created_read_and_destroyed_as_the_tenant(mktme_keyserver):
    kmip = mktme_keyserver.kmip()
    uid = kmip.create_key("t-create")
    key = kmip.get_key(uid)
    assert len(key) == 32 and key != kmip.get_key(mktme_keyserver.tenant.key_uid("vm"))
    kmip.destroy_key(uid)
    with pytest.raises(KeyServerError, match="refused get key"):
        kmip.get_key(uid)


def test_another_cn_of_the_same_ca_gets_permission_denied(mktme_keyserver, tmp_path):
    uid = mktme_keyserver.tenant.key_uid("vm")
    other = issue_client(mktme_keyserver.tenant.pki, tmp_path / "mallory", "mallory")
    with pytest.raises(KeyServerError, match="PERMISSION_DENIED"):
        KmipClient(KmipEndpoint(mktme_keyserver.info.kmip_port, other)).get_key(uid)


def _copy_server_files(src, dst):
    for name in ("server-cert.pem", "server-key.pem"):
        (dst / name).write_bytes((src / name).read_bytes())


def test_wrong_ca_and_expired_certificates_are_refused(mktme_keyserver, tmp_path):
    uid = mktme_keyserver.tenant.key_uid("vm")
    stranger = create_pki(tmp_path / "stranger", client_cn="pytest")       # same CN, another CA
    _copy_server_files(mktme_keyserver.tenant.pki.directory, stranger.directory)
    (stranger.directory / "ca-cert.pem").write_bytes(mktme_keyserver.ca.read_bytes())  # trusts the server
    with pytest.raises(KeyServerError, match="TLS|refused|not reachable"):
        KmipClient(KmipEndpoint(mktme_keyserver.info.kmip_port, stranger), retries=0).get_key(uid)
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    expired = issue_client(mktme_keyserver.tenant.pki, tmp_path / "expired", "pytest", not_before=past,
                           validity=datetime.timedelta(days=1))
    _copy_server_files(mktme_keyserver.tenant.pki.directory, expired.directory)
    with pytest.raises(KeyServerError, match="TLS|refused|not reachable"):
        KmipClient(KmipEndpoint(mktme_keyserver.info.kmip_port, expired), retries=0).get_key(uid)


def test_a_server_that_is_down_fails_after_bounded_retries(mktme_keyserver):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                       # nothing listens here once closed
    client = KmipClient(KmipEndpoint(port, mktme_keyserver.tenant.pki), retries=2)
    t0 = time.monotonic()
    with pytest.raises(KeyServerError, match=r"not reachable \(get key 1, 3 attempts\)"):
        client.get_key("1")
    assert time.monotonic() - t0 < patience(10)


def test_a_server_that_never_answers_times_out(mktme_keyserver):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held = []
    stop = threading.Event()

    def accept():                                        # accepts, then says nothing
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(listener.accept()[0])
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        client = KmipClient(KmipEndpoint(listener.getsockname()[1], mktme_keyserver.tenant.pki), timeout=1, retries=0)
        with pytest.raises(KeyServerError, match="did not answer in time|not reachable"):
            client.get_key("1")
    finally:
        stop.set()
        thread.join()
        for s in held:
            s.close()
        listener.close()


def test_keyserver_status_stop_and_a_missing_tenant(tmp_path):
    tenant = TenantDir(tmp_path / "nobody")
    assert keyserver.status(tenant) is None
    with pytest.raises(TenantError, match="tenant init"):
        keyserver.start(tenant)
    assert keyserver.stop(tenant) is False


def test_users_see_no_pykmip_warnings(mktme_keyserver, tmp_path):
    """The command line's output carries no deprecation warnings from PyKMIP or its stack."""
    code = ("from qemu_mktme.cli import main; import sys; "
            f"sys.exit(main(['tenant', 'add-key', 'quiet-key', '--tenant-dir', {str(mktme_keyserver.tenant.path)!r}]))")
    out = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                         timeout=patience(60))
    assert out.returncode == 0, out.stderr
    assert "Warning" not in out.stderr and "warn" not in out.stderr.lower(), out.stderr
    assert "created in the key server" in out.stdout


@pytest.mark.parametrize("argv, message", [
    (["run", "--image", "x.qcow2"], "--image needs --tenant-server"),
    (["run", "--tenant-server", "https://127.0.0.1:1", "--key", "cpu:aes-xts-256"], "exclude each other"),
    (["run", "--tenant-server", "https://127.0.0.1:1", "--tenant-ca", "/nonexistent/ca.pem"], "does not exist"),
])
def test_run_tenant_options_that_cannot_work_are_usage_errors(argv, message, capsys):
    from qemu_mktme import cli
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_keyserver_and_tenant_commands(mktme_keyserver, capsys):
    from qemu_mktme import cli
    d = ["--tenant-dir", str(mktme_keyserver.tenant.path)]
    assert cli.main(["keyserver", "status", "--json", *d]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["url"] == mktme_keyserver.url and status["pid"] == mktme_keyserver.info.pid
    assert cli.main(["tenant", "show", *d]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["client_cn"] == "pytest" and "vm" in shown["keys"]
    assert set(shown["keys"]["vm"]) == {"uid", "kind"}                 # KMIP ids only, no material
    assert cli.main(["tenant", "add-key", "vm", *d]) == 1
    assert "has a key named 'vm' already" in capsys.readouterr().err
    assert cli.main(["tenant", "init", "again", *d]) == 1
    assert "already holds a PKI" in capsys.readouterr().err


def test_a_key_server_killed_with_9_leaves_nothing_after_the_next_stop(tmp_path):
    import signal as sig
    from qemu_mktme.tenant.keyserver import _leftovers, _recorded
    tenant = TenantDir(tmp_path / "t")
    tenant.init("k9")
    info = keyserver.start(tenant)
    os.kill(info.pid, sig.SIGKILL)
    deadline = time.monotonic() + patience(5)
    while keyserver.status(tenant) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert keyserver.status(tenant) is None
    assert keyserver.stop(tenant) is False                       # and it cleans up what the server left
    assert _recorded(tenant) is None and not _leftovers(tenant, info.pid)
