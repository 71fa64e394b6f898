"""The memory controller's address decoding (a DIMM alias bit) and the platform's mitigation
modes, checked against an independent AES-XTS (``cryptography``): a write through one address
and a read through its alias meet in one DRAM cell, and each access's tweak is its own address."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qemu_mktme.arch import pconfig as pc
from qemu_mktme.engine.dimm import DimmAliasError, DimmMap, probe_aliases
from qemu_mktme.engine.platform import Platform
from qemu_mktme.errors import AddressError, MachineCheck

BIT = 36
GUEST = 0x1_0000_0000
KEY, TWEAK_KEY = bytes(range(16)), bytes(range(16, 32))


def xts(data: bytes, address: int, encrypt: bool = True, version: int = 0) -> bytes:
    """One 64-byte line, tweak = the 16-byte little-endian address (and version)."""
    c = Cipher(algorithms.AES(KEY + TWEAK_KEY), modes.XTS((address | version << 64).to_bytes(16, "little")))
    op = c.encryptor() if encrypt else c.decryptor()
    return op.update(data) + op.finalize()


def platform(mitigation: str = "none", alias: int | None = BIT, ram: bool = True):
    p = Platform(mitigation=mitigation, dimm_alias=alias)
    p.bios_activate(keyid_bits=6)
    direct = pc.KeyProgramStruct.for_algorithm(1, pc.Command.KEYID_SET_KEY_DIRECT, p.algorithms[0])
    direct = dataclasses.replace(direct, key_field_1=KEY + bytes(48), key_field_2=TWEAK_KEY + bytes(48))
    for s in (direct, pc.KeyProgramStruct.for_algorithm(2, pc.Command.KEYID_NO_ENCRYPT, p.algorithms[0]),
              pc.KeyProgramStruct.for_algorithm(3, pc.Command.KEYID_SET_KEY_RANDOM, p.algorithms[0])):
        p.memory.write(0x1000, s.pack())
        assert not p.pconfig(0, 0x1000).zf
    buf = np.zeros(1 << 20, np.uint8)
    if ram:
        p.memory.attach_cpu_view(GUEST, buf, 1)
    heard: list = []
    if p.memory.integrity is not None:
        p.memory.integrity.hooks.append(heard.append)
    return p, buf, heard


def pa(p: Platform, hpa: int, keyid: int) -> int:
    return p.layout.compose(hpa, keyid)


def test_a_write_and_a_read_through_the_alias_meet_in_one_cell_each_with_its_own_tweak() -> None:
    p, _, _ = platform(ram=False)
    a, ghost = 0x2000_0000, 0x2000_0000 | 1 << BIT
    plain = bytes(range(64))
    p.memory.write(pa(p, a, 1), plain)
    assert p.memory.read_dram(a, 64) == p.memory.read_dram(ghost, 64) == xts(plain, a)
    assert p.memory.read(pa(p, ghost, 2), 64) == xts(plain, a)              # no-encrypt: the cell's ciphertext
    assert p.memory.read(pa(p, ghost, 1), 64) == xts(xts(plain, a), ghost, False)  # its own tweak: garbage
    other = b"Q" * 64
    p.memory.write(pa(p, ghost, 1), other)
    assert p.memory.read_dram(a, 64) == xts(other, ghost)                   # the ghost's tweak, the same cell
    assert p.memory.read(pa(p, a, 1), 64) == xts(xts(other, ghost), a, False)
    assert p.memory.read(pa(p, ghost, 1), 64) == other


def test_guest_ram_through_the_alias_replays_under_mktme() -> None:
    p, ram, _ = platform()
    ghost = GUEST | 1 << BIT
    ram[:8] = 1
    captured = p.memory.read(pa(p, ghost, 2), 64)                        # host software, alias, no-encrypt
    assert captured == xts(ram[:64].tobytes(), GUEST)
    ram[:8] = 2
    p.memory.write(pa(p, ghost, 2), captured)                            # written back through it
    assert list(ram[:8]) == [1] * 8


def test_the_alias_switched_on_at_run_time_and_off_again() -> None:
    p, _, _ = platform(alias=None, ram=False)
    a, ghost = 0x3000_0000, 0x3000_0000 | 1 << BIT
    p.memory.write(pa(p, a, 2), b"A" * 64)
    p.memory.write(pa(p, ghost, 2), b"G" * 64)
    assert p.memory.read(pa(p, ghost, 2), 64) == b"G" * 64               # two cells
    p.set_dimm_alias(BIT)
    assert p.dimm == DimmMap(BIT)
    assert p.memory.read(pa(p, ghost, 2), 64) == b"A" * 64               # now one cell
    p.set_dimm_alias(None)
    assert p.memory.read(pa(p, ghost, 2), 64) == b"G" * 64


def test_the_bios_alias_check_refuses_an_aliased_dimm_at_boot_not_later() -> None:
    with pytest.raises(DimmAliasError, match="bit 36 aliases"):
        platform("alias-check")
    p, ram, _ = platform("alias-check", alias=None)
    p.set_dimm_alias(BIT)                                                # Battering RAM: after the check
    ram[:8] = 7
    assert p.memory.read(pa(p, GUEST | 1 << BIT, 2), 8) == xts(ram[:64].tobytes(), GUEST)[:8]
    cells = {}
    assert probe_aliases(lambda h, n: cells.get(h & ~(1 << 20), bytes(n)),
                         lambda h, d: cells.__setitem__(h & ~(1 << 20), d), 40) == [20]


def test_attached_views_stay_below_the_alias_bit() -> None:
    p, _, _ = platform(alias=32, ram=False)
    with pytest.raises(AddressError, match="ghost half"):
        p.memory.attach_cpu_view(GUEST, np.zeros(4096, np.uint8), 1)
    q, _, _ = platform(alias=None)
    with pytest.raises(DimmAliasError, match="ghost half"):
        q.set_dimm_alias(32)


@pytest.mark.parametrize("mode, fill", [("mac+owner", 0x00), ("ciphertext-hiding", 0xFF)])
def test_hiding_modes_return_no_ciphertext_to_shared_keyids(mode: str, fill: int) -> None:
    p, ram, _ = platform(mode)
    ram[:64] = 9
    for address in (GUEST, GUEST | 1 << BIT):
        assert p.memory.read(pa(p, address, 2), 64) == bytes([fill]) * 64
    assert p.memory.read(pa(p, GUEST, 1), 64) == bytes([9]) * 64
    p.memory.write(pa(p, 0x5000_0000, 1), b"x" * 64)                    # a private line of unattached DRAM
    assert p.memory.read(pa(p, 0x5000_0000, 0), 64) == bytes([fill]) * 64


def test_mac_lets_shared_keyids_read_ciphertext_and_poisons_their_writes() -> None:
    p, ram, heard = platform("mac")
    ram[:64] = 3
    ghost = GUEST | 1 << BIT
    captured = p.memory.read(pa(p, ghost, 2), 64)
    assert captured == xts(ram[:64].tobytes(), GUEST)
    ram[:64] = 4
    p.memory.write(pa(p, ghost, 2), captured)
    assert [(h.hpa, h.cause) for h in heard] == [(GUEST, "alias-write")] and ram[0] == 4
    with pytest.raises(MachineCheck):
        p.memory.read(pa(p, GUEST, 1), 8)


@pytest.mark.parametrize("mode, rolled_back", [("mac", True), ("mac+owner", True), ("freshness", False)])
def test_a_bus_replay_of_data_and_metadata(mode: str, rolled_back: bool) -> None:
    p, ram, heard = platform(mode)
    ram[:8] = 1
    old = p.memory.read_dram_line(GUEST)
    ram[:8] = 2
    p.memory.read_dram(GUEST, 64)                                        # the bus sees the new value
    p.memory.write_dram(GUEST, old[0], meta=old[1])
    if rolled_back:
        assert heard == [] and list(ram[:8]) == [1] * 8
        assert p.memory.read(pa(p, GUEST, 1), 8) == bytes([1]) * 8
    else:
        assert [h.cause for h in heard] == ["dram-write"] and list(ram[:8]) == [2] * 8
        with pytest.raises(MachineCheck):
            p.memory.read(pa(p, GUEST, 1), 8)


def test_a_bus_replay_of_data_bits_alone_is_poison_under_every_mac_mode() -> None:
    for mode in ("mac", "mac+owner", "freshness"):
        p, ram, heard = platform(mode)
        ram[:8] = 1
        old = p.memory.read_dram(GUEST, 64)
        ram[:8] = 2
        p.memory.write_dram(GUEST, old)
        assert [h.cause for h in heard] == ["dram-write"], mode


def test_freshness_puts_a_version_in_the_tweak_and_counts_its_cost() -> None:
    p, ram, _ = platform("freshness")
    ram[:64] = 5
    first, second = p.memory.read_dram(GUEST, 64), p.memory.read_dram(GUEST, 64)
    assert first != second                                               # same plaintext, same address
    epoch = p.memory.integrity.epoch
    assert second == xts(bytes([5]) * 64, GUEST, version=epoch)
    p.memory.write(pa(p, 0x6000_0000, 1), b"v" * 64)
    p.memory.write(pa(p, 0x6000_0000, 1), b"v" * 64)
    assert p.memory.read_dram(0x6000_0000, 64) == xts(b"v" * 64, 0x6000_0000, version=2)
    assert p.memory.read(pa(p, 0x6000_0000, 1), 64) == b"v" * 64
    tree = p.memory.integrity.freshness
    assert tree.accesses >= 5 and tree.extra >= 2 * tree.accesses


def test_none_mode_is_deterministic_and_unchanged() -> None:
    p, ram, _ = platform("none")
    ram[:64] = 5
    assert p.memory.read_dram(GUEST, 64) == p.memory.read_dram(GUEST, 64) == xts(bytes([5]) * 64, GUEST)
    with pytest.raises(ValueError, match="mitigation"):
        Platform(mitigation="tdx")


def test_the_host_reports_its_mode_and_dimm_map() -> None:
    from qemu_mktme.host.host import Host

    host = Host(mitigation="ciphertext-hiding", dimm_alias=BIT)
    assert host.query()["platform"]["mitigation"] == "ciphertext-hiding"
    assert host.query()["platform"]["dimm-alias-bit"] == BIT
    host.platform.set_dimm_alias(None)
    assert host.query()["platform"]["dimm-alias-bit"] is None
