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
    assert names == ["ca-cert.pem", "ca-crl.pem", "ca-key.pem", "client-cert.pem", "client-key.pem", "server-cert.pem",
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


def test_the_key_servers_files_are_the_tenants_alone(mktme_keyserver):
    """PyKMIP's database holds the tenant's keys in the clear: it, the logs and the state file are
    0600 (the key server's process runs with umask 077), whatever the user's umask."""
    tenant = mktme_keyserver.tenant
    files = [tenant.kmip_dir / "pykmip.db", tenant.kmip_dir / "server.log", tenant.path / "broker.log"]
    for path in files:
        assert path.is_file(), path
        assert path.stat().st_mode & 0o077 == 0, f"{path} is {oct(path.stat().st_mode & 0o777)}"


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


def test_keyserver_listens_where_told_and_revokes_a_host_while_running(tmp_path, capsys):
    """``tenant init --server-name``, ``keyserver start --listen 127.0.0.2``: the broker and KMIP
    listen there, the certificate names it; ``tenant policy --revoke`` takes effect in the
    running broker at the next handshake, another host is served on."""
    from qemu_mktme import cli
    from qemu_mktme.attest.client import BrokerClient
    from qemu_mktme.errors import AttestationError
    from qemu_mktme.tenant import admin
    d = ["--tenant-dir", str(tmp_path / "t")]
    assert cli.main(["tenant", "init", "net", "--server-name", "127.0.0.2", "--server-name", "keys.example", *d]) == 0
    assert "certificate names keys.example, 127.0.0.2" in capsys.readouterr().out
    tenant = TenantDir(tmp_path / "t")
    assert cli.main(["keyserver", "start", "--listen", "127.0.0.2", *d]) == 0
    try:
        assert "note:" not in capsys.readouterr().out
        assert cli.main(["keyserver", "status", "--json", *d]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["address"] == "127.0.0.2" and status["url"] == f"https://127.0.0.2:{status['broker_port']}"
        assert cli.main(["keyserver", "start", *d]) == 0                  # the running one, wherever it is
        assert f"broker on 127.0.0.2:{status['broker_port']}" in capsys.readouterr().out
        assert cli.main(["keyserver", "start", "--listen", "127.0.0.3", *d]) == 1   # not "running" elsewhere
        assert "already runs" in capsys.readouterr().err
        uid = admin.add_key(tenant, "vm")                                  # KMIP on 127.0.0.2 too
        assert len(keyserver.kmip_client(tenant).get_key(uid)) == 32
        hosts = {h: admin.enrol_credentials(tenant, h, tmp_path / h) for h in ("ha", "hb")}

        def client(h):
            return BrokerClient(status["url"], tenant.pki.ca,
                                cert=(hosts[h] / "client-cert.pem", hosts[h] / "client-key.pem"))
        assert len(client("ha").nonce()) == 32 and len(client("hb").nonce()) == 32
        assert cli.main(["tenant", "policy", "--revoke", "nohost", *d]) == 1
        assert "never issued a certificate to host 'nohost'" in capsys.readouterr().err
        assert cli.main(["tenant", "policy", "--revoke", "hb", *d]) == 0
        assert "host hb: certificate(s)" in capsys.readouterr().out
        assert cli.main(["tenant", "show", *d]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["server_names"] == ["keys.example", "127.0.0.2"]
        assert [len(shown["host_certificates"][h]["revoked"]) for h in ("ha", "hb")] == [0, 1]
        with pytest.raises(AttestationError, match="revoked by the tenant"):
            client("hb").nonce()
        assert len(client("ha").nonce()) == 32
        assert "refused" not in (tenant.path / "broker.log").read_text()    # refused at the handshake, not later
    finally:
        assert cli.main(["keyserver", "stop", *d]) == 0


@pytest.mark.parametrize("listen, message", [
    ("nonsense", "with an IP address"), ("127.0.0.1:99999", "not in 0..65535"), ("[::1]:8443", "IPv4 only"),
    ("127.0.0.1:\uff11", "with an IP address"), ("127.0.0.1:+1", "with an IP address"),
])
def test_keyserver_listen_values_that_cannot_work(tmp_path, listen, message, capsys):
    from qemu_mktme import cli
    d = ["--tenant-dir", str(tmp_path / "t")]
    assert cli.main(["tenant", "init", "x", *d]) == 0
    assert cli.main(["keyserver", "start", "--listen", listen, *d]) == 1
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):                                   # a full-width 80
        cli.main(["keyserver", "start", "--kmip-port", "\uff18\uff10", *d])
    assert "KMIP port: not a whole number" in capsys.readouterr().err
    assert keyserver.status(TenantDir(tmp_path / "t")) is None


def test_tenant_server_names_at_init_and_later(tmp_path, capsys):
    from qemu_mktme import cli
    d = ["--tenant-dir", str(tmp_path / "t")]
    assert cli.main(["tenant", "init", "x", "--server-name", "bad..name", *d]) == 1
    assert "neither an IP address nor a DNS name" in capsys.readouterr().err
    assert not (tmp_path / "t" / "pki" / "ca-cert.pem").exists()
    assert cli.main(["tenant", "init", "x", *d]) == 0
    assert TenantDir(tmp_path / "t").pki.server_names() == ["localhost", "127.0.0.1"]
    assert cli.main(["tenant", "server-cert", "--server-name", "10.0.0.1", "--server-name", "kms.example", *d]) == 0
    assert "now names kms.example, 10.0.0.1" in capsys.readouterr().out


def test_a_hosts_credentials_are_its_own_and_serve_qemus_tls(tmp_path):
    """Enrolment writes host h1 a client certificate (CN h1) and, given its addresses, a server
    certificate naming them: a directory QEMU's tls-creds-x509 takes as either end. Enrolling
    again keeps them; revoking h1 puts both serials in the CRL."""
    from qemu_mktme.tenant import admin
    from qemu_mktme.tenant.pki import Pki, revoked
    tenant = TenantDir(tmp_path / "t")
    tenant.init("acme")
    d = admin.enrol_credentials(tenant, "h1", tmp_path / "h1", server_names=["10.0.0.1", "h1.example"])
    creds = Pki(d)
    assert sorted(p.name for p in d.iterdir()) == ["ca-cert.pem", "client-cert.pem", "client-key.pem",
                                                   "server-cert.pem", "server-key.pem"]
    assert creds.client_cn() == "h1" and creds.server_names() == ["h1.example", "10.0.0.1"]
    assert not (d / "ca-key.pem").exists()
    for end in ("server", "client"):
        out = subprocess.run(["qemu-img", "info", "--object", f"tls-creds-x509,id=t0,dir={d},endpoint={end},"
                              "verify-peer=on", "--image-opts", "driver=null-co"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    before = creds.client[0].read_bytes()
    admin.enrol_credentials(tenant, "h1", d, server_names=["10.0.0.1"])
    assert creds.client[0].read_bytes() == before                         # kept
    serials = {x509.load_pem_x509_certificate(p.read_bytes()).serial_number
               for p in (creds.client[0], creds.server[0])}
    assert set(admin.revoke_host(tenant, "h1").serials) == serials == revoked(tenant.pki)
    admin.enrol_credentials(tenant, "h1", d)                              # revoked: a new one
    assert x509.load_pem_x509_certificate(creds.client[0].read_bytes()).serial_number not in serials


def test_a_key_server_on_an_address_its_certificate_does_not_name(tmp_path, capsys):
    """Listening on 127.0.0.2 with a certificate for localhost and 127.0.0.1: ``keyserver start``
    says hosts will refuse it, and the tenant's own KMIP client does refuse it."""
    from qemu_mktme import cli
    from qemu_mktme.tenant import admin
    d = ["--tenant-dir", str(tmp_path / "t")]
    assert cli.main(["tenant", "init", "x", *d]) == 0
    assert cli.main(["keyserver", "start", "--listen", "127.0.0.2", *d]) == 0
    try:
        assert "its certificate names localhost, 127.0.0.1, not 127.0.0.2" in capsys.readouterr().out
        with pytest.raises(KeyServerError, match="its certificate does not name 127.0.0.2"):
            admin.add_key(TenantDir(tmp_path / "t"), "vm")
    finally:
        assert cli.main(["keyserver", "stop", *d]) == 0


@pytest.mark.qemu
def test_a_host_name_longer_than_a_certificate_cn_is_one_line_and_leaves_no_host_state(tmp_path, capsys, monkeypatch):
    """65 characters: cryptography's "Attribute's length must be >= 1 and <= 64" after the host's TPM
    state was made, before."""
    from qemu_mktme import cli
    from qemu_mktme.attest import hostid
    from qemu_mktme.tenant import pki
    monkeypatch.setenv(hostid.ENV_HOSTS, str(tmp_path / "hosts"))
    d = ["--tenant-dir", str(tmp_path / "t")]
    assert cli.main(["tenant", "init", "x", *d]) == 0
    assert cli.main(["tenant", "policy", "--host", "h" * 65, *d]) == 1
    assert "invalid host name" in capsys.readouterr().err
    assert not list((tmp_path / "hosts").glob("h*"))
    with pytest.raises(TenantError, match="up to 64"):
        pki.issue_host(TenantDir(tmp_path / "t").pki, tmp_path / "creds", "h" * 65)


@pytest.mark.qemu
def test_tenant_policy_keeps_host_state_under_the_tenant_dir(tmp_path, monkeypatch):
    """``tenant policy --host`` with ``--tenant-dir``: the host's TPM and certificate under that
    directory, nothing in the user's home; revoking the host keeps the keys' host lists (minus it)."""
    from helpers import qm
    from qemu_mktme.attest import hostid
    from qemu_mktme.files.cache import cache_root
    monkeypatch.delenv(hostid.ENV_HOSTS, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "QEMU_MKTME_CACHE": str(cache_root())}
    d = ["--tenant-dir", str(tmp_path / "t")]
    assert qm("tenant", "init", "x", *d, env=env).returncode == 0
    r = qm("tenant", "policy", "--host", "h1", "--host", "h2", "--key-hosts", "vm=h1", "--key-hosts", "db=h1,h2", *d,
           env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    hosts = tmp_path / "t" / "hosts"
    for h in ("h1", "h2"):
        assert (hosts / h / "tpm").is_dir() and (hosts / h / "tls" / "client-cert.pem").is_file()
    assert f"{hostid.ENV_HOSTS}={hosts}" in r.stdout
    assert [str(p.relative_to(home)) for p in home.rglob("*")] == []
    assert qm("tenant", "policy", "--revoke", "h1", *d, env=env).returncode == 0
    policy = TenantDir(tmp_path / "t").policy()
    assert policy.key_hosts == {"vm": [], "db": ["h2"]} and list(policy.hosts.values()) == ["h2"]
    assert not policy.allows("h2", "vm") and policy.allows("h2", "db") and policy.allows("h2", "other")
