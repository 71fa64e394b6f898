"""libvirt runs the hosts, across namespaced machines (issue 24): a Linux guest started by
``virsh start`` on host A counts, moves to host B with ``virsh migrate --live --p2p --tls`` and
carries on; B's DRAM is ciphertext under the tenant's key with B's HPA as tweak (computed here
with ``cryptography``); A's KeyID and key are gone; a capture on the A-B link holds no guest
secret, the tenant links no key in the clear. Then what bad input gets."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleet_helpers import guards, wait_for
from helpers import patience
from qemu_mktme.virt.lab import guest_ram
from reference import xts_lines

pytestmark = pytest.mark.qemu
RESERVED = 0x10000000          # the Linux guest's memmap= region (images/recipes: mktme.reserved)


def _counts(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"^count (\d+)", text, re.M)]




def _tenant_key(lab, name: str = "vm") -> bytes:
    """The tenant's key as its KMIP server holds it (asked inside the tenant machine)."""
    script = ("from qemu_mktme.tenant import keyserver; from qemu_mktme.tenant.store import TenantDir; "
              f"t = TenantDir({str(lab.tenant.directory)!r}); print(keyserver.kmip_client(t).get_key(t.key_uid({name!r})).hex())")
    return bytes.fromhex(lab["tenant"].run([sys.executable, "-c", script]).stdout.strip().splitlines()[-1])




class Capture:
    """tcpdump on an interface of a machine, into a file. Its kernel buffer (-B, KiB) holds a whole
    migration stream, so a capture descheduled on a loaded machine drops nothing (a drop fails the
    test: a capture with holes proves nothing)."""

    def __init__(self, lab, host: str, peer: str, path: Path) -> None:
        self.path = path
        self.proc = lab[host].popen(["tcpdump", "-i", lab[host].links[peer], "-w", str(path), "-U", "-B", "262144",
                                     "-s", "0", "-n"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: path.exists() and path.stat().st_size > 0, 10, f"tcpdump on {host}-{peer}")

    def stop(self) -> bytes:
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=patience(10))
        text = err.decode(errors="replace")
        dropped = re.search(r"(\d+) packets dropped by kernel", text)
        assert dropped is not None and int(dropped[1]) == 0, text
        return self.path.read_bytes()


@pytest.fixture(scope="module")
def mktme_fleet_boot():
    from qemu_mktme import images
    return images.build("linux").boot(workload="counter", params={"period": "0.2"})


def test_machines_are_made_in_seconds(mktme_fleet):
    lab = mktme_fleet
    print(f"machines {lab.timings['machines']:.2f} s, tenant {lab.timings['tenant']:.2f} s, "
          f"all {lab.timings['total']:.2f} s")
    assert lab.timings["machines"] < patience(5)
    for h in ("tenant", "a", "b"):
        assert lab[h].run(["ip", "-o", "-4", "addr", "show", "lo"]).stdout.count(lab[h].address) == 1
    r = lab["a"].virsh("version", uri=lab["b"].uri)         # A reaches B's libvirtd over the a-b link
    assert r.returncode == 0 and "Running hypervisor: QEMU" in r.stdout, r.stderr
    assert lab["a"].run(["ip", "route", "get", lab["b"].address]).stdout.split()[2] != "127.0.0.1"


async def test_virsh_start_and_tls_migration_keep_the_guest_and_its_secrets(mktme_fleet, tmp_path):
    lab = mktme_fleet
    a, b = lab["a"], lab["b"]
    secret = f"migsecret={secrets.token_hex(12)}".encode()    # in guest RAM only (not in the domain's XML)
    lab.define("a", "vm1")
    try:
        # a plain virsh start is refused: its vCPUs would run before the KeyID is bound
        r = a.virsh("start", "vm1")
        assert r.returncode != 0 and "start it paused" in r.stderr, r.stderr
        assert lab.state("a", "vm1") == "shut off"
        assert lab.bindings("a")["keyids_in_use"] == []

        captures = {"tenant-a": Capture(lab, "tenant", "a", tmp_path / "ta.pcap"),
                    "tenant-b": Capture(lab, "tenant", "b", tmp_path / "tb.pcap")}
        t0 = time.monotonic()
        r = a.virsh("start", "--paused", "vm1")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: lab.state("a", "vm1") == "running", 30, "vm1 resumed by the host model on a")
        started = time.monotonic() - t0
        wait_for(lambda: len(_counts(lab.serial("a", "vm1"))) >= 3, 60, "vm1 counting on a")
        bound = lab.bindings("a")["domains"]["vm1"]
        assert bound["tagged"] and bound["keyid"] >= 1 and not bound["incoming"]
        q = lab.domains("a")["vm1"]
        assert q["state"] == "running" and q["keyid"] == bound["keyid"] and q["handle"] == bound["handle"]
        with open(guest_ram(bound["pid"], 512 << 20), "r+b") as ram:      # the CPU view: what the guest sees
            ram.seek(RESERVED)                                        # memmap= keeps Linux off it
            ram.write(secret)

        captures["a-b"] = Capture(lab, "a", "b", tmp_path / "ab.pcap")
        t1 = time.monotonic()
        r = a.virsh("migrate", "--live", "--p2p", "--tls", "vm1", b.uri, timeout=patience(120))
        migrated = time.monotonic() - t1
        assert r.returncode == 0, r.stderr
        print(f"start {started:.2f} s, migration {migrated:.2f} s")
        assert lab.state("b", "vm1") == "running" and lab.state("a", "vm1") == "shut off"
        last_a = _counts(lab.serial("a", "vm1"))[-1]
        on_b = wait_for(lambda: _counts(lab.serial("b", "vm1")), 30, "vm1 counting on b")
        assert last_a <= on_b[0] <= last_a + 5, (last_a, on_b[:3])        # the same shell, carrying on

        # A's KeyID and key are gone; B bound its own before the stream
        assert lab.bindings("a")["keyids_in_use"] == [] and lab.bindings("a")["keys"] == 0
        moved = lab.bindings("b")["domains"]["vm1"]
        assert moved["incoming"] and moved["tagged"]
        wait_for(lambda: not guards(), 10, "b's guard of the incoming vm1 ended once it resumed bound")

        # B's DRAM: the tenant's key, tweak = B's HPA
        dump = tmp_path / "dump-b"
        from qemu_mktme.files.dumpfile import Dump
        from qemu_mktme.virt.fleet import host_request
        host_request("dump", socket=lab.socket("b"), path=str(dump), vms=["vm1"])
        region = Dump(dump).region("vm1")
        ram = guest_ram(moved["pid"], 512 << 20).read_bytes()
        assert ram[RESERVED:RESERVED + len(secret)] == secret
        page = RESERVED
        hpa = region.gpa_to_hpa(page)
        key = _tenant_key(lab)
        dram = bytes(Dump(dump).dram(hpa, 4096))
        assert dram == xts_lines(key[:16], key[16:], hpa, ram[page:page + 4096])
        assert secret not in bytes(Dump(dump).region_data(region))

        seen = {name: c.stop() for name, c in captures.items()}
        assert len(seen["a-b"]) > 64 << 20 and secret not in seen["a-b"]   # guest RAM crossed, sealed
        for link in ("tenant-a", "tenant-b"):
            assert len(seen[link]) > 1000                      # the attestation crossed it
            assert key not in seen[link] and key.hex().encode() not in seen[link]

        # a migration without --tls is cancelled at its setup by B's host model: nothing crosses
        plain = Capture(lab, "a", "b", tmp_path / "plain.pcap")
        r = b.virsh("migrate", "--live", "--p2p", "vm1", a.uri, timeout=patience(120))
        assert r.returncode != 0, r.stdout     # virsh shows the source's cancel or the destination's end of stream
        assert "refused a migration without TLS" in lab.log("b").read_text()      # the reason, in the host's log
        assert secret not in plain.stop() and lab.state("b", "vm1") == "running"
        assert lab.bindings("a")["keyids_in_use"] == [] and lab.bindings("b")["domains"]["vm1"]["tagged"]

        # the same capture on a domain that does not opt in sees its RAM: the check can fail
        lab.define("a", "plain1", opt=False)
        assert a.virsh("start", "plain1").returncode == 0
        with open(guest_ram(lab.qemu_pid("a", "plain1"), 512 << 20), "r+b") as ram:
            ram.seek(RESERVED)
            ram.write(secret)
        plain = Capture(lab, "a", "b", tmp_path / "plain1.pcap")
        r = a.virsh("migrate", "--live", "--p2p", "plain1", b.uri, timeout=patience(120))
        assert r.returncode == 0, r.stderr
        assert secret in plain.stop()
    finally:
        for h in ("a", "b"):
            for name in ("vm1", "plain1"):
                lab[h].virsh("destroy", name)
                lab[h].virsh("undefine", name)
    assert lab.bindings("b")["keyids_in_use"] == [] and lab.bindings("b")["keys"] == 0


def test_a_testbed_leaves_nothing_behind_even_after_a_failure():
    import shutil
    if os.geteuid() != 0 or shutil.which("libvirtd") is None:
        pytest.skip("namespaced machines with their own libvirtd need root and libvirtd")
    from qemu_mktme.virt.testbed import Testbed
    seen = {}
    with pytest.raises(RuntimeError, match="the test failed"), Testbed(["x", "y"], links=[("x", "y")]) as bed:
        seen["top"] = bed.top
        seen["holders"] = [bed[n].pid for n in ("x", "y")]
        seen["daemons"] = [bed[n].libvirtd for n in ("x", "y")]
        seen["sleeper"] = bed["y"].popen(["sleep", "1000"]).pid
        r = bed["x"].virsh("version", uri=bed["y"].uri)
        assert r.returncode == 0, r.stderr
        raise RuntimeError("the test failed")
    assert not seen["top"].exists()
    for pid in [*seen["holders"], *seen["daemons"], seen["sleeper"]]:
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
