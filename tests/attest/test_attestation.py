"""Attestation with real TPMs (swtpm through tpm2-pytss) against the real broker and KMIP server.

No QEMU: the hosts measure a hand-made event list; what is tested is the TPM evidence and the
broker's rules. Each refusal names its reason, and no key is released.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import patience

from qemu_mktme.errors import AttestationError, TenantError, TpmError
from qemu_mktme.attest import eventlog
from qemu_mktme.attest.eventlog import Event
from qemu_mktme.attest.hostid import AttestedHost
from qemu_mktme.tenant.store import Policy
from qemu_mktme.attest.tpm import PCRS

EVENTS = [Event(8, hashlib.sha256(b"qemu").digest(), "QEMU binary"),
          Event(9, hashlib.sha256(b"shim").digest(), "TCG plugin shim"),
          Event(10, hashlib.sha256(b"package").digest(), "qemu-mktme package"),
          Event(11, hashlib.sha256(b"platform").digest(), "platform: 6 KeyID bits"),
          Event(12, hashlib.sha256(b"kernel").digest(), "guest kernel")]


def _one_byte_changed(events, n):
    d = bytearray(events[n].digest)
    d[0] ^= 1
    return [*events[:n], Event(events[n].pcr, bytes(d), events[n].description), *events[n + 1:]]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Two hosts with their own TPMs, both booted with the good measured set."""
    base = tmp_path_factory.mktemp("hosts")
    a = AttestedHost("host-a", base / "a").boot(EVENTS)
    b = AttestedHost("host-b", base / "b").boot(EVENTS)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def tenant(mktme_keyserver, hosts):
    """The tenant's policy: the good events, host-a enrolled (host-b is not)."""
    a, _ = hosts
    mktme_keyserver.tenant.save_policy(Policy(PCRS, EVENTS, {a.ak_fingerprint(): "host-a"}))
    return mktme_keyserver


def test_a_good_host_gets_the_tenants_key_through_its_tpm(tenant, hosts):
    a, _ = hosts
    keys = a.fetch(tenant.client, ["vm"])
    assert keys["vm"] == tenant.kmip().get_key(tenant.tenant.key_uid("vm"))
    assert a.result["attested"] and a.result["keys"] == {"vm": "released to this host's TPM"}
    assert "released vm to host-a (certificate pytest)" in (tenant.tenant.path / "broker.log").read_text()


def _refused(tenant, request, match):
    with pytest.raises(AttestationError, match=match):
        tenant.client.release(request)
    log = (tenant.tenant.path / "broker.log").read_text().splitlines()
    assert "REFUSED" in log[-1]


def test_a_replayed_request_is_refused(tenant, hosts):
    a, _ = hosts
    client = tenant.client
    request = a.evidence(client.nonce(), ["vm"])
    client.release(request)
    _refused(tenant, request, "stale nonce: not issued by this broker, or already used")


def test_a_quote_for_another_nonce_is_refused(tenant, hosts):
    a, _ = hosts
    client = tenant.client
    old, fresh = client.nonce(), client.nonce()
    request = a.evidence(old, ["vm"]) | {"nonce": fresh.hex()}
    _refused(tenant, request, "stale nonce: the quote answers another challenge")


def test_a_tpm_the_tenant_never_enrolled_is_refused(tenant, hosts):
    _, b = hosts
    _refused(tenant, b.evidence(tenant.client.nonce(), ["vm"]), "never enrolled")


def test_a_quote_from_another_tpm_is_refused(tenant, hosts):
    a, b = hosts
    nonce = tenant.client.nonce()
    request = a.evidence(nonce, ["vm"])
    request["quote"] = b.evidence(nonce, ["vm"])["quote"]         # signed by host-b's AK
    _refused(tenant, request, "bad quote signature")


def test_a_binding_key_of_another_tpm_is_refused(tenant, hosts):
    a, b = hosts
    nonce = tenant.client.nonce()
    request = a.evidence(nonce, ["vm"])
    request["binding"] = b.evidence(nonce, ["vm"])["binding"]
    _refused(tenant, request, "bad binding-key certification signature")


def test_a_forged_event_log_is_refused(tenant, hosts):
    a, _ = hosts
    request = a.evidence(tenant.client.nonce(), ["vm"])
    request["eventlog"][0]["digest"] = hashlib.sha256(b"something else").hexdigest()
    _refused(tenant, request, "forged event log")


def test_a_tampered_host_is_refused_with_the_pcr_and_event(tenant, hosts):
    a, _ = hosts
    a.close()                                     # host-a reboots with a changed shim (same TPM)
    with AttestedHost("host-a", a.directory).boot(_one_byte_changed(EVENTS, 1)) as bad:
        with pytest.raises(AttestationError, match=r"PCR 9 differs at event 'TCG plugin shim': digest [0-9a-f]+\.\.\., "
                                                   r"reference [0-9a-f]+"):
            bad.fetch(tenant.client, ["vm"])
        assert bad.result["attested"] is False and bad.result["keys"] == {"vm": "refused"}
    a.boot(EVENTS)                                # and back to the good software


def test_a_policy_that_does_not_match_is_refused(tenant, hosts):
    a, _ = hosts
    fp = a.ak_fingerprint()
    tenant.tenant.save_policy(Policy(PCRS, _one_byte_changed(EVENTS, 3), {fp: "host-a"}))
    with pytest.raises(AttestationError, match="PCR 11 differs at event 'platform: 6 KeyID bits'"):
        a.fetch(tenant.client, ["vm"])


def test_a_key_the_tenant_does_not_have_is_refused(tenant, hosts):
    a, _ = hosts
    with pytest.raises(AttestationError, match="no key named 'nope'"):
        a.fetch(tenant.client, ["nope"])


def test_a_released_key_opens_only_in_its_tpm(tenant, hosts):
    a, b = hosts
    nonce = tenant.client.nonce()
    sealed, _ = tenant.client.release(a.evidence(nonce, ["vm"]))
    s = sealed["vm"]
    from qemu_mktme.attest.quote import open_sealed
    context = nonce + a.tpm.binding_name() + b"vm"
    assert len(open_sealed(s, a.tpm.ecdh(s.x, s.y), context)) == 32
    with pytest.raises(AttestationError, match="does not open with this host's TPM"):
        open_sealed(s, b.tpm.ecdh(s.x, s.y), context)


def test_the_broker_refuses_garbage(tenant):
    with pytest.raises(AttestationError, match="malformed release request"):
        tenant.client.release({"nonce": "zz"})


def test_an_unknown_broker_certificate_is_refused(tenant, tmp_path):
    from qemu_mktme.errors import KeyServerError
    from qemu_mktme.attest.client import BrokerClient
    from qemu_mktme.tenant.pki import create_pki
    other = create_pki(tmp_path / "other", client_cn="x")
    with pytest.raises(KeyServerError, match="not from the tenant's CA"):
        BrokerClient(tenant.url, other.ca).nonce()
    with pytest.raises(TenantError, match="https://"):
        BrokerClient("http://127.0.0.1:1", tenant.ca)


# ---------------------------------------------------------------------------------- node key


def test_the_node_key_unseals_only_after_the_same_measured_launch(tmp_path):
    with AttestedHost("node", tmp_path / "node").boot(EVENTS) as h:
        key = h.node_key()
        blob = h.wrap(b"cached tenant key blob", "cache:vm")
        assert (tmp_path / "node" / "node-key.sealed").stat().st_mode & 0o077 == 0
    with AttestedHost("node", tmp_path / "node").boot(EVENTS) as h:           # a reboot, same software
        assert h.node_key() == key
        assert h.unwrap(blob, "cache:vm") == b"cached tenant key blob"
        with pytest.raises(TenantError, match="does not open"):
            h.unwrap(blob, "cache:other")
    with AttestedHost("node", tmp_path / "node").boot(_one_byte_changed(EVENTS, 0)) as h:   # QEMU changed
        with pytest.raises(TpmError, match=r"node key does not unseal: this boot's PCRs .* differ"):
            h.node_key()
        with pytest.raises(TpmError, match="does not unseal"):
            h.unwrap(blob, "cache:vm")


def test_event_log_replay_matches_the_tpm(hosts):
    a, _ = hosts
    assert a.tpm.read() == eventlog.replay(EVENTS, PCRS)
    with pytest.raises(AttestationError, match="malformed event log entry"):
        eventlog.loads('[{"pcr": 8, "digest": "00", "description": "x"}]')


def test_no_key_bytes_in_any_file_written(tenant, hosts, tmp_path_factory):
    """Every file under the tenant directory (except the KMIP server's own database, which is
    where the tenant keeps its keys) and the hosts' directories: no key in raw or hex form."""
    a, _ = hosts
    key = tenant.kmip().get_key(tenant.tenant.key_uid("vm"))
    a.fetch(tenant.client, ["vm"])
    needles = [key, key[:16], key[16:], key.hex().encode(), key[:16].hex().encode(), key[16:].hex().encode()]
    roots = [tenant.tenant.path, a.directory.parent]
    scanned = 0
    for root in roots:
        for path in root.rglob("*"):
            if not path.is_file() or path.name == "pykmip.db":
                continue
            data = path.read_bytes()
            scanned += 1
            assert not any(n in data for n in needles), f"key material in {path}"
    assert scanned >= 8


def test_a_key_server_answering_for_the_wrong_key_is_refused(tenant, hosts):
    """The tenant's name for 'vm' points at another key in the KMIP server (a mix-up or an attack)."""
    a, _ = hosts
    t = tenant.tenant
    real = t.key_uid("vm")
    other = tenant.kmip().create_key("not-vm")
    t.record_key("vm", other, "memory")
    try:
        with pytest.raises(AttestationError, match=r"key server answered for key not-vm \(id \d+\) when asked for 'vm'"):
            a.fetch(tenant.client, ["vm"])
    finally:
        t.record_key("vm", real, "memory")


def test_a_broker_that_is_down_or_silent_is_a_clear_error(tenant):
    import socket
    from qemu_mktme.errors import KeyServerError
    from qemu_mktme.attest.client import BrokerClient
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(KeyServerError, match="is not reachable"):
        BrokerClient(f"https://127.0.0.1:{port}", tenant.ca).nonce()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        with pytest.raises(KeyServerError, match="did not answer within 0.5 s|not reachable"):
            BrokerClient(f"https://127.0.0.1:{listener.getsockname()[1]}", tenant.ca, timeout=0.5).nonce()
    finally:
        listener.close()


def test_one_running_tpm_per_host_directory(hosts):
    a, _ = hosts
    with pytest.raises(TpmError, match="in use by another running host"):
        AttestedHost("host-a", a.directory).boot(EVENTS)


def test_a_hosts_swtpm_dies_with_the_host_process_killed_with_9(tmp_path):
    """swtpm holds the host's TPM state lock: it must not outlive its host, even one killed with -9."""
    script = ("import sys, time\n"
              "from qemu_mktme.attest.hostid import AttestedHost\n"
              f"h = AttestedHost('h', {str(tmp_path / 'h')!r}).power_on()\n"
              "print(h.swtpm.proc.pid, flush=True)\n"
              "time.sleep(60)\n")
    host = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        swtpm = int(host.stdout.readline())
        assert os.path.exists(f"/proc/{swtpm}")
    finally:
        host.send_signal(signal.SIGKILL)
        host.wait()
    deadline = time.monotonic() + patience(10)
    while os.path.exists(f"/proc/{swtpm}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{swtpm}")


def test_a_host_asks_for_its_own_keys_only(tenant, hosts, tmp_path):
    """The connection's client certificate names the host the quoting AK was enrolled as: host-b's
    certificate with host-a's quote is refused; host-a's own certificate is served."""
    from qemu_mktme.attest.client import BrokerClient
    from qemu_mktme.tenant import admin
    a, _ = hosts
    certs = {h: admin.enrol_credentials(tenant.tenant, h, tmp_path / h) for h in ("host-a", "host-b")}

    def client(h):
        return BrokerClient(tenant.url, tenant.ca, cert=(certs[h] / "client-cert.pem", certs[h] / "client-key.pem"))
    b_client = client("host-b")
    with pytest.raises(AttestationError, match="the quote comes from host-a's TPM, the connection from host "
                                               "host-b's certificate"):
        b_client.release(a.evidence(b_client.nonce(), ["vm"]))
    assert a.fetch(client("host-a"), ["vm"])["vm"] == tenant.kmip().get_key(tenant.tenant.key_uid("vm"))
    assert "released vm to host-a (certificate host-a)" in (tenant.tenant.path / "broker.log").read_text()
