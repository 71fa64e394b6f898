"""Dumps built in-process: the host model over numpy RAM, written by ``write_dump``, so each test
knows every plaintext byte. Session-scoped: the dumps are read-only for the tests."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pytest

from qemu_mktme.arch.guestmap import GuestRange
from qemu_mktme.host.guest import EncryptedGuest
from qemu_mktme.host.host import Host
from qemu_mktme.files.dumpfile import Dump, write_dump

from reference import user_payload

MIB = 1 << 20
GIB = 1 << 30
SECRET = b"TOP-SECRET-launch-codes-0451"
BOUNDARY_SECRET = b"ACROSS-THE-4MiB-CHUNK-BOUNDARY"
TEXT = (b"It was a bright cold day in April, and the clocks were striking thirteen. " * 60)[:4096]

# vm1 (aes-xts-128): 12 MiB backend; GPA [0, 640K) at 0, [1M, 10M) at 1M, [4G, 4G+2M) at 10M.
# The backend hole [640K, 1M) is in no GPA range: the EPT does not map it (untagged pages).
VM1_RANGES = [GuestRange(0, 0xA0000, 0), GuestRange(MIB, 9 * MIB, MIB), GuestRange(4 * GIB, 2 * MIB, 10 * MIB)]


@dataclass
class Scene:
    """One host, its guests and their RAM (the plaintext), and the keys of the user-key VMs."""

    host: Host
    guests: dict[str, EncryptedGuest]
    rams: dict[str, np.ndarray]
    keys: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)

    def dump(self, path, names=None) -> Dump:
        return write_dump([self.guests[n] for n in (names or self.guests)], path)


def make_scene() -> Scene:
    host = Host(keyid_bits=6)
    rng = np.random.default_rng(6)
    k1 = (bytes(rng.integers(0, 256, 16, np.uint8)), bytes(rng.integers(0, 256, 16, np.uint8)))
    k3 = (bytes(rng.integers(0, 256, 32, np.uint8)), bytes(rng.integers(0, 256, 32, np.uint8)))
    s1 = host.keys.add("vm1", user_payload(*k1), tenant="acme")
    s2 = host.keys.add("vm2", "type=no-encrypt", tenant="acme")
    s3 = host.keys.add("vm3", user_payload(*k3, algorithm="aes-xts-256"), tenant="globex")
    ram1, ram2, ram3 = np.zeros(12 * MIB, np.uint8), np.zeros(4 * MIB, np.uint8), np.zeros(4 * MIB, np.uint8)
    ram1[0x200000:0x200000 + len(SECRET)] = np.frombuffer(SECRET, np.uint8)
    ram1[0x300000:0x301000] = np.frombuffer(TEXT, np.uint8)
    ram1[0x310000:0x312000] = rng.integers(0, 256, 0x2000, np.uint8)       # random data: high entropy
    ram1[0x302800:0x303800] = np.frombuffer(TEXT, np.uint8)                 # text across a page boundary
    at = 4 * MIB - 7                                                         # straddles the search chunks
    ram1[at:at + len(BOUNDARY_SECRET)] = np.frombuffer(BOUNDARY_SECRET, np.uint8)
    ram2[0x100000:0x101000] = np.frombuffer(TEXT, np.uint8)
    ram2[0x200000:0x200000 + len(SECRET)] = np.frombuffer(SECRET, np.uint8)
    ram3[0x10000:0x10000 + len(SECRET)] = np.frombuffer(SECRET, np.uint8)
    guests = {
        "vm1": host.add_guest("vm1", ram1, VM1_RANGES, key_serial=s1, tenant="acme"),
        "vm2": host.add_guest("vm2", ram2, [GuestRange(0, 4 * MIB, 0)], key_serial=s2, tenant="acme"),
        "vm3": host.add_guest("vm3", ram3, [GuestRange(0, 4 * MIB, 0)], key_serial=s3, tenant="globex"),
    }
    return Scene(host, guests, {"vm1": ram1, "vm2": ram2, "vm3": ram3}, {"vm1": k1, "vm3": k3})


@pytest.fixture(scope="session")
def scene_dumps(tmp_path_factory):
    """(scene, dump before, dump after, plaintext before, plaintext after) with known changes."""
    scene = make_scene()
    base = tmp_path_factory.mktemp("dumps")
    before = {n: r.copy() for n, r in scene.rams.items()}
    d1 = scene.dump(base / "d1")
    ram1, ram2 = scene.rams["vm1"], scene.rams["vm2"]
    ram1[0x500010:0x500030] = 0xAB            # blocks 1-2 of one line
    ram1[0x600000:0x601000] = 0x55            # a whole page
    ram1[0x700000:0x700040] = 0               # zeros over zeros: same plaintext, same ciphertext
    ram1[0x7FFFF0:0x800010] = 1               # across a line, a page and the 8 MiB diff chunk
    ram1[10 * MIB - 16:10 * MIB + 16] = 9     # contiguous in HPA, two GPA ranges
    ram1[10 * MIB + 0x40:10 * MIB + 0x50] = 7
    ram2[0x100000:0x100004] = np.frombuffer(b"ZZZZ", np.uint8)
    after = {n: r.copy() for n, r in scene.rams.items()}
    d2 = scene.dump(base / "d2")
    return scene, d1, d2, before, after


@pytest.fixture
def key_file(tmp_path):
    def write(key: bytes, tweak: bytes, extra: str = "") -> str:
        path = tmp_path / f"key-{os.urandom(3).hex()}"
        path.write_text(f"{key.hex()} {tweak.hex()}{extra}\n")
        return str(path)
    return write
