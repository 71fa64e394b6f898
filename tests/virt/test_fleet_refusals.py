"""What bad input gets when libvirt runs the hosts: one clear message where the user looks
(virsh's error, the host model's log), the guest never run or still running on its source, and no
KeyID or key left behind on either machine."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import time
import xml.etree.ElementTree as ET

import pytest

from helpers import patience
from qemu_mktme.tenant.store import TenantDir

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def mktme_fleet_boot():
    from qemu_mktme import images
    return images.build("baremetal").boot(commands=["ticks 0 2000000"])


def _wait(condition, seconds: float, what: str):
    deadline = time.monotonic() + patience(seconds)
    while not (value := condition()):
        assert time.monotonic() < deadline, f"not true after {patience(seconds):g} s: {what}"
        time.sleep(0.1)
    return value


def _state(lab, host: str, name: str) -> str:
    return lab[host].virsh("domstate", name).stdout.strip()


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
    _wait(lambda: all(not mktme_fleet.bindings(h)["domains"] for h in ("a", "b")), 10, "bindings released")


def test_a_domain_without_shared_memfd_ram_never_starts(fleet):
    root = ET.fromstring(fleet.domain_xml("nomemfd", memory=64 << 20))
    root.remove(root.find("memoryBacking"))
    _define(fleet, "a", "nomemfd", ET.tostring(root, encoding="unicode"))
    r = fleet["a"].virsh("start", "--paused", "nomemfd")
    assert r.returncode != 0
    assert "guest RAM must be a shared memfd" in r.stderr and "<memoryBacking>" in r.stderr, r.stderr
    assert _state(fleet, "a", "nomemfd") == "shut off"
    _clean(fleet)
    r = fleet["a"].run(["virsh", "-c", fleet["a"].uri, "dumpxml", "nomemfd"])
    from qemu_mktme.virt import domain as dom
    assert any("shared memfd" in p for p in dom.problems(dom.parse(r.stdout)))


def test_no_reachable_broker_refuses_the_start(fleet):
    xml = fleet.domain_xml("nobroker", memory=64 << 20).replace(fleet.url, f"https://{fleet['tenant'].address}:1")
    _define(fleet, "a", "nobroker", xml)
    r = fleet["a"].virsh("start", "--paused", "nobroker")
    assert r.returncode != 0 and "key broker" in r.stderr and "not reachable" in r.stderr, r.stderr
    assert _state(fleet, "a", "nobroker") == "shut off"
    assert "nobroker: prepare: refused" in fleet.log("a").read_text()
    _clean(fleet)


def test_a_plain_start_is_refused_and_destroy_and_crash_release(fleet):
    fleet.define("a", "vm2", memory=64 << 20)
    r = fleet["a"].virsh("start", "vm2")
    assert r.returncode != 0 and "vCPUs ran before its KeyID was bound" in r.stderr, r.stderr
    assert _state(fleet, "a", "vm2") == "shut off"
    _clean(fleet)
    assert fleet["a"].virsh("start", "--paused", "vm2").returncode == 0
    _wait(lambda: _state(fleet, "a", "vm2") == "running", 30, "vm2 resumed")
    assert fleet.bindings("a")["keyids_in_use"] != []
    assert fleet["a"].virsh("destroy", "vm2").returncode == 0
    _wait(lambda: fleet.bindings("a")["keyids_in_use"] == [], 10, "KeyID released at destroy")
    assert fleet["a"].virsh("start", "--paused", "vm2").returncode == 0
    _wait(lambda: "vm2" in fleet.bindings("a")["domains"], 30, "vm2 bound again")
    os.kill(fleet.bindings("a")["domains"]["vm2"]["pid"], signal.SIGKILL)           # QEMU crashes
    _wait(lambda: fleet.bindings("a")["keyids_in_use"] == [] and _state(fleet, "a", "vm2") == "shut off", 20,
          "KeyID released after QEMU crashed")
    _clean(fleet)


def test_a_destination_failing_attestation_gets_no_ram_and_the_guest_runs_on(fleet, tmp_path):
    fleet.define("a", "vm3", memory=64 << 20)
    assert fleet["a"].virsh("start", "--paused", "vm3").returncode == 0
    _wait(lambda: _ticks(fleet, "a", "vm3") > 2, 30, "vm3 ticking on a")
    source = fleet.bindings("a")["domains"]["vm3"]
    tenant = TenantDir(fleet.tenant.directory)
    policy = tenant.policy()
    tenant.save_policy(dataclasses.replace(policy, hosts={k: v for k, v in policy.hosts.items() if v != "b"}))
    try:
        dump = fleet["a"].popen(["tcpdump", "-i", fleet["a"].links["b"], "-w", str(tmp_path / "ab.pcap"), "-U", "-n"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(lambda: (tmp_path / "ab.pcap").exists(), 10, "capture")
        r = fleet["a"].virsh("migrate", "--live", "--p2p", "--tls", "vm3", fleet["b"].uri)
        dump.send_signal(signal.SIGINT)
        dump.wait(patience(10))
    finally:
        tenant.save_policy(policy)                                        # b enrolled again
    assert r.returncode != 0 and "refused this host" in r.stderr and "never enrolled" in r.stderr, r.stderr
    assert (tmp_path / "ab.pcap").stat().st_size < 1 << 20          # libvirt's calls only: no guest RAM moved
    assert _state(fleet, "a", "vm3") == "running" and _state(fleet, "b", "vm3") != "running"
    before = _ticks(fleet, "a", "vm3")
    _wait(lambda: _ticks(fleet, "a", "vm3") > before, 20, "vm3 ticking on a after the refusal")
    assert fleet.bindings("a")["domains"]["vm3"]["keyid"] == source["keyid"]
    b = fleet.bindings("b")
    assert b["keyids_in_use"] == [] and b["keys"] == 0
