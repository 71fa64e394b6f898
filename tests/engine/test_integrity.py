"""Platform(integrity="mac"): replay and tampering through the DRAM view are caught at the next
CPU read; without it (MKTME as shipped) the replayed ciphertext decrypts to the old plaintext."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes

from qemu_mktme.arch import pconfig as pc
from qemu_mktme.engine.integrity import TAG_BITS, LineIntegrity
from qemu_mktme.engine.platform import Platform
from qemu_mktme.errors import MachineCheck

BASE = 0x100000


def platform(integrity: str | None):
    p = Platform(integrity=integrity)
    p.bios_activate(keyid_bits=6)
    for keyid in (1, 2):
        s = pc.KeyProgramStruct.for_algorithm(keyid, pc.Command.KEYID_SET_KEY_RANDOM, p.algorithms[0])
        p.memory.write(0x1000, s.pack())
        assert not p.pconfig(0, 0x1000).zf
    ram = np.zeros(1 << 20, np.uint8)
    p.memory.attach_cpu_view(BASE, ram, 1)
    heard = []
    if p.memory.integrity is not None:
        p.memory.integrity.hooks.append(heard.append)
    return p, ram, heard


def replay(p: Platform, ram: np.ndarray) -> bytes:
    """The guest stores 1, the bus records the line, the guest stores 2, the bus replays."""
    ram[0x40:0x48] = np.frombuffer((1).to_bytes(8, "little"), np.uint8)
    old = p.memory.read_dram(BASE + 0x40, 64)
    ram[0x40:0x48] = np.frombuffer((2).to_bytes(8, "little"), np.uint8)
    p.memory.write_dram(BASE + 0x40, old)
    return old


def test_without_integrity_a_replay_rolls_the_line_back() -> None:
    p, ram, _ = platform(None)
    replay(p, ram)
    assert int.from_bytes(ram[0x40:0x48].tobytes(), "little") == 1          # the guest sees 1 again
    assert p.memory.read(p.layout.compose(BASE + 0x40, 1), 8) == (1).to_bytes(8, "little")


def test_with_integrity_a_replay_poisons_the_line() -> None:
    p, ram, heard = platform("mac")
    old = replay(p, ram)
    assert [(h.hpa, h.keyid, h.cause) for h in heard] == [(BASE + 0x40, 1, "dram-write")]
    assert p.memory.read_dram(BASE + 0x40, 64) == old                        # DRAM holds the replay ...
    assert int.from_bytes(ram[0x40:0x48].tobytes(), "little") == 2          # ... the CPU never gets it
    with pytest.raises(MachineCheck) as err:
        p.memory.read(p.layout.compose(BASE + 0x40, 1), 8)
    assert err.value.hpa == BASE + 0x40 and err.value.keyid == 1 and str(err.value).startswith("#MC")
    assert p.memory.read(p.layout.compose(BASE, 1), 64) == bytes(64)        # the next line is fine
    with pytest.raises(MachineCheck):                                        # a partial store reads first
        p.memory.write(p.layout.compose(BASE + 0x44, 1), b"x")
    p.memory.write(p.layout.compose(BASE + 0x40, 1), b"y" * 64)             # a full-line write heals it
    assert p.memory.read(p.layout.compose(BASE + 0x40, 1), 64) == b"y" * 64


def test_with_integrity_writing_back_the_same_ciphertext_is_no_tampering() -> None:
    p, ram, heard = platform("mac")
    ram[:64] = 5
    p.memory.write_dram(BASE, p.memory.read_dram(BASE, 64))
    assert heard == [] and p.memory.read(p.layout.compose(BASE, 1), 64) == bytes([5]) * 64


def test_with_integrity_bit_flip_and_foreign_keyid_write_are_caught() -> None:
    p, ram, heard = platform("mac")
    line = bytearray(p.memory.read_dram(BASE + 0x80, 64))
    line[3] ^= 1
    p.memory.write_dram(BASE + 0x80, bytes(line))
    p.memory.write(p.layout.compose(BASE + 0xC0, 2), b"z" * 64)             # through KeyID 2
    assert [h.cause for h in heard] == ["dram-write", "foreign-write"]
    for off in (0x80, 0xC0):
        with pytest.raises(MachineCheck):
            p.memory.read(p.layout.compose(BASE + off, 1), 64)
    assert p.memory.read(p.layout.compose(BASE + 0xC0, 2), 64) == b"z" * 64  # the writer's KeyID passes
    with pytest.raises(MachineCheck):                                        # another KeyID over VM RAM
        p.memory.read(p.layout.compose(BASE + 0x1000, 2), 64)


def test_sparse_memory_tags_cpu_writes_and_reprogramming_invalidates_them() -> None:
    p, _, _ = platform("mac")
    pa = p.layout.compose(0x800000, 2)
    p.memory.write(pa, b"q" * 128)
    assert p.memory.read(pa, 128) == b"q" * 128
    p.memory.write_dram(0x800040, bytes(64))
    with pytest.raises(MachineCheck):
        p.memory.read(pa + 64, 8)
    assert p.memory.read(pa, 64) == b"q" * 64
    s = pc.KeyProgramStruct.for_algorithm(2, pc.Command.KEYID_SET_KEY_RANDOM, p.algorithms[0])
    p.memory.write(0x1000, s.pack())
    p.pconfig(0, 0x1000)                                                    # a new integrity key too
    with pytest.raises(MachineCheck):
        p.memory.read(pa, 64)


def test_tag_is_keyed_sha3_256_over_hpa_and_ciphertext_truncated() -> None:
    integ = LineIntegrity(rng=lambda n: b"K" * n)
    integ.rekey(3)
    ct = bytes(range(64))
    h = hashes.Hash(hashes.SHA3_256())
    h.update(b"K" * 32 + (0x12340).to_bytes(8, "little") + ct)
    expected = int.from_bytes(h.finalize()[:4], "little") & ((1 << TAG_BITS) - 1)
    assert integ.tag(3, 0x12340, ct) == expected
    assert integ.tag(3, 0x12380, ct) != expected                            # the HPA is covered


def test_platform_refuses_an_unknown_integrity_mode() -> None:
    with pytest.raises(ValueError, match="integrity"):
        Platform(integrity="tdx")


def test_a_snapshot_reload_under_integrity_goes_through_the_keyid_and_poisons_nothing() -> None:
    import os

    from qemu_mktme.arch.guestmap import GuestRange
    from qemu_mktme.engine.xts import XtsKey, encrypt_lines
    from qemu_mktme.host.host import Host

    key, tweak = os.urandom(16), os.urandom(16)
    host = Host(keyid_bits=6, integrity="mac")
    serial = host.keys.add("vm", f"type=user key={key.hex()} tweak={tweak.hex()}", tenant="t")
    ram = np.zeros(1 << 20, np.uint8)
    guest = host.add_guest("vm", ram, [GuestRange(0, 1 << 20, 0)], key_serial=serial, tenant="t")
    heard = []
    guest.poison_hooks.append(lambda gpa, poison: heard.append(gpa))
    plain = np.frombuffer(os.urandom(8192), np.uint8)
    image = encrypt_lines(XtsKey(key, tweak), plain, guest.hpa_base)
    guest.load_dram_image(0, image, guest.hpa_base, XtsKey(key, tweak))
    assert heard == [] and ram[:8192].tobytes() == plain.tobytes()
    assert guest.read(0, 8192) == plain.tobytes()
