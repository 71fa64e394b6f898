"""DRAM dumps: what a physical attacker reads off the memory bus, and the reader the tools use.

A dump is a directory (0700) holding

- ``dram.bin`` (0600): for each region (one VM's RAM) the DRAM bytes of its whole HPA range,
  i.e. ciphertext under the region's KeyID with tweak = HPA, regions back to back, each starting
  on a 4 KiB boundary of the file;
- ``manifest.json``: format version, when, the host's KeyID layout, and per region its VM,
  tenant, HPA range, file offset, algorithm, key type, the guest-physical ranges it backs, and
  the KeyID of every page as the VM's EPT tags it (run-length encoded). **Never key material.**

Capture is consistent: every VM is paused while its range is read and resumed after.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np

from ..arch.addresses import PAGE_SIZE
from ..errors import IntegrityError, SnapshotError
from ..arch.addresses import KeyIdLayout
from ..arch.guestmap import GuestRange
from . import Progress
from .atomic import atomic_directory, holds_only, write_synced

FORMAT = "qemu-mktme-dram-dump"
VERSION = 1
DATA_FILE = "dram.bin"
MANIFEST_FILE = "manifest.json"
CHUNK_NBYTES = 16 << 20

@dataclass(frozen=True)
class Region:
    """One VM's RAM in a dump."""

    vm: str
    tenant: str
    hpa: int
    nbytes: int
    file_offset: int
    keyid: int
    algorithm: str | None
    key_type: str
    gpa_ranges: tuple[tuple[int, int, int], ...]      # (gpa, size, hpa)
    keyid_runs: tuple[tuple[int, int, int], ...]      # (hpa, npages, keyid) as the EPT tags them

    @property
    def end(self) -> int:
        return self.hpa + self.nbytes

    def to_json(self) -> dict[str, Any]:
        return {
            "vm": self.vm, "tenant": self.tenant, "hpa": hex(self.hpa), "nbytes": self.nbytes,
            "file_offset": self.file_offset, "keyid": self.keyid, "algorithm": self.algorithm,
            "key_type": self.key_type,
            "gpa_ranges": [{"gpa": hex(g), "size": s, "hpa": hex(h)} for g, s, h in self.gpa_ranges],
            "keyid_runs": [[hex(h), n, k] for h, n, k in self.keyid_runs],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Region:
        return cls(str(d["vm"]), str(d["tenant"]), int(d["hpa"], 16), int(d["nbytes"]), int(d["file_offset"]),
                   int(d["keyid"]), d.get("algorithm"), str(d["key_type"]),
                   tuple((int(r["gpa"], 16), int(r["size"]), int(r["hpa"], 16)) for r in d["gpa_ranges"]),
                   tuple((int(h, 16), int(n), int(k)) for h, n, k in d["keyid_runs"]))

    def gpa_to_hpa(self, gpa: int, nbytes: int = 1) -> int:
        for g, size, h in self.gpa_ranges:
            if g <= gpa and gpa + nbytes <= g + size:
                return h + gpa - g
        raise ValueError(f"{self.vm}: GPA {gpa:#x}+{nbytes:#x} is not in the dump")

    def hpa_to_gpa(self, hpa: int) -> int | None:
        for g, size, h in self.gpa_ranges:
            if h <= hpa < h + size:
                return g + hpa - h
        return None


class Span(Protocol):
    """A run of guest memory one EPT mapping covers, with its KeyID."""

    @property
    def hpa(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def keyid(self) -> int: ...


class SpanTable(Protocol):
    def spans(self) -> Sequence[Span]: ...


class DumpSource(Protocol):
    """What a dump reads of a VM. The host model's ``EncryptedGuest`` is one; this layer names
    only what it needs (files/ sits beside the host model, not on it)."""

    @property
    def name(self) -> str: ...
    @property
    def tenant(self) -> str: ...
    @property
    def hpa_base(self) -> int: ...
    @property
    def keyid(self) -> int: ...
    @property
    def layout(self) -> KeyIdLayout: ...
    @property
    def ram(self) -> np.ndarray: ...
    @property
    def ranges(self) -> Sequence[GuestRange]: ...
    @property
    def ept(self) -> SpanTable: ...

    def iter_dram(self, offset: int = 0, nbytes: int | None = None, chunk_nbytes: int = 4 << 20, *,
                  skip_zero: bool = False) -> Iterator[tuple[int, np.ndarray]]: ...

    def query(self) -> dict[str, Any]: ...


def _keyid_runs(guest: DumpSource) -> tuple[tuple[int, int, int], ...]:
    """The EPT's KeyID runs over the guest's RAM (an NVDIMM's mapping is not RAM: its DRAM image
    is its media image, written beside the dump)."""
    runs: list[list[int]] = []
    ram = range(guest.hpa_base, guest.hpa_base + guest.ram.size)
    for leaf in sorted((s for s in guest.ept.spans() if s.hpa in ram), key=lambda l: l.hpa):
        npages = leaf.size // PAGE_SIZE
        if runs and runs[-1][0] + runs[-1][1] * PAGE_SIZE == leaf.hpa and runs[-1][2] == leaf.keyid:
            runs[-1][1] += npages
        else:
            runs.append([leaf.hpa, npages, leaf.keyid])
    return tuple((h, n, k) for h, n, k in runs)


def write_dump(guests: Sequence[DumpSource], path: str | os.PathLike[str], *,
               host_info: dict[str, Any] | None = None, progress: Progress | None = None) -> Dump:
    """Write the DRAM image of ``guests`` to directory ``path`` (which must not exist).

    The caller pauses the VMs (as :func:`qemu_mktme.live.capture.capture` does). On any
    failure, including a full disk, the partial directory is removed. Raises ``SnapshotError``.
    """
    names = [g.name for g in guests]
    if len(set(names)) != len(names):
        raise ValueError(f"cannot dump {path}: a VM is named twice ({', '.join(names)})")
    with atomic_directory(path, what="dump", proof=holds_only((DATA_FILE, MANIFEST_FILE))) as partial:
        fd = os.open(partial / DATA_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            regions = _write_regions(out, guests, progress)
            out.flush()
            os.fsync(out.fileno())
        manifest = {
            "format": FORMAT, "version": VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": host_info or {"maxphyaddr": guests[0].layout.maxphyaddr if guests else None,
                                  "keyid_bits": guests[0].layout.keyid_bits if guests else None},
            "regions": [r.to_json() for r in regions],
        }
        write_synced(partial / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
        _check_regions(Path(path), regions)          # what readers will check, before the dump appears
    return Dump(path)


def _write_regions(out: BinaryIO, guests: Sequence[DumpSource], progress: Progress | None) -> list[Region]:
    """Each guest's DRAM image, back to back on 4 KiB boundaries of ``out``; their regions."""
    total = sum(g.ram.size for g in guests)
    done = 0
    regions = []
    for guest in guests:
        offset = out.tell()
        for _, chunk in guest.iter_dram(chunk_nbytes=CHUNK_NBYTES):
            out.write(chunk.data)
            done += chunk.size
            if progress:
                progress(done, total)
        out.write(bytes(-out.tell() % PAGE_SIZE))
        info = guest.query()
        regions.append(Region(
            guest.name, guest.tenant, guest.hpa_base, guest.ram.size, offset, int(guest.keyid),
            info["algorithm"], str(info["key-type"]),
            tuple((r.gpa, r.size, guest.hpa_base + r.offset) for r in guest.ranges),
            _keyid_runs(guest)))
    return regions


def _check_regions(path: Path, regions: Sequence[Region]) -> None:
    """The geometry the readers rely on: page-aligned, disjoint regions whose GPA ranges and
    KeyID runs lie inside them (``IntegrityError`` naming the first violation)."""
    def bad(r: Region, what: str) -> IntegrityError:
        return IntegrityError(f"{path}: malformed manifest: region {r.vm!r}: {what}")
    names = set()
    for r in regions:
        if r.vm in names:
            raise bad(r, "VM named twice")
        names.add(r.vm)
        if r.nbytes <= 0 or r.file_offset < 0 or r.hpa < 0 or (r.hpa | r.nbytes | r.file_offset) % PAGE_SIZE:
            raise bad(r, f"HPA {r.hpa:#x}+{r.nbytes:#x} at file offset {r.file_offset:#x} is not 4 KiB aligned")
        for g, size, h in r.gpa_ranges:
            if size <= 0 or (g | size | h) % PAGE_SIZE or g < 0 or not r.hpa <= h <= h + size <= r.end:
                raise bad(r, f"GPA range {g:#x}+{size:#x} at HPA {h:#x} outside HPA {r.hpa:#x}+{r.nbytes:#x}")
        for h, n, k in r.keyid_runs:
            if n <= 0 or k < 0 or h % PAGE_SIZE or not r.hpa <= h <= h + n * PAGE_SIZE <= r.end:
                raise bad(r, f"KeyID run {h:#x}+{n} pages outside HPA {r.hpa:#x}+{r.nbytes:#x}")
    starts: tuple[tuple[Callable[[Region], int], str], ...] = ((lambda r: r.file_offset, "file ranges"),
                                                               (lambda r: r.hpa, "HPA ranges"))
    for key, what in starts:
        ordered = sorted(regions, key=key)
        for a, b in zip(ordered, ordered[1:]):
            if key(a) + a.nbytes > key(b):
                raise IntegrityError(f"{path}: malformed manifest: the {what} of {a.vm!r} and {b.vm!r} overlap")


class Dump:
    """A dump on disk, read-only; ``data`` is a numpy memmap of ``dram.bin``.

    Raises ``IntegrityError`` for a missing or malformed manifest, a future version, or a data
    file shorter than the manifest says (truncation).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            manifest = json.loads((self.path / MANIFEST_FILE).read_text())
        except FileNotFoundError:
            raise IntegrityError(f"{self.path} is not a dump (no {MANIFEST_FILE})") from None
        except (OSError, ValueError) as err:
            raise IntegrityError(f"{self.path}: unreadable manifest: {err}") from err
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise IntegrityError(f"{self.path}: not a {FORMAT} manifest")
        if not isinstance(manifest.get("version"), int) or manifest["version"] < 1:
            raise IntegrityError(f"{self.path}: no valid format version in the manifest ({manifest.get('version')!r})")
        if manifest["version"] > VERSION:
            raise IntegrityError(f"{self.path}: dump format version {manifest.get('version')} is newer than "
                                 f"this qemu-mktme understands ({VERSION})")
        try:
            self.regions = [Region.from_json(r) for r in manifest["regions"]]
        except (KeyError, TypeError, ValueError) as err:
            raise IntegrityError(f"{self.path}: malformed region in manifest: {err}") from err
        _check_regions(self.path, self.regions)
        self.manifest = manifest
        data_path = self.path / DATA_FILE
        need = max((r.file_offset + r.nbytes for r in self.regions), default=0)
        try:
            size = data_path.stat().st_size if data_path.exists() else -1
            if size < need:
                raise IntegrityError(f"{data_path}: {max(size, 0)} bytes, the manifest needs {need} (truncated?)")
            self.data = np.memmap(data_path, dtype=np.uint8, mode="r") if need else np.zeros(0, np.uint8)
        except OSError as err:
            raise SnapshotError(f"cannot read {data_path}: {err.strerror or err}") from err

    def __repr__(self) -> str:
        return f"<Dump {self.path} {len(self.regions)} regions>"

    def region(self, vm: str | None = None) -> Region:
        """The region of ``vm`` (or the only one)."""
        if vm is None:
            if len(self.regions) != 1:
                raise ValueError(f"the dump holds {len(self.regions)} VMs; name one of "
                                 f"{', '.join(r.vm for r in self.regions)}")
            return self.regions[0]
        for r in self.regions:
            if r.vm == vm:
                return r
        raise ValueError(f"no VM {vm!r} in the dump (have: {', '.join(r.vm for r in self.regions)})")

    def region_of_hpa(self, hpa: int) -> Region | None:
        return next((r for r in self.regions if r.hpa <= hpa < r.end), None)

    def dram(self, hpa: int, nbytes: int) -> np.ndarray:
        """The dumped DRAM bytes at host-physical ``hpa`` (a view, no copy)."""
        r = self.region_of_hpa(hpa)
        if r is None or hpa + nbytes > r.end:
            raise ValueError(f"HPA {hpa:#x}+{nbytes:#x} is not in the dump")
        off = r.file_offset + hpa - r.hpa
        return self.data[off:off + nbytes]

    def region_data(self, region: Region) -> np.ndarray:
        return self.data[region.file_offset:region.file_offset + region.nbytes]

    def iter_pages(self) -> Iterator[tuple[int, int]]:
        """(hpa, keyid) of every dumped page, from the EPT-derived KeyID map."""
        for r in self.regions:
            for hpa, n, keyid in r.keyid_runs:
                for i in range(n):
                    yield hpa + i * PAGE_SIZE, keyid
