"""What bad input gets when libvirt runs the hosts: one clear message where the user looks
(virsh's error, the host model's log), the guest never run or still running on its source, and no
KeyID or key left behind on either machine."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

from fleet_helpers import guards, wait_for
from helpers import patience
from qemu_mktme.virt.lab import guest_ram
from qemu_mktme.attest.hostid import host_credentials
from qemu_mktme.tenant import admin
from qemu_mktme.tenant.store import TenantDir

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def mktme_fleet_boot():
    from qemu_mktme import images
    return images.build("baremetal").boot(commands=["ticks 0 2000000"])




def _ticks(lab, host: str, name: str) -> int:
    return len(re.findall(r"tick ", lab.serial(host, name)))


def _clean(lab) -> None:
    for h in ("a", "b"):
        b = lab.bindings(h)
        assert b["keyids_in_use"] == [] and b["keys"] == 0 and b["domains"] == {}, (h, b)


def _define(lab, host: str, name: str, xml: str) -> None:
    path = lab.work / f"{name}.xml"
    path.write_text(xml)
    lab[host].virsh("define", str(path), check=True)


@pytest.fixture
def fleet(mktme_fleet):
    """The module's machines, with every domain a test made removed after it and nothing bound."""
    yield mktme_fleet
    for h in ("a", "b"):
        for name in mktme_fleet[h].virsh("list", "--all", "--name").stdout.split():
            mktme_fleet[h].virsh("destroy", name)
            mktme_fleet[h].virsh("undefine", name)
    wait_for(lambda: all(not mktme_fleet.bindings(h)["domains"] for h in ("a", "b")), 10, "bindings released")


def test_a_domain_without_shared_memfd_ram_never_starts(fleet):
    root = ET.fromstring(fleet.domain_xml("nomemfd", memory=64 << 20))
    root.remove(root.find("memoryBacking"))
    _define(fleet, "a", "nomemfd", ET.tostring(root, encoding="unicode"))
    r = fleet["a"].virsh("start", "--paused", "nomemfd")
    assert r.returncode != 0
    assert "guest RAM must be a shared memfd" in r.stderr and "<memoryBacking>" in r.stderr, r.stderr
    assert fleet.state("a", "nomemfd") == "shut off"
    _clean(fleet)
    r = fleet["a"].run(["virsh", "-c", fleet["a"].uri, "dumpxml", "nomemfd"])
    from qemu_mktme.virt import domain as dom
    assert any("shared memfd" in p for p in dom.problems(dom.parse(r.stdout)))


def test_no_reachable_broker_refuses_the_start(fleet):
    xml = fleet.domain_xml("nobroker", memory=64 << 20).replace(fleet.url, f"https://{fleet['tenant'].address}:1")
    _define(fleet, "a", "nobroker", xml)
    r = fleet["a"].virsh("start", "--paused", "nobroker")
    assert r.returncode != 0 and "key broker" in r.stderr and "not reachable" in r.stderr, r.stderr
    assert fleet.state("a", "nobroker") == "shut off"
    assert "nobroker: prepare: refused" in fleet.log("a").read_text()
    _clean(fleet)


def test_a_plain_start_is_refused_and_destroy_and_crash_release(fleet):
    fleet.define("a", "vm2", memory=64 << 20)
    r = fleet["a"].virsh("start", "vm2")
    assert r.returncode != 0 and "vCPUs ran before its KeyID was bound" in r.stderr, r.stderr
    assert fleet.state("a", "vm2") == "shut off"
    _clean(fleet)
    r = fleet["a"].run([sys.executable, "-m", "qemu_mktme.cli", "libvirt", "start", "vm2"], check=False)
    assert r.returncode == 0 and re.match(r"vm2: running on a with KeyID \d+ \(key handle 0x", r.stdout), r.stderr
    assert fleet.state("a", "vm2") == "running"
    r = fleet["a"].run([sys.executable, "-m", "qemu_mktme.cli", "query", "--libvirt", "qemu:///system"])
    shown = json.loads(r.stdout)["vm2"]
    assert shown["state"] == "running" and shown["tagged"] and shown["keyid"] == fleet.bindings("a")["keyids_in_use"][0]
    assert fleet["a"].virsh("destroy", "vm2").returncode == 0
    wait_for(lambda: fleet.bindings("a")["keyids_in_use"] == [], 10, "KeyID released at destroy")
    assert fleet["a"].virsh("start", "--paused", "vm2").returncode == 0
    wait_for(lambda: "vm2" in fleet.bindings("a")["domains"], 30, "vm2 bound again")
    os.kill(fleet.bindings("a")["domains"]["vm2"]["pid"], signal.SIGKILL)           # QEMU crashes
    wait_for(lambda: fleet.bindings("a")["keyids_in_use"] == [] and fleet.state("a", "vm2") == "shut off", 20,
          "KeyID released after QEMU crashed")
    _clean(fleet)


def test_a_revoked_destination_gets_no_ram_and_the_guest_runs_on(fleet, tmp_path):
    fleet.define("a", "vm3", memory=64 << 20)
    assert fleet["a"].virsh("start", "--paused", "vm3").returncode == 0
    wait_for(lambda: _ticks(fleet, "a", "vm3") > 2, 30, "vm3 ticking on a")
    source = fleet.bindings("a")["domains"]["vm3"]
    tenant = TenantDir(fleet.tenant.directory)
    policy = tenant.policy()
    revoked = admin.revoke_host(tenant, "b")           # tenant policy --revoke b: its certificate, its AK
    assert revoked.serials and revoked.unenrolled
    try:
        dump = fleet["a"].popen(["tcpdump", "-i", fleet["a"].links["b"], "-w", str(tmp_path / "ab.pcap"), "-U", "-n"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: (tmp_path / "ab.pcap").exists(), 10, "capture")
        r = fleet["a"].virsh("migrate", "--live", "--p2p", "--tls", "vm3", fleet["b"].uri)
        dump.send_signal(signal.SIGINT)
        dump.wait(patience(10))
    finally:
        tenant.save_policy(policy)                                        # b enrolled again, a new certificate
        admin.enrol_credentials(tenant, "b", host_credentials(fleet.host_dirs["b"]))
    assert r.returncode != 0 and "host b" in r.stderr and "revoked" in r.stderr, r.stderr
    assert (tmp_path / "ab.pcap").stat().st_size < 1 << 20          # libvirt's calls only: no guest RAM moved
    assert fleet.state("a", "vm3") == "running" and fleet.state("b", "vm3") != "running"
    before = _ticks(fleet, "a", "vm3")
    wait_for(lambda: _ticks(fleet, "a", "vm3") > before, 20, "vm3 ticking on a after the refusal")
    assert fleet.bindings("a")["domains"]["vm3"]["keyid"] == source["keyid"]
    b = fleet.bindings("b")
    assert b["keyids_in_use"] == [] and b["keys"] == 0


def _migrating(fleet, name: str, bandwidth: int = 4) -> subprocess.Popen:
    """``virsh migrate --tls`` from a to b, slowed to ``bandwidth`` MiB/s, running in the background
    once b's host model bound its QEMU (the stream is flowing)."""
    pid = fleet.bindings("a")["domains"][name]["pid"]
    with open(guest_ram(pid, 64 << 20), "r+b") as ram:          # 40 MiB the stream must carry (not zero pages)
        ram.seek(8 << 20)
        ram.write(os.urandom(40 << 20))
    proc = fleet["a"].popen(["virsh", "-c", fleet["a"].uri, "migrate", "--live", "--p2p", "--tls", "--bandwidth",
                             str(bandwidth), name, fleet["b"].uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for(lambda: name in fleet.bindings("b")["domains"] or proc.poll() is not None, 30, "b bound the incoming QEMU")
    wait_for(lambda: "migrat" in fleet["a"].virsh("domjobinfo", name).stdout.lower() or proc.poll() is not None, 30,
          "the stream started")
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.5)
    return proc



def _running_on_a(fleet, name: str) -> None:
    if fleet.state("a", name) == "paused":
        assert fleet["a"].virsh("resume", name).returncode == 0         # resumable
    wait_for(lambda: fleet.state("a", name) == "running", 30, f"{name} running on a")
    before = _ticks(fleet, "a", name)
    wait_for(lambda: _ticks(fleet, "a", name) > before, 20, f"{name} ticking on a")
    assert fleet.bindings("a")["domains"][name]["tagged"]


@pytest.mark.parametrize("what", ["destination libvirtd", "link", "source libvirtd"])
def test_an_interrupted_migration_leaves_the_guest_on_its_source(fleet, what):
    name = "vm" + what.split()[0][:4]
    fleet.define("a", name, memory=64 << 20)
    assert fleet["a"].virsh("start", "--paused", name).returncode == 0
    wait_for(lambda: _ticks(fleet, "a", name) > 2, 30, "ticking on a")
    proc = _migrating(fleet, name)
    if what == "destination libvirtd":
        os.kill(fleet["b"].libvirtd, signal.SIGKILL)
    elif what == "source libvirtd":
        os.kill(fleet["a"].libvirtd, signal.SIGKILL)
    else:
        fleet["a"].run(["ip", "link", "set", fleet["a"].links["b"], "down"])
    try:
        out, err = proc.communicate(timeout=patience(60))
        assert proc.returncode != 0, out
        assert err.strip(), "virsh said nothing"
    finally:
        if what == "link":
            fleet["a"].run(["ip", "link", "set", fleet["a"].links["b"], "up"])
            fleet["a"].run(["ip", "route", "replace", f"{fleet['b'].address}/32", "via",
                            _peer(fleet), "src", fleet["a"].address])
        else:
            fleet.bed.start_libvirtd("b" if what.startswith("destination") else "a")
    _running_on_a(fleet, name)
    wait_for(lambda: fleet.bindings("b")["keyids_in_use"] == [] and fleet.bindings("b")["keys"] == 0, 60,
          "nothing left on b")
    assert fleet.state("b", name) != "running"
    assert len(fleet.bindings("a")["keyids_in_use"]) == 1


def _peer(fleet) -> str:
    route = fleet["a"].run(["ip", "-o", "addr", "show", fleet["a"].links["b"]]).stdout
    mine = re.search(r"inet (\S+)/24", route)[1]
    return mine.rsplit(".", 1)[0] + (".2" if mine.endswith(".1") else ".1")


def test_the_destination_host_model_killed_mid_migration(fleet):
    """b's host model killed -9 while the stream flows (b's QEMU bound, no vCPU run there yet): its
    guard ends b's incoming QEMU, so the migration fails and the guest runs on a, bound; b has
    nothing, also after its host model restarts. Never a guest running on b unbound."""
    fleet.define("a", "vm9", memory=64 << 20)
    assert fleet["a"].virsh("start", "--paused", "vm9").returncode == 0
    wait_for(lambda: _ticks(fleet, "a", "vm9") > 2, 30, "ticking on a")
    keyid = fleet.bindings("a")["domains"]["vm9"]["keyid"]
    proc = _migrating(fleet, "vm9")
    fleet.daemons["b"].kill()                                    # -9: its bindings die with it
    fleet.daemons["b"].wait()
    out, err = proc.communicate(timeout=patience(120))
    assert proc.returncode != 0, fleet.log("b").read_text()[-3000:]
    assert err.strip(), "virsh said nothing"
    assert fleet.state("b", "vm9") != "running"
    assert "vm9: the host model is gone before the guest ran here" in fleet.log("b").read_text()
    fleet.start_daemon("b")                                      # adopts what runs there: nothing
    _running_on_a(fleet, "vm9")
    assert fleet.bindings("a")["domains"]["vm9"]["keyid"] == keyid and len(fleet.bindings("a")["keyids_in_use"]) == 1
    b = fleet.bindings("b")
    assert b["domains"] == {} and b["keyids_in_use"] == [] and b["keys"] == 0, b
    assert fleet.state("b", "vm9") != "running"
    assert not guards()


def test_no_destination_host_model_refuses_the_incoming_migration(fleet):
    """b's host model gone before the migration: b's first hook (migrate) refuses, nothing runs on b."""
    fleet.define("a", "vm10", memory=64 << 20)
    assert fleet["a"].virsh("start", "--paused", "vm10").returncode == 0
    wait_for(lambda: _ticks(fleet, "a", "vm10") > 2, 30, "ticking on a")
    fleet.daemons["b"].kill()
    fleet.daemons["b"].wait()
    try:
        r = fleet["a"].virsh("migrate", "--live", "--p2p", "--tls", "vm10", fleet["b"].uri)
    finally:
        fleet.start_daemon("b")
    assert r.returncode != 0 and "no host model runs on this machine" in r.stderr, r.stderr
    assert fleet.state("b", "vm10") != "running"
    _running_on_a(fleet, "vm10")
    b = fleet.bindings("b")
    assert b["domains"] == {} and b["keyids_in_use"] == [] and b["keys"] == 0, b


def test_silent_half_sent_and_flooding_peers_do_not_stall_the_hook(fleet):
    import socket
    import stat
    path = fleet.socket("a")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    peers = []
    for n in range(200):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(path))
        if n == 0:
            s.sendall(b'{"cmd": "hook", "domain": "vmx", "op": "prep')          # half a request, never ended
        peers.append(s)
    try:
        fleet.define("a", "vm5", memory=64 << 20)
        t0 = time.monotonic()
        assert fleet["a"].virsh("start", "--paused", "vm5").returncode == 0
        wait_for(lambda: fleet.state("a", "vm5") == "running", 30, "vm5 started beside 200 idle peers")
        assert time.monotonic() - t0 < patience(10)
    finally:
        for s in peers:
            s.close()


async def test_the_library_starts_migrates_and_stops_across_machines(fleet):
    from qemu_mktme.virt.fleet import FleetError
    fleet.define("a", "vm7", memory=64 << 20)
    started = await fleet.start("a", "vm7")
    assert started.domain == "vm7" and started.host == "a" and started.keyid >= 1 and started.handle.startswith("0x")
    moved = await fleet.migrate("vm7", "a", "b")
    assert moved.dest == fleet["b"].uri and fleet.state("b", "vm7") == "running"
    assert fleet.bindings("a")["keyids_in_use"] == [] and fleet.bindings("b")["domains"]["vm7"]["tagged"]
    with pytest.raises(FleetError, match="vm7"):
        await fleet.migrate("vm7", "a", "b")                 # not on a any more: libvirt's message
    await fleet.stop("b", "vm7")
    wait_for(lambda: fleet.bindings("b")["keyids_in_use"] == [], 10, "KeyID released after stop")
    with pytest.raises(FleetError, match="no domain"):
        await fleet.start("a", "nosuch")


def test_virsh_save_of_an_opted_in_domain_is_cancelled(fleet, tmp_path):
    """libvirt saves through QEMU's migration stream, to a file: its RAM would land on disk in the
    clear. (``virsh dump --memory-only`` is QEMU's dump-guest-memory: the host's software reading
    the guest, which MKTME does not prevent, as on hardware.)"""
    fleet.define("a", "vm8", memory=64 << 20)
    assert fleet["a"].virsh("start", "--paused", "vm8").returncode == 0
    wait_for(lambda: fleet.state("a", "vm8") == "running", 30, "vm8 running")
    r = fleet["a"].virsh("save", "vm8", str(tmp_path / "vm8.save"))
    assert r.returncode != 0, r.stdout
    assert not (tmp_path / "vm8.save").exists()
    assert fleet.state("a", "vm8") == "running" and fleet.bindings("a")["domains"]["vm8"]["tagged"]
    assert "refused a migration without TLS" in fleet.log("a").read_text()
