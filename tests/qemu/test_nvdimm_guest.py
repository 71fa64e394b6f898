"""The stock Linux guest on an encrypted vNVDIMM (/dev/pmem0 through nfit, libnvdimm, nd_pmem):
what it writes survives power-off as ciphertext under its key with the HPA as tweak, reads back
at the same HPA, reads as garbage at another (the talk's caveat) until ``rekey_media`` moves it,
and a wrong key gives garbage, never an error. One media file and one boot sequence for the
module (five boots of the Linux guest)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qemu_mktme import images
from qemu_mktme.engine.xts import XtsKey
from qemu_mktme.files.journal import journal_path
from qemu_mktme.files.nvdimmfile import HEADER_NBYTES, read_header, rekey_media, verify_media
from qemu_mktme.host.host import Host
from qemu_mktme.live.encrypted import EncryptedMachine
from qemu_mktme.live.nvdimm import NvdimmMedia
from qemu_mktme.qemu.machine import MachineConfig
from reference import user_payload, xts_lines

pytestmark = pytest.mark.qemu

MiB = 1 << 20
SIZE = 16 * MiB
PATTERN_MB = 4
OTHER_HPA = 0x3_0000_0000
KEY = (bytes(range(1, 17)), bytes(range(17, 33)))
WRONG_KEY = (bytes(range(2, 18)), bytes(range(17, 33)))
_RESULT = re.compile(r"pmem (write|read) pattern sha256=([0-9a-f]{64}) secret sha256=([0-9a-f]{64})")


async def _boot(image: images.Image, media: NvdimmMedia, mode: str, secret: str, key: tuple[bytes, bytes] = KEY,
                ) -> dict[str, Any]:
    host = Host(keyid_bits=6)
    serial = host.keys.add("acme:pmem", user_payload(*key), tenant="acme")
    warnings: list[str] = []
    config = MachineConfig(name="pmem", memory="512M", boot=image.boot(
        workload="pmem", params={"mode": mode, "size_mb": PATTERN_MB, "secret": secret}))
    async with EncryptedMachine(host, config, key_serial=serial, tenant="acme", nvdimms=[media],
                                warn=warnings.append) as vm:
        nv = vm.query()["nvdimms"][0]
        assert not vm.guest.check_consistency()            # EPT, VMM and IOMMU tag the module with the KeyID
        maps = Path(f"/proc/{vm.pid}/maps").read_text()      # QEMU maps our memfd: the VMM table covers it
        mapped = re.search(r"^([0-9a-f]+)-[0-9a-f]+ rw.s .*/memfd:qemu-mktme-nvdimm0 ", maps, re.M)
        assert mapped and int(mapped[1], 16) == vm.guest.nvdimms[0].hva
        assert not [p for p in Path("/dev/shm").iterdir() if "nvdimm" in p.name]
        m = await vm.console.wait_for(_RESULT, timeout=120)
        await vm.wait(60)
    return {"pattern": m[2], "secret": m[3], "hpa": int(nv["hpa"], 16), "warnings": warnings}


@pytest.fixture(scope="module")
def story(linux_image: images.Image, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("pmem") / "media.img"
    secret = "PMEM-SECRET-" + os.urandom(8).hex()
    out: dict[str, Any] = {"path": path, "secret": secret}

    async def run() -> None:
        out["boot1"] = await _boot(linux_image, NvdimmMedia(path, SIZE), "write", secret)
        out["media1"], out["header1"] = path.read_bytes(), read_header(path)
        out["boot2"] = await _boot(linux_image, NvdimmMedia(path), "read", secret)
        out["media2"] = path.read_bytes()
        out["boot3"] = await _boot(linux_image, NvdimmMedia(path, hpa=OTHER_HPA), "read", secret)
        out["media3"] = path.read_bytes()
        out["rekey"] = rekey_media(path, XtsKey(*KEY), to_hpa=OTHER_HPA)
        out["boot4"] = await _boot(linux_image, NvdimmMedia(path), "read", secret)
        out["media4"] = path.read_bytes()
        out["boot5"] = await _boot(linux_image, NvdimmMedia(path), "read", secret, key=WRONG_KEY)
        out["media5"] = path.read_bytes()
    asyncio.run(run())
    return out


def test_media_holds_xts_of_the_pattern_at_the_recorded_hpa(story: dict[str, Any]) -> None:
    boot1, media, secret = story["boot1"], story["media1"], story["secret"].encode()
    hpa = story["header1"].hpa
    assert hpa == boot1["hpa"]                                  # the header records where it was written
    body = media[HEADER_NBYTES:]
    assert len(body) == SIZE
    assert secret not in media                                  # no plaintext of the secret...
    # ...nor of the pattern: the guest's pattern is what decrypting with `cryptography` gives
    # (its sha256 is the guest's), and encrypting that pattern again gives the media's bytes
    n = PATTERN_MB * MiB
    plain = b"".join(
        Cipher(algorithms.AES(KEY[0] + KEY[1]), modes.XTS((hpa + i).to_bytes(16, "little"))).decryptor()
        .update(body[i:i + 64]) for i in range(0, n + 64, 64))
    assert hashlib.sha256(plain[:n]).hexdigest() == boot1["pattern"]
    assert plain[n:n + len(secret)] == secret
    assert xts_lines(*KEY, hpa, plain[:n]) == body[:n]
    lines = np.frombuffer(plain[:n], np.uint8).reshape(-1, 64)
    assert not any(lines[i].tobytes() in body for i in range(0, lines.shape[0], 4096))


def test_same_hpa_reads_back(story: dict[str, Any]) -> None:
    assert story["boot2"]["hpa"] == story["boot1"]["hpa"]       # pinned where it was written
    assert (story["boot2"]["pattern"], story["boot2"]["secret"]) == (story["boot1"]["pattern"], story["boot1"]["secret"])
    assert not story["boot2"]["warnings"]
    # the guest only read: every unit is as it was read, so the image is not rewritten at all
    assert story["media2"] == story["media1"]


def test_other_hpa_reads_garbage_and_leaves_the_media(story: dict[str, Any]) -> None:
    boot3 = story["boot3"]
    assert boot3["hpa"] == OTHER_HPA
    assert boot3["pattern"] != story["boot1"]["pattern"] and boot3["secret"] != story["boot1"]["secret"]
    assert any("will read garbage" in w for w in boot3["warnings"])
    assert any("not written back" in w for w in boot3["warnings"])
    assert story["media3"] == story["media2"]                  # not written back: nothing lost


def test_rekeyed_media_reads_back_at_the_new_hpa(story: dict[str, Any]) -> None:
    old, new = story["rekey"]
    assert (old.hpa, new.hpa) == (story["boot1"]["hpa"], OTHER_HPA)
    boot4 = story["boot4"]
    assert boot4["hpa"] == OTHER_HPA and not boot4["warnings"]
    assert (boot4["pattern"], boot4["secret"]) == (story["boot1"]["pattern"], story["boot1"]["secret"])


def test_wrong_key_gives_garbage_not_an_error(story: dict[str, Any]) -> None:
    boot5 = story["boot5"]
    assert boot5["hpa"] == OTHER_HPA
    assert boot5["pattern"] != story["boot1"]["pattern"] and boot5["secret"] != story["boot1"]["secret"]
    assert not boot5["warnings"]                         # nothing tells a wrong key from a right one
    # a guest that only read leaves the media's bytes as they were (the ciphertext round-trips)
    assert story["media5"][HEADER_NBYTES:] == story["media4"][HEADER_NBYTES:]


def test_dump_writes_the_media_and_the_session_refuses_snapshots(linux_image: images.Image, tmp_path) -> None:
    """A dump is a persist point: the media image is written from the DRAM view then (a new
    module's: the encryption of zeros at its HPA), and again at shutdown with what the guest wrote."""
    from qemu_mktme.errors import NvdimmError
    from qemu_mktme.live.session import HostSession, VmSpec
    media = tmp_path / "pm.img"
    secret = "DUMP-" + os.urandom(6).hex()
    config = MachineConfig(name="pm", memory="512M", boot=linux_image.boot(
        workload="pmem", params={"mode": "write", "size_mb": 1, "secret": secret, "hold": 1}))

    async def run() -> tuple[Any, Any, str]:
        async with HostSession([VmSpec(config, "acme", user_payload(*KEY), nvdimms=(NvdimmMedia(media, 4 * MiB),))],
                               control=False) as session:
            vm = session.machines["pm"]
            await vm.console.wait_for("mktme-linux: holding", timeout=120)
            with pytest.raises(NvdimmError, match="a snapshot of a VM with an NVDIMM is refused"):
                await session.save("pm", str(tmp_path / "snap"), bytes(range(32)))
            await session.dump(tmp_path / "dump")
            at_dump, inode = read_header(media), media.stat().st_ino
            hpa = vm.query()["nvdimms"][0]["hpa"]
            assert media.read_bytes()[HEADER_NBYTES:] == xts_lines(*KEY, int(hpa, 16), bytes(4 * MiB))
            await vm.console.write("go\n")
            await vm.console.wait_for(_RESULT, timeout=120)
            await vm.wait(60)
        assert media.stat().st_ino == inode                 # shutdown wrote in place (after the dump)
        return at_dump, read_header(media), hpa
    at_dump, at_shutdown, hpa = asyncio.run(run())
    assert (at_dump.reason, at_shutdown.reason) == ("dump", "shutdown")
    assert at_shutdown.hpa == int(hpa, 16) and secret.encode() not in media.read_bytes()
    # the changed unit went through the journal (none left): the result is whole and is `cryptography`'s XTS of what the guest wrote (the secret after 1 MiB)
    assert verify_media(media) == at_shutdown and not journal_path(media).exists()
    body = media.read_bytes()[HEADER_NBYTES:]
    at = MiB
    plain = Cipher(algorithms.AES(KEY[0] + KEY[1]), modes.XTS((int(hpa, 16) + at).to_bytes(16, "little"))
                   ).decryptor().update(body[at:at + 64])
    assert plain.startswith(secret.encode())
    assert not (tmp_path / "snap").exists()
