"""The KeyID-aliasing sanitizer, rule by rule: each rule fires on the buggy sequence and stays
silent on the correct one (host model over in-memory RAM, no QEMU)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from qemu_mktme.arch import pconfig as pc
from qemu_mktme.arch.guestmap import GuestRange
from qemu_mktme.host.dma import AssignedDevice
from qemu_mktme.host.host import Host
from qemu_mktme.host.sanitizer import RULES, Sanitizer

from reference import user_payload

MIB = 1 << 20


def make_host(nvms: int = 1):
    heard = []
    host = Host(keyid_bits=6, sanitizer=Sanitizer(heard.append))
    guests = []
    for i in range(nvms):
        serial = host.keys.add(f"vm{i}", user_payload(os.urandom(16), os.urandom(16)), tenant=f"t{i}")
        ram = np.zeros(4 * MIB, np.uint8)
        guests.append(host.add_guest(f"vm{i}", ram, [GuestRange(0, 4 * MIB, 0)], key_serial=serial, tenant=f"t{i}"))
    return host, guests, heard


def rules(host) -> list[str]:
    return [r.rule for r in host.sanitizer.reports]


def test_booting_and_normal_use_are_silent() -> None:
    host, (a, b), heard = make_host(2)
    a.write(0x1000, b"hello" * 100)
    assert a.read(0x1000, 500) == b"hello" * 100
    AssignedDevice(a).dma_write(0x2000, b"x" * 5000)
    assert AssignedDevice(a).dma_read(0x2000, 5000) == b"x" * 5000
    host.remove_guest("vm1")
    assert heard == [] and host.sanitizer.summary()[0] == "sanitizer summary: 0 reports"


def test_rule_a_read_through_other_keyid_than_last_writer() -> None:
    host, (a, b), heard = make_host(2)
    a.write(0x3000, b"S" * 64, keyid=b.keyid)              # a host bug: B's KeyID over A's page
    a.read(0x3000, 64)                                     # ... then A's KeyID reads it
    assert rules(host) == ["a"]
    r = heard[0]
    assert r.keyid == a.keyid and r.expected_keyid == b.keyid and r.vm == "vm0"
    assert "test_sanitizer.py" in r.site and "GPA 0x3000" in r.message
    assert str(r).startswith("sanitizer (a) " + RULES["a"])


def test_rule_a_silent_when_reading_through_the_writer_or_after_rewrite() -> None:
    host, (a, b), heard = make_host(2)
    a.write(0x3000, b"S" * 64, keyid=b.keyid)
    assert a.read(0x3000, 64, keyid=b.keyid) == b"S" * 64  # the writer's KeyID reads it back
    a.write(0x3000, b"T" * 64)                             # rewritten through A's own KeyID
    assert a.read(0x3000, 64) == b"T" * 64
    assert heard == []


def test_rule_b_retag_without_clearing() -> None:
    host, (a,), heard = make_host(1)
    a.write(0x5000, b"old tenant data".ljust(4096, b"."))
    a.ept.retag(0x5000, 7)                                 # page given to KeyID 7 ...
    a.read(0x5000, 64, keyid=7)                            # ... and used through it, uncleared
    assert rules(host) == ["b"]
    assert heard[0].keyid == 7 and heard[0].expected_keyid == a.keyid and "EPT" in heard[0].message


def test_rule_b_silent_when_cleared_through_the_new_keyid_first() -> None:
    host, (a,), heard = make_host(1)
    a.write(0x5000, b"old tenant data".ljust(4096, b"."))
    a.ept.retag(0x5000, 7)
    a.write(0x5000, bytes(4096), keyid=7)                  # the kernel clears through the new KeyID
    assert a.read(0x5000, 64, keyid=7) == bytes(64)
    assert heard == []


def test_rule_b_page_handed_to_another_vm() -> None:
    host, (a, b), heard = make_host(2)
    b.write(0x6000, b"B" * 4096)                            # B's data, B's KeyID
    hpa = b.hpa_of(0x6000)
    a.ept.map(0x7000_0000, hpa, 4096, a.keyid)              # VMM gives B's page to A
    a.platform.memory.read(a.layout.compose(hpa, a.keyid), 64)
    assert rules(host) == ["b"] and heard[0].expected_keyid == b.keyid


def test_rule_c_dma_through_a_foreign_keyid() -> None:
    host, (a,), heard = make_host(1)
    a.iommu.retag(0x8000, 9)                                # a mis-tagged IOMMU domain
    dev = AssignedDevice(a, name="nvme0")
    dev.dma_write(0x8000, b"D" * 64)
    dev.dma_read(0x8000, 64)
    assert rules(host) == ["c", "c"]                        # once per direction, not rule (a)
    r = heard[0]
    assert r.details == {"device": "nvme0", "iova": 0x8000, "direction": "write", "nbytes": 64}
    assert r.keyid == 9 and r.expected_keyid == a.keyid and r.hpa == a.hpa_of(0x8000)


def test_rule_c_silent_for_correctly_tagged_dma() -> None:
    host, (a,), heard = make_host(1)
    dev = AssignedDevice(a, name="nvme0")
    dev.dma_write(0x8000, os.urandom(3 * 4096))
    dev.dma_read(0x8000, 3 * 4096)
    assert heard == []


def _raw_pconfig(host: Host, keyid: int) -> None:
    s = pc.KeyProgramStruct.for_algorithm(keyid, pc.Command.KEYID_SET_KEY_RANDOM, host.platform.algorithms[0])
    struct_hpa = host.keys.struct_hpa
    host.platform.memory.write(struct_hpa, s.pack())
    assert not host.platform.pconfig(pc.PCONFIG_LEAF_MKTME_KEY_PROGRAM, struct_hpa).zf
    host.platform.memory.write(struct_hpa, bytes(pc.STRUCT_NBYTES))


def test_rule_d_pconfig_of_a_keyid_in_use() -> None:
    host, (a,), heard = make_host(1)
    _raw_pconfig(host, a.keyid)                             # a buggy kernel re-keys under the VM
    assert rules(host) == ["d"]
    assert heard[0].keyid == a.keyid and "EPT" in heard[0].message and "RAM of VM vm0" in heard[0].message


def test_rule_d_silent_when_the_keyid_is_released_first() -> None:
    host, (a, b), heard = make_host(2)
    keyid = b.keyid
    host.remove_guest("vm1")                                # tables freed, RAM detached, KEYID cleared
    _raw_pconfig(host, keyid)                               # now free to reprogram
    assert heard == []


def test_summary_counts_every_rule() -> None:
    host, (a, b), heard = make_host(2)
    a.write(0x3000, b"S" * 64, keyid=b.keyid)
    a.read(0x3000, 64)
    a.read(0x3000, 64)                                      # the same finding is reported once
    _raw_pconfig(host, a.keyid)
    lines = host.sanitizer.summary()
    assert lines[0] == "sanitizer summary: 2 reports"
    assert lines[1].endswith(": 1") and lines[4].endswith(": 1") and lines[2].endswith(": 0")


def test_install_refuses_a_second_observer() -> None:
    host, _, _ = make_host(1)
    with pytest.raises(ValueError, match="observer"):
        Sanitizer().install(host)


def test_pytest_plugin_assertion_names_each_report() -> None:
    from types import SimpleNamespace

    from qemu_mktme.pytest_plugin import assert_no_sanitizer_reports

    host, (a, b), _ = make_host(2)
    vm0, vm1 = SimpleNamespace(host=host, name="vm0"), SimpleNamespace(host=host, name="vm1")
    assert_no_sanitizer_reports(vm0)
    a.write(0x3000, b"S" * 64, keyid=b.keyid)
    a.read(0x3000, 64)
    with pytest.raises(AssertionError, match=r"1 sanitizer report for VM vm0:\n  sanitizer \(a\)"):
        assert_no_sanitizer_reports(vm0)
    assert_no_sanitizer_reports(vm1)                         # the finding is about vm0 only
    with pytest.raises(TypeError, match="no sanitizer"):
        assert_no_sanitizer_reports(SimpleNamespace(host=Host(keyid_bits=6), name="x"))
