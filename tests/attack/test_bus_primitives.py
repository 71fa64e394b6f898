"""The attacker's bus primitives over the host model (no QEMU): checks that keep an attack on its
target, and what a replay does to a VM's RAM with and without integrity."""

from __future__ import annotations

import numpy as np
import pytest

from qemu_mktme.arch.guestmap import GuestRange
from qemu_mktme.attack.bus import AttackError, record_line, replay_line
from qemu_mktme.attack.cipherleak import decode
from qemu_mktme.errors import MachineCheck
from qemu_mktme.host.host import Host

MIB = 1 << 20


def vms(integrity=None, key="type=cpu", written=True):
    host = Host(keyid_bits=6, integrity=integrity)
    out = []
    for name in ("a", "b"):
        serial = host.keys.add(name, key, tenant=name)
        ram = np.zeros(2 * MIB, np.uint8)
        extents = None if written else (lambda offset, nbytes: [])
        out.append(host.add_guest(name, ram, [GuestRange(0, 2 * MIB, 0)], key_serial=serial, tenant=name,
                                  extents=extents))
    return host, out


def test_replay_rolls_back_only_the_target_line_of_the_target_vm() -> None:
    host, (a, b) = vms()
    a.ram[0x1000:0x1004] = 1
    b.ram[:] = 7
    b_dram = b.dram(0, 2 * MIB)
    record = record_line(a, 0x1002)
    assert (record.gpa, record.hpa) == (0x1000, a.hpa_of(0x1000))
    a.ram[0x1000:0x1004] = 2
    a.ram[0x1040] = 9                                            # the next line is not touched
    replay_line(a, record)
    assert list(a.ram[0x1000:0x1004]) == [1, 1, 1, 1] and a.ram[0x1040] == 9
    assert b.dram(0, 2 * MIB) == b_dram


def test_replay_with_integrity_poisons_and_never_reaches_the_ram() -> None:
    host, (a, b) = vms("mac")
    heard = []
    a.poison_hooks.append(lambda gpa, poison: heard.append((gpa, poison.cause)))
    a.ram[0x1000] = 1
    record = record_line(a, 0x1000)
    a.ram[0x1000] = 2
    replay_line(a, record)
    assert heard == [(0x1000, "dram-write")] and a.ram[0x1000] == 2
    assert a.dram(0x1000, 64) == record.ciphertext
    with pytest.raises(MachineCheck):
        a.read(0x1000, 1)


def test_bad_targets_are_refused_with_one_line() -> None:
    host, (a, b) = vms()
    with pytest.raises(AttackError, match="not RAM of VM a"):
        record_line(a, 4 * MIB)
    record = record_line(b, 0)
    with pytest.raises(AttackError, match="record is of VM b"):
        replay_line(a, record)
    _, (c, _) = vms(written=False)
    with pytest.raises(AttackError, match="never written"):
        record_line(c, 0x1000)
    _, (d, _) = vms(key="type=no-encrypt")
    with pytest.raises(AttackError, match="without MKTME encryption .* nothing to attack"):
        record_line(d, 0)


def test_decode_is_equality_with_the_known_zero() -> None:
    z, o = b"\x01" * 16, b"\x02" * 16
    assert decode(z, [z, o, o, z]) == "0110"


def test_attack_commands_refuse_bad_arguments_with_status_2() -> None:
    from helpers import qm

    for args, message in ((("replay", "--pin", "12a4"), "a PIN is 4 digits"),
                          (("cipherleak", "--secret", "0120"), "bits as 0 and 1")):
        out = qm("attack", *args)
        assert out.returncode == 2 and message in out.stderr, out.stderr


def test_the_dictionary_decodes_by_equality_and_refuses_a_dictionary_without_distinct_entries() -> None:
    from qemu_mktme.attack.wiretap import decode as decode_table

    t = [bytes([i]) * 16 for i in range(4)]
    assert decode_table([*t, t[2], t[0], t[3]], 2) == "100011"
    assert decode_table([*t, b"\x09" * 16], 2) == "??"                  # never seen: unknown, not guessed
    same = [b"\x00" * 16] * 6
    assert decode_table(same, 2) == "????"                                 # hidden reads: no dictionary


def test_a_host_mapping_reads_through_no_encrypt_and_through_the_ghost() -> None:
    from qemu_mktme.attack.bus import HostMapping, hidden

    host = Host(keyid_bits=6, dimm_alias=36)
    serial = host.keys.add("a", "type=cpu", tenant="a")
    ram = np.zeros(2 * MIB, np.uint8)
    a = host.add_guest("a", ram, [GuestRange(0, 2 * MIB, 0)], key_serial=serial, tenant="a")
    ram[0x1000:0x1040] = 7
    direct, ghost = HostMapping(host), HostMapping(host, alias_bit=36, name="ghost")
    assert direct.read(a, 0x1000) == ghost.read(a, 0x1000) == a.dram(0x1000, 64)
    assert ghost.address(a, 0x1010) == (0x1000, int(a.hpa_of(0x1000)) | 1 << 36)
    assert not hidden(direct.read(a, 0x1000)) and hidden(b"\xff" * 64) and hidden(bytes(16))
    with pytest.raises(AttackError, match="not RAM of VM a"):
        ghost.read(a, 4 * MIB)
    direct.close()
    ghost.close()
