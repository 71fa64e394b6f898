"""Where every page of a dump lives: VM, HPA, GPA, and the KeyID the VM's EPT tags it with.

Shared by the analyses: per-page KeyIDs as arrays, HPA -> GPA for many addresses at once, and
run coalescing (consecutive indices into ``(start, length)`` runs, cut where the guest-physical
mapping is discontiguous so that every run has one GPA).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ..arch.addresses import PAGE_SIZE
from ..errors import AddressError
from ..files.dumpfile import Dump, Region

UNTAGGED = -1
"""KeyID of a page that the VM's EPT does not map (a hole of the RAM backend in the GPA space)."""

BLOCK_NBYTES = 16
"""An AES block: the unit in which deterministic XTS leaks changes."""

I64 = npt.NDArray[np.int64]


def select_regions(dump: Dump, vm: str | None = None) -> list[Region]:
    """Every region of ``dump``, or only ``vm``'s (``ValueError`` naming the VMs it has)."""
    return list(dump.regions) if vm is None else [dump.region(vm)]


def page_keyids(region: Region) -> npt.NDArray[np.int16]:
    """The EPT KeyID of each page of ``region`` (``UNTAGGED`` where the EPT maps nothing)."""
    out = np.full(region.nbytes // PAGE_SIZE, UNTAGGED, np.int16)
    for hpa, npages, keyid in region.keyid_runs:
        first = (hpa - region.hpa) // PAGE_SIZE
        out[first:first + npages] = keyid
    return out


def gpa_boundaries(region: Region, unit: int) -> I64:
    """Indices (in ``unit``-byte units from the region start) where a GPA range starts or ends:
    a run crossing one would have no single guest-physical address."""
    edges = {(h - region.hpa) // unit for _, _, h in region.gpa_ranges}
    edges |= {(h + size - region.hpa) // unit for _, size, h in region.gpa_ranges}
    return np.array(sorted(edges), np.int64)


def hpa_to_gpa(region: Region, hpa: npt.ArrayLike) -> I64:
    """Guest-physical addresses of host-physical ``hpa`` (array), ``-1`` where the VM maps none."""
    h = np.asarray(hpa, np.int64)
    ranges = sorted((hh, g, size) for g, size, hh in region.gpa_ranges)
    if not ranges:
        return np.full(h.shape, -1, np.int64)
    starts = np.array([r[0] for r in ranges], np.int64)
    i = np.searchsorted(starts, h, side="right") - 1
    ok = i >= 0
    i = np.maximum(i, 0)
    base = starts[i]
    size = np.array([r[2] for r in ranges], np.int64)[i]
    gpa = np.array([r[1] for r in ranges], np.int64)[i]
    inside = ok & (h - base < size)
    return np.where(inside, gpa + h - base, -1)


def gpa_of(region: Region, hpa: int) -> int | None:
    g = int(hpa_to_gpa(region, [hpa])[0])
    return None if g < 0 else g


def gpa_to_hpa(region: Region, gpa: int, nbytes: int) -> int:
    """The HPA of guest-physical [gpa, gpa + nbytes), which must lie in one RAM range of the VM
    (``AddressError`` listing the VM's RAM otherwise)."""
    for g, size, h in region.gpa_ranges:
        if g <= gpa and gpa + nbytes <= g + size:
            return h + gpa - g
    ram = ", ".join(f"{g:#x}-{g + size - 1:#x}" for g, size, _ in sorted(region.gpa_ranges))
    raise AddressError(f"{region.vm}: GPA {gpa:#x}+{nbytes:#x} is not in the dump (the VM's RAM: {ram or 'none'})",
                       address=gpa, nbytes=nbytes)


def check_hpa(region: Region, hpa: int, nbytes: int) -> None:
    if not region.hpa <= hpa or hpa + nbytes > region.end:
        raise AddressError(f"{region.vm}: HPA {hpa:#x}+{nbytes:#x} is outside its DRAM "
                           f"{region.hpa:#x}-{region.end - 1:#x}", address=hpa, nbytes=nbytes)


def runs(indices: I64, breaks: I64 | None = None) -> tuple[I64, I64]:
    """Sorted unique ``indices`` as runs of consecutive values: ``(starts, lengths)``.

    A run also ends before every value in ``breaks`` (so runs never straddle a GPA boundary).
    """
    idx = np.asarray(indices, np.int64)
    if idx.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    new = np.empty(idx.size, bool)
    new[0] = True
    np.not_equal(np.diff(idx), 1, out=new[1:])
    if breaks is not None and breaks.size:
        new |= np.isin(idx, breaks)
    first = np.flatnonzero(new)
    lengths = np.diff(np.append(first, idx.size))
    return idx[first], lengths


def value_runs(values: npt.NDArray[Any], breaks: I64 | None = None) -> tuple[I64, I64, npt.NDArray[Any]]:
    """Runs of equal values: ``(starts, lengths, values)``, cut before every index in ``breaks``."""
    v = np.asarray(values)
    if v.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), v[:0]
    new = np.empty(v.size, bool)
    new[0] = True
    np.not_equal(v[1:], v[:-1], out=new[1:])
    if breaks is not None and breaks.size:
        b = breaks[(breaks > 0) & (breaks < v.size)]
        new[b] = True
    first = np.flatnonzero(new)
    return first.astype(np.int64), np.diff(np.append(first, v.size)).astype(np.int64), v[first]


# ----------------------------------------------------------------------------- the KeyID map


@dataclass(frozen=True)
class KeyIdRun:
    """Pages [hpa, hpa + npages * 4 KiB) of ``vm`` tagged ``keyid`` (``UNTAGGED``: no EPT entry)."""

    vm: str
    keyid: int
    hpa: int
    npages: int
    gpa: int | None

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "keyid": None if self.keyid == UNTAGGED else self.keyid, "hpa": hex(self.hpa),
                "npages": self.npages, "nbytes": self.npages * PAGE_SIZE,
                "gpa": None if self.gpa is None else hex(self.gpa)}


class KeyIdMap:
    """The per-page KeyID map of a dump: ``pages[i]`` holds the EPT KeyID of each page of
    ``regions[i]``. Built by :func:`keyid_map`."""

    def __init__(self, dump: Dump, regions: Sequence[Region]) -> None:
        self.dump = dump
        self.regions = list(regions)
        self.pages = [page_keyids(r) for r in self.regions]

    @property
    def npages(self) -> int:
        return sum(p.size for p in self.pages)

    def runs(self) -> list[KeyIdRun]:
        """Maximal runs of one KeyID and contiguous GPAs, in dump order."""
        out = []
        for r, keyids in zip(self.regions, self.pages):
            starts, lengths, values = value_runs(keyids, gpa_boundaries(r, PAGE_SIZE))
            hpas = r.hpa + starts * PAGE_SIZE
            gpas = hpa_to_gpa(r, hpas)
            out += [KeyIdRun(r.vm, int(k), int(h), int(n), None if g < 0 else int(g))
                    for h, n, k, g in zip(hpas, lengths, values, gpas)]
        return out

    def by_keyid(self) -> dict[int, dict[str, Any]]:
        """Per KeyID (``UNTAGGED`` included when present): page count and the VMs using it."""
        out: dict[int, dict[str, Any]] = {}
        for r, keyids in zip(self.regions, self.pages):
            values, counts = np.unique(keyids, return_counts=True)
            for k, n in zip(values.tolist(), counts.tolist()):
                row = out.setdefault(k, {"pages": 0, "vms": []})
                row["pages"] += n
                row["vms"].append(r.vm)
        return dict(sorted(out.items()))

    def mismatched_pages(self, region_index: int) -> int:
        """Pages the EPT tags with a KeyID other than the VM's own (the misconfiguration MKTME
        does not catch: the guest would read garbage there)."""
        r, keyids = self.regions[region_index], self.pages[region_index]
        return int(np.count_nonzero((keyids != UNTAGGED) & (keyids != r.keyid)))

    def to_json(self) -> dict[str, Any]:
        keyids = [{"keyid": None if k == UNTAGGED else k, "pages": row["pages"], "nbytes": row["pages"] * PAGE_SIZE,
                   "vms": row["vms"]} for k, row in self.by_keyid().items()]
        vms = []
        for i, (r, pages) in enumerate(zip(self.regions, self.pages)):
            values, counts = np.unique(pages, return_counts=True)
            vms.append({
                "vm": r.vm, "tenant": r.tenant, "keyid": r.keyid, "key_type": r.key_type, "algorithm": r.algorithm,
                "hpa": hex(r.hpa), "nbytes": r.nbytes, "pages": int(pages.size),
                "pages_by_keyid": {("untagged" if k == UNTAGGED else str(k)): n
                                   for k, n in zip(values.tolist(), counts.tolist())},
                "mismatched_pages": self.mismatched_pages(i),
            })
        return {"dump": str(self.dump.path), "pages": self.npages, "nbytes": self.npages * PAGE_SIZE,
                "keyids": keyids, "vms": vms, "runs": [run.to_json() for run in self.runs()]}


def keyid_map(dump: Dump, vm: str | None = None) -> KeyIdMap:
    """The KeyID map of ``dump`` (or of ``vm`` only)."""
    return KeyIdMap(dump, select_regions(dump, vm))


__all__ = ["BLOCK_NBYTES", "KeyIdMap", "KeyIdRun", "UNTAGGED", "check_hpa", "gpa_boundaries",
           "gpa_of", "gpa_to_hpa", "hpa_to_gpa", "keyid_map", "page_keyids", "runs", "select_regions", "value_runs"]
