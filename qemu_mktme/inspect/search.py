"""Search a dump for a byte string or a regular expression: in the raw DRAM (ciphertext, where
a secret should never appear) or in the DRAM decrypted with a key the user supplies.

Matches never span two VMs. Raw search runs over the mapped file in one pass (``mmap.find`` and
``re`` work on it without a copy). Decrypted search decrypts chunk by chunk into one buffer and
carries the last bytes of each chunk over to the next, so a match across a chunk boundary is
found once: a literal of any length, a regular expression match up to ``window`` bytes long.
Literal matches may overlap (``aa`` is found twice in ``aaa``); regular expression matches do
not, as with ``re.finditer``.
"""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..arch.addresses import PAGE_SIZE
from ..engine.xts import XtsKey, decrypt_lines
from ..errors import SnapshotError
from ..files.dumpfile import DATA_FILE, Dump, Region
from .entropy import DEFAULT_THRESHOLD, sample_entropy
from .keyspec import why_not_decryptable
from .layout import UNTAGGED, gpa_of, page_keyids, select_regions

CHUNK_NBYTES = 4 << 20
DEFAULT_WINDOW = 4096
DEFAULT_MAX_MATCHES = 100
PREVIEW_NBYTES = 64
SAMPLE_STRIDE = 16
"""The decrypted-entropy hint looks at every 16th page of a region."""

Buffer = mmap.mmap | bytearray


class Pattern:
    """What to look for: a literal byte string (from text, or ``hex``) or a bytes regex."""

    def __init__(self, text: str, *, regex: bool = False, hex: bool = False, window: int = DEFAULT_WINDOW) -> None:
        if regex and hex:
            raise ValueError("a pattern is either --regex or --hex, not both")
        if not text:
            raise ValueError("empty search pattern")
        self.regex = regex
        if hex:
            try:
                source = bytes.fromhex(text)
            except ValueError:
                raise ValueError("the --hex pattern is not hex") from None
        else:
            source = os.fsencode(text)     # the bytes the user typed, whatever the locale
        if regex:
            try:
                self.compiled: re.Pattern[bytes] | None = re.compile(source)
            except re.error as err:
                raise ValueError(f"bad regular expression: {err}") from None
            if self.compiled.fullmatch(b""):
                raise ValueError("the regular expression matches the empty string")
            self.needle = b""
            self.overlap = window
        else:
            self.compiled = None
            self.needle = source
            self.overlap = len(source) - 1
        if window < 1:
            raise ValueError(f"window must be positive, got {window}")

    def __repr__(self) -> str:  # the pattern may itself be secret: show its shape only
        return f"<Pattern {'regex' if self.regex else f'{len(self.needle)} bytes'}>"

    def finditer(self, buf: Buffer, pos: int, stop: int, endpos: int) -> Iterator[tuple[int, int]]:
        """(start, end) of matches in ``buf`` starting in [pos, stop), looking up to ``endpos``."""
        if self.compiled is None:
            n = len(self.needle)
            end = min(endpos, stop + n - 1)
            at = buf.find(self.needle, pos, end)
            while at >= 0:
                yield at, at + n
                at = buf.find(self.needle, at + 1, end)
            return
        for m in self.compiled.finditer(buf, pos, endpos):  # type: ignore[call-overload]
            if m.start() >= stop:
                return
            if m.end() > m.start():
                yield m.start(), m.end()


@dataclass(frozen=True)
class Match:
    """One match: where (VM, HPA, GPA, the page's EPT KeyID) and what (the first bytes)."""

    vm: str
    hpa: int
    gpa: int | None
    keyid: int
    nbytes: int
    data: bytes

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "hpa": hex(self.hpa), "gpa": None if self.gpa is None else hex(self.gpa),
                "keyid": None if self.keyid == UNTAGGED else self.keyid, "nbytes": self.nbytes,
                "hex": self.data.hex(), "text": printable(self.data)}


def printable(data: bytes) -> str:
    return "".join(chr(b) if 32 <= b < 127 else "." for b in data)


@dataclass
class RegionSearch:
    """How one VM's region was searched: decrypted or not (and why), and the entropy hint."""

    vm: str
    searched: bool
    decrypted: bool
    reason: str | None = None
    sampled_pages: int = 0
    low_entropy_pages: int = 0
    mean_bits: float | None = None

    @property
    def looks_random(self) -> bool:
        """Decrypted, yet every sampled page looks like ciphertext: the key is probably wrong."""
        return self.decrypted and self.sampled_pages > 0 and self.low_entropy_pages == 0

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "searched": self.searched, "decrypted": self.decrypted, "reason": self.reason,
                "sampled_pages": self.sampled_pages, "low_entropy_pages": self.low_entropy_pages,
                "mean_bits": None if self.mean_bits is None else round(self.mean_bits, 4),
                "looks_random": self.looks_random}


@dataclass
class SearchResult:
    dump: Dump
    pattern: Pattern
    decrypted: bool
    max_matches: int | None
    matches: list[Match] = field(default_factory=list)
    regions: list[RegionSearch] = field(default_factory=list)
    truncated: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"dump": str(self.dump.path), "view": "decrypted" if self.decrypted else "raw",
                "pattern": {"kind": "regex" if self.pattern.regex else "literal",
                            "nbytes": None if self.pattern.regex else len(self.pattern.needle)},
                "matches": [m.to_json() for m in self.matches], "truncated": self.truncated,
                "regions": [r.to_json() for r in self.regions]}


class _Collector:
    def __init__(self, result: SearchResult) -> None:
        self.result = result

    def add(self, region: Region, keyids: np.ndarray, hpa: int, data: bytes, nbytes: int) -> bool:
        """Record a match; False once ``max_matches`` are held (the search stops)."""
        r = self.result
        if r.max_matches is not None and len(r.matches) >= r.max_matches:
            r.truncated = True
            return False
        r.matches.append(Match(region.vm, hpa, gpa_of(region, hpa), int(keyids[(hpa - region.hpa) // PAGE_SIZE]),
                               nbytes, data))
        return True


def search(dump: Dump, pattern: Pattern, *, key: XtsKey | None = None, vm: str | None = None,
           max_matches: int | None = DEFAULT_MAX_MATCHES, threshold: float = DEFAULT_THRESHOLD) -> SearchResult:
    """Find ``pattern`` in ``dump`` (raw DRAM), or in its plaintext under ``key``.

    With a key, only regions whose algorithm matches it are decrypted (the others are listed
    with the reason); ``ValueError`` if that leaves none. Each decrypted region reports the
    entropy of a sample of its decrypted pages: see :attr:`RegionSearch.looks_random`. Stops
    after ``max_matches`` (``truncated`` is then set).
    """
    if max_matches is not None and max_matches < 1:
        raise ValueError(f"max_matches must be positive, got {max_matches}")
    regions = select_regions(dump, vm)
    result = SearchResult(dump, pattern, key is not None, max_matches)
    collector = _Collector(result)
    if key is None:
        _search_raw(dump, regions, pattern, collector)
        return result
    plan = [(r, why_not_decryptable(r, key)) for r in regions]
    if all(reason is not None for _, reason in plan):
        raise ValueError("the key applies to no VM of the dump: " + "; ".join(str(reason) for _, reason in plan))
    for region, reason in plan:
        if reason is not None:
            result.regions.append(RegionSearch(region.vm, False, False, reason))
            continue
        info = RegionSearch(region.vm, True, True)
        result.regions.append(info)
        if not _search_decrypted(dump, region, key, pattern, collector, info, threshold):
            break
    return result


def _search_raw(dump: Dump, regions: list[Region], pattern: Pattern, collector: _Collector) -> None:
    if not regions:
        return
    path = dump.path / DATA_FILE
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as err:
        raise SnapshotError(f"cannot read {path}: {err}") from err
    with mm:
        for region in regions:
            collector.result.regions.append(RegionSearch(region.vm, True, False))
            keyids = page_keyids(region)
            lo, hi = region.file_offset, region.file_offset + region.nbytes
            for start, end in pattern.finditer(mm, lo, hi, hi):
                data = mm[start:min(end, start + PREVIEW_NBYTES)]
                if not collector.add(region, keyids, region.hpa + start - lo, data, end - start):
                    return


def _search_decrypted(dump: Dump, region: Region, key: XtsKey, pattern: Pattern, collector: _Collector,
                      info: RegionSearch, threshold: float) -> bool:
    """Search one region's plaintext; False when the match limit stopped the search."""
    keep = pattern.overlap
    carry_room = -(-keep // 64) * 64
    buf = bytearray(carry_room + CHUNK_NBYTES)
    view = np.frombuffer(buf, np.uint8)
    src = dump.region_data(region)
    keyids = page_keyids(region)
    tail = 0                 # bytes of the previous chunk kept just before view[carry_room]
    resume = 0               # regex: no match may start before this buffer position
    samples = []
    for off in range(0, region.nbytes, CHUNK_NBYTES):
        n = min(CHUNK_NBYTES, region.nbytes - off)
        plain = view[carry_room:carry_room + n]
        decrypt_lines(key, src[off:off + n], region.hpa + off, out=plain)
        first = -(off // PAGE_SIZE) % SAMPLE_STRIDE           # every 16th page of the region
        samples.append(sample_entropy(plain[first * PAGE_SIZE:], SAMPLE_STRIDE))
        last = off + n == region.nbytes
        begin = carry_room - tail
        end = carry_room + n
        stop = end if last else end - min(keep, n + tail)
        base = region.hpa + off - carry_room            # HPA of buf[0]
        for start, stop_at in pattern.finditer(buf, max(begin, resume), stop, end):
            data = bytes(buf[start:min(stop_at, start + PREVIEW_NBYTES)])
            if not collector.add(region, keyids, base + start, data, stop_at - start):
                _hint(info, samples, threshold)
                return False
            resume = stop_at if pattern.regex else 0
        if not last:
            tail = end - stop
            buf[carry_room - tail:carry_room] = buf[stop:end]
            resume = max(0, resume - (stop - (carry_room - tail))) if resume else 0
    _hint(info, samples, threshold)
    return True


def _hint(info: RegionSearch, samples: list[np.ndarray], threshold: float) -> None:
    ent = np.concatenate(samples) if samples else np.zeros(0, np.float32)
    info.sampled_pages = int(ent.size)
    info.low_entropy_pages = int(np.count_nonzero(ent < threshold))
    info.mean_bits = float(ent.mean()) if ent.size else None
