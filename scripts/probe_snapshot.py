#!/usr/bin/env python3
"""Tamper campaign against the encrypted snapshot file: how many corruptions are refused.

    .venv/bin/python scripts/probe_snapshot.py [--flips 16] [--restores 8] [--seed 1]

Saves two snapshots of a ticking bare-metal guest (one KEK), then, one mutated copy at a time:
bit flips in every region of the file (header fields, each stored chunk's ciphertext and tag,
the device state, the manifest, each trailer field), bytes inserted at every section boundary
(with and without the trailer moved to match), bytes appended, truncations, other header
versions, chunks swapped, dropped or taken from the other snapshot, the other snapshot's
manifest spliced in, and manifests re-encoded (keys reordered, whitespace, a duplicated key)
and sealed again without the KEK, plus a duplicated key sealed *with* it. Each copy goes
through ``verify_snapshot``; ``--restores`` of them, spread over the categories, also through a
real restore, which must refuse and leave no guest. It prints one line per category and the
total; any copy accepted is listed and makes the exit status 1. The test suite runs a bounded
form (``tests/live/test_snapshot_probe.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import struct
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from qemu_mktme.errors import IntegrityError, SnapshotError
from qemu_mktme.host.host import Host
from qemu_mktme import images
from qemu_mktme.files import snapfile
from qemu_mktme.live.encrypted import EncryptedMachine
from qemu_mktme.qemu.machine import MachineConfig
from qemu_mktme.live.snapshot import restore_snapshot, save_snapshot, verify_snapshot


@dataclass
class Case:
    category: str
    name: str
    data: bytes
    must_say: str | None = None          # a word the refusal must contain


@dataclass
class Outcome:
    case: Case
    refused: bool
    message: str


async def make_snapshots(directory: Path, kek: bytes) -> tuple[Path, Path]:
    """Two snapshots of one ticking bare-metal guest, a few seconds apart."""
    image = images.build("baremetal")
    host = Host(keyid_bits=6)
    serial = host.keys.add("probe", f"type=user key={os.urandom(16).hex()} tweak={os.urandom(16).hex()}",
                           tenant="probe")
    boot = image.boot(commands=["write 0x200000 PROBE-SECRET", "fill 0x400000 0x300000 0x5a 8", "ticks 0 2000000"])
    a, b = directory / "a.snap", directory / "b.snap"
    async with EncryptedMachine(host, MachineConfig(boot=boot, memory="256M", name="probe"),
                                key_serial=serial, tenant="probe") as vm:
        await vm.console.wait_for(r"tick 1\n", 30)
        await save_snapshot(vm, a, kek)
        await vm.console.wait_for(r"tick 3\n", 30)
        await save_snapshot(vm, b, kek)
    return a, b


def _layout(path: Path, kek: bytes) -> tuple[snapfile.Snapshot, int, int]:
    snap = snapfile.open_snapshot(path, kek)
    snap.close()
    m_off = snap.device_state_offset + snap.device_state_nbytes
    return snap, m_off, snap.file_size - snapfile.TRAILER.size


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def _with_trailer_offset(data: bytes, delta: int) -> bytes:
    t = len(data) - snapfile.TRAILER.size
    m_off, m_len, tag, end = snapfile.TRAILER.unpack(data[t:])
    return data[:t] + snapfile.TRAILER.pack(m_off + delta, m_len, tag, end)


def _reseal(data: bytes, snap: snapfile.Snapshot, raw: bytes, kek: bytes) -> bytes:
    """``data`` with its manifest replaced by ``raw`` sealed under keys from ``kek``."""
    header = data[:snapfile.HEADER.size]
    salt, sid = snapfile.HEADER.unpack(header)[2:]
    keys = snapfile.Keys(kek, salt, sid)
    m_off = snap.device_state_offset + snap.device_state_nbytes
    sealed = keys.meta.encrypt(snapfile.MANIFEST_NONCE, raw, snapfile.manifest_aad(header, m_off, len(raw)))
    return (data[:m_off] + sealed[:-snapfile.TAG_NBYTES]
            + snapfile.TRAILER.pack(m_off, len(raw), sealed[-snapfile.TAG_NBYTES:], snapfile.END_MAGIC))


def cases(a: Path, b: Path, kek: bytes, *, flips: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    good, other = a.read_bytes(), b.read_bytes()
    snap, m_off, t_off = _layout(a, kek)
    osnap, _, _ = _layout(b, kek)
    size = len(good)
    H = snapfile.HEADER.size
    regions = {"header magic": (0, 8), "header version": (8, 12), "header salt": (12, 44),
               "header snapshot id": (44, 60),
               "device state": (snap.device_state_offset, m_off), "manifest": (m_off, t_off),
               "trailer manifest offset": (t_off, t_off + 8), "trailer manifest length": (t_off + 8, t_off + 16),
               "trailer tag": (t_off + 16, t_off + 32), "trailer end magic": (t_off + 32, size)}
    for c in snap.chunks:
        regions[f"chunk {c.index} ciphertext"] = (c.file_offset, c.file_offset + c.nbytes)
        regions[f"chunk {c.index} tag"] = (c.file_offset + c.nbytes, c.file_offset + c.nbytes + snapfile.TAG_NBYTES)
    out: list[Case] = []
    for region, (lo, hi) in regions.items():
        bits = range(lo * 8, hi * 8)
        for bit in rng.sample(bits, min(flips, len(bits))):
            out.append(Case("bit flip", f"{region}, bit {bit}", _flip(good, bit),
                            "corrupted" if region == "header version" else None))
    boundaries = {"after header": H, **{f"before chunk {c.index}": c.file_offset for c in snap.chunks[1:]},
                  "before device state": snap.device_state_offset, "before manifest": m_off,
                  "before trailer": t_off}
    for where, at in boundaries.items():
        for n in (1, 16, 64):
            ins = good[:at] + os.urandom(n) + good[at:]
            out.append(Case("inserted bytes", f"{n} at {where}", ins))
            if at <= m_off:
                out.append(Case("inserted bytes", f"{n} at {where}, trailer moved", _with_trailer_offset(ins, n)))
    for n in (1, 16, 4096):
        out.append(Case("appended bytes", f"{n} at the end", good + bytes(n)))
    cuts = sorted({1, 8, 12, H - 1, H, *[c.file_offset + 7 for c in snap.chunks], snap.device_state_offset,
                   m_off, t_off, size - 1, *[rng.randrange(size) for _ in range(flips)]})
    for cut in cuts:
        out.append(Case("truncation", f"at {cut}", good[:cut]))
    for v in (0, 1, 3, 99, 2 ** 26 + 2, 2 ** 32 - 1):
        out.append(Case("header version", f"version {v}", good[:8] + struct.pack("<I", v) + good[12:], "corrupted"))
    c0, c1 = snap.chunks[0], snap.chunks[1]
    n0, n1 = c0.nbytes + snapfile.TAG_NBYTES, c1.nbytes + snapfile.TAG_NBYTES
    if n0 == n1:
        sw = bytearray(good)
        sw[c0.file_offset:c0.file_offset + n0] = good[c1.file_offset:c1.file_offset + n1]
        sw[c1.file_offset:c1.file_offset + n1] = good[c0.file_offset:c0.file_offset + n0]
        out.append(Case("chunk swap", "chunks 0 and 1 exchanged", bytes(sw)))
    for c in snap.chunks:
        oc = next((x for x in osnap.chunks if x.index == c.index and x.nbytes == c.nbytes), None)
        if oc is not None:
            sub = bytearray(good)
            sub[c.file_offset:c.file_offset + c.nbytes + 16] = other[oc.file_offset:oc.file_offset + oc.nbytes + 16]
            out.append(Case("chunk from the other snapshot", f"chunk {c.index}", bytes(sub)))
    last = snap.chunks[-1]
    n_last = last.nbytes + snapfile.TAG_NBYTES
    dropped = good[:last.file_offset] + good[last.file_offset + n_last:]
    out.append(Case("chunk dropped", f"chunk {last.index}, trailer moved", _with_trailer_offset(dropped, -n_last)))
    o_m = osnap.device_state_offset + osnap.device_state_nbytes
    out.append(Case("splice", "the other snapshot's manifest and trailer", good[:m_off] + other[o_m:]))
    out.append(Case("splice", "the other snapshot's header", other[:H] + good[H:]))
    out.append(Case("splice", "the other snapshot's device state",
                    good[:snap.device_state_offset] + other[osnap.device_state_offset:o_m] + good[m_off:]))
    manifest = snap.manifest
    reorder = json.dumps(dict(reversed(list(manifest.items())))).encode()
    spaced = json.dumps(manifest, indent=2).encode()
    dup = snapfile.canonical(manifest)[:-1] + b',"format":"qemu-mktme-snapshot"}'
    wrong = os.urandom(32)
    for name, raw in (("keys reordered", reorder), ("whitespace", spaced), ("duplicated key", dup)):
        out.append(Case("manifest re-encoded", f"{name}, sealed without the KEK", _reseal(good, snap, raw, wrong)))
    out.append(Case("manifest re-encoded", "duplicated key, sealed with the KEK", _reseal(good, snap, dup, kek),
                    "duplicate"))
    return out


def run_verify(cases_: list[Case], kek: bytes, directory: Path) -> list[Outcome]:
    path = directory / "probe.snap"
    outcomes = []
    for case in cases_:
        path.write_bytes(case.data)
        try:
            verify_snapshot(path, kek)
        except (IntegrityError, SnapshotError) as err:
            msg = str(err)
            ok = case.must_say is None or case.must_say in msg
            outcomes.append(Outcome(case, ok, msg if ok else f"refused, but without '{case.must_say}': {msg}"))
        else:
            outcomes.append(Outcome(case, False, "accepted"))
    path.unlink(missing_ok=True)
    return outcomes


async def run_restores(cases_: list[Case], kek: bytes, directory: Path, count: int, seed: int) -> list[Outcome]:
    """A real restore of ``count`` cases, one or more per category: refused, and no guest left."""
    by_cat: dict[str, list[Case]] = defaultdict(list)
    for c in cases_:
        by_cat[c.category].append(c)
    rng = random.Random(seed)
    picked = [rng.choice(v) for v in by_cat.values()][:count]
    path = directory / "probe-restore.snap"
    outcomes = []
    for case in picked:
        path.write_bytes(case.data)
        host = Host(keyid_bits=6)
        try:
            vm = await restore_snapshot(host, path, kek)
        except (IntegrityError, SnapshotError) as err:
            clean = host.guests == {} and host.keys.table() == []
            outcomes.append(Outcome(case, clean, str(err) if clean else "refused, but a guest or key was left"))
        else:
            await vm.close()
            outcomes.append(Outcome(case, False, "restored"))
    path.unlink(missing_ok=True)
    return outcomes


def report(outcomes: list[Outcome], title: str) -> int:
    by_cat: dict[str, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        by_cat[o.case.category].append(o)
    print(title)
    for cat, os_ in by_cat.items():
        print(f"  {cat:32s} refused {sum(o.refused for o in os_):4d} of {len(os_):4d}")
    bad = [o for o in outcomes if not o.refused]
    print(f"  {'total':32s} refused {len(outcomes) - len(bad):4d} of {len(outcomes):4d}")
    for o in bad:
        print(f"  NOT REFUSED: {o.case.category}: {o.case.name}: {o.message}")
    return len(bad)


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flips", type=int, default=16, help="bit flips per region (default 16)")
    p.add_argument("--restores", type=int, default=8, help="cases also tried as real restores (default 8)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    kek = os.urandom(32)
    with tempfile.TemporaryDirectory(prefix="probe-snapshot-") as tmp:
        d = Path(tmp)
        a, b = await make_snapshots(d, kek)
        verify_snapshot(a, kek)                     # the control: the untouched file is accepted
        all_cases = cases(a, b, kek, flips=args.flips, seed=args.seed)
        failures = report(run_verify(all_cases, kek, d), f"verify, {len(all_cases)} tampered copies of "
                                                         f"a {a.stat().st_size >> 10} KiB snapshot:")
        if args.restores:
            failures += report(await run_restores(all_cases, kek, d, args.restores, args.seed),
                               "restore (real QEMU):")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
