"""Physical memory with two views: the CPU's (through a KeyID) and DRAM's (what a bus probe sees).

Model decisions, all documented here once:

* **Storage** is sparse: a dict of 4 KiB DRAM pages holding what DRAM holds (ciphertext, or
  plaintext for NO_ENCRYPT / bypass / excluded lines). Untouched DRAM reads as zeros on the DRAM
  side, so a CPU read of an untouched line returns ``decrypt_k(zeros)``: garbage unless k is a
  plaintext KeyID. A 46-bit space costs nothing until touched.
* **CPU accesses** carry the KeyID in the upper bits of the physical address. The engine works on
  whole 64-byte lines: a partial-line write reads the line through the same KeyID, patches it and
  writes it back, as the cache would.
* **Which key**: memory is homed on packages (HPA ranges, default all on package 0); a line is
  encrypted with the key table of its home package. The platform supplies, for a KeyID and an
  HPA range, the segments with their :class:`~.keytable.LineCipher` (``segments``).
* **Attached CPU views** (``attach_cpu_view``): an HPA range backed by an external buffer that
  holds the plaintext *as one KeyID sees it* (a live guest's RAM). Every operation behaves
  exactly as if DRAM held ``encrypt_keyid(buffer)``: DRAM reads encrypt on demand, reads through
  the same KeyID return the buffer's bytes, reads and writes through another KeyID transcode,
  DRAM writes store ``decrypt_keyid(data)``. When the attachment KeyID's cipher changes (PCONFIG,
  activation) the platform calls :meth:`PhysicalMemory.transcode` so the DRAM content is
  unchanged, as on hardware where PCONFIG never touches DRAM.
* **Integrity** (``integrity``, set by ``Platform(integrity="mac")``): a per-line MAC checked on
  CPU reads, see :mod:`.integrity`; ``None`` is MKTME as shipped, no integrity.
* **DIMM map** (``dimm``, :mod:`.dimm`): with an alias bit, two HPAs reach one DRAM cell. The
  storage is by cell; every transform, tag and check uses the address the access gave. Attached
  views stay in the lower half (the cells). With no alias the hot path tests one int.
* **Metadata on the DRAM side**: under a MAC mode the tag (and the owner) of a line are its
  metadata bits (ECC bits on TDX): :meth:`PhysicalMemory.read_dram_line` returns them with the
  ciphertext and ``write_dram(..., meta=)`` writes them back, as an interposer that replays
  data *and* metadata does. Without ``meta`` a DRAM write leaves the metadata as it was.
* **Hiding** (``hiding``, :class:`~.integrity.Hiding`): a read through a shared KeyID (one that
  is not a private, key-programmed one) of a line a private KeyID owns returns fill bytes: TDX's
  TD-owner bit (zeros), SNP's ciphertext hiding (0xFF). Under a MAC mode, only reads through a
  private KeyID are checked (as TDX checks only TD private KeyIDs).
* **Freshness** (``integrity.freshness``): a per-address version in the tweak and the MAC.
  Versions of attached lines advance at each DRAM-side access (model decision: the guest writes
  its RAM unseen, so every DRAM-side read or write of its lines is taken to follow a write-back;
  a line read twice with no store between would give one ciphertext on hardware, two here).
* **Observer** (``observer``): an object told of every CPU read and write (HPA, length, KeyID)
  before it happens, e.g. the KeyID-aliasing sanitizer (:mod:`qemu_mktme.host.sanitizer`).
  ``None`` costs one attribute test per access.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from ..arch.addresses import CACHE_LINE_SIZE, HPA, PAGE_SHIFT, PAGE_SIZE, KeyIdLayout, PhysAddr
from ..errors import AddressError, MachineCheck
from .dimm import DimmAliasError, DimmMap
from .integrity import Hiding, LineIntegrity, Poison
from .keytable import LineCipher, XtsLineCipher
from .xts import BytesLike, decrypt_units, encrypt_units

U8Array = npt.NDArray[np.uint8]
Segments = Callable[[int, int, int], list[tuple[int, int, LineCipher]]]
"""segments(keyid, start_hpa, end_hpa) -> [(start, end, cipher)] covering the range."""

_LINE = CACHE_LINE_SIZE
_TRANSCODE_NBYTES = 4 << 20


@dataclass(frozen=True)
class Attachment:
    """An HPA range backed by an external plaintext buffer seen through ``keyid``."""

    hpa: int
    buffer: U8Array
    keyid: int

    @property
    def end(self) -> int:
        return self.hpa + self.buffer.size

    def __repr__(self) -> str:
        return f"Attachment(hpa={self.hpa:#x}, nbytes={self.buffer.size:#x}, keyid={self.keyid})"


@dataclass(frozen=True)
class LineMeta:
    """The metadata bits of one DRAM line under a MAC mode: its tag and its owner."""

    tag: int | None
    owner: int | None = None


class MemoryObserver(Protocol):
    """Told of each CPU access before it happens (see the module docstring)."""

    def cpu_read(self, hpa: int, nbytes: int, keyid: int) -> None: ...

    def cpu_write(self, hpa: int, nbytes: int, keyid: int) -> None: ...


def _u8(data: BytesLike, name: str) -> U8Array:
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError, BufferError) as err:
        raise TypeError(f"{name} must be bytes-like or a numpy array") from err


class PhysicalMemory:
    """The platform's physical memory; see the module docstring for the model."""

    def __init__(self, layout: Callable[[], KeyIdLayout], segments: Segments,
                 private: Callable[[int], bool] | None = None) -> None:
        self._layout = layout
        self._segments = segments
        self._private: Callable[[int], bool] = private or (lambda keyid: keyid != 0)
        self.hiding: Hiding | None = None
        self._owners: dict[int, int] = {}        # line -> KeyID that last wrote it (under hiding)
        self.dimm = DimmMap()
        self._alias_mask = 0
        self._pages: dict[int, U8Array] = {}
        self._attachments: list[Attachment] = []
        self.integrity: LineIntegrity | None = None
        self.observer: MemoryObserver | None = None
        self.observer_listeners: list[Callable[[], None]] = []
        """Called when an observer is installed (a DMA fast path, such as the vhost dataplane's
        IOTLB mirror, stops using what the observer must see)."""

    def __repr__(self) -> str:
        return f"PhysicalMemory({len(self._pages)} pages touched, {len(self._attachments)} attachments)"

    @property
    def touched_pages(self) -> int:
        """How many 4 KiB DRAM pages hold storage (attachments not counted)."""
        return len(self._pages)

    # --- addresses ----------------------------------------------------------------------------

    def _split(self, pa: int, nbytes: int) -> tuple[int, int]:
        layout = self._layout()
        if not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"nbytes must be a non-negative int, got {nbytes!r}")
        if pa < 0 or pa >> layout.maxphyaddr:
            raise AddressError(f"physical address {pa:#x} exceeds MAXPHYADDR {layout.maxphyaddr}", address=pa, nbytes=nbytes)
        hpa, keyid = layout.split(PhysAddr(pa))
        self._check_hpa(hpa, nbytes)
        return hpa, keyid

    def _check_hpa(self, hpa: int, nbytes: int) -> None:
        limit = 1 << self._layout().keyid_shift
        if hpa < 0 or hpa + nbytes > limit:
            raise AddressError(f"range {hpa:#x}+{nbytes:#x} leaves the {limit:#x}-byte physical space", address=hpa, nbytes=nbytes)

    # --- raw DRAM storage -----------------------------------------------------------------------

    def _gather(self, start: int, end: int, out: U8Array) -> None:
        pos = start
        while pos < end:
            page, off = pos >> PAGE_SHIFT, pos & (PAGE_SIZE - 1)
            n = min(PAGE_SIZE - off, end - pos)
            stored = self._pages.get(page)
            dst = out[pos - start : pos - start + n]
            if stored is None:
                dst.fill(0)
            else:
                np.copyto(dst, stored[off : off + n])
            pos += n

    def _scatter(self, start: int, data: U8Array) -> None:
        pos, end = start, start + data.size
        while pos < end:
            page, off = pos >> PAGE_SHIFT, pos & (PAGE_SIZE - 1)
            n = min(PAGE_SIZE - off, end - pos)
            stored = self._pages.get(page)
            if stored is None:
                stored = self._pages[page] = np.zeros(PAGE_SIZE, np.uint8)
            np.copyto(stored[off : off + n], data[pos - start : pos - start + n])
            pos += n

    def _pieces(self, start: int, end: int) -> Iterator[tuple[int, int, Attachment | None]]:
        pos = start
        for att in self._attachments:
            if att.end <= pos or att.hpa >= end:
                continue
            if att.hpa > pos:
                yield pos, att.hpa, None
            yield max(pos, att.hpa), min(end, att.end), att
            pos = min(end, att.end)
        if pos < end:
            yield pos, end, None

    # --- the engine -----------------------------------------------------------------------------

    def _transform(self, segs: list[tuple[int, int, LineCipher]], base: int, src: U8Array, out: U8Array, encrypt: bool) -> None:
        integ = self.integrity
        if integ is not None and integ.freshness is not None:
            self._transform_versioned(integ, segs, base, src, out, encrypt)
            return
        for s, e, cipher in segs:
            a, b = s - base, e - base
            (cipher.encrypt if encrypt else cipher.decrypt)(src[a:b], s, out[a:b])

    def _version(self, hpa: int) -> int:
        """Freshness: the version of the line at address ``hpa`` (0 without freshness): its own
        once the CPU wrote it through the engine, else the attached lines' epoch, else 0."""
        integ = self.integrity
        if integ is None or integ.freshness is None:
            return 0
        version = integ.versions.get(hpa)
        if version is not None:
            return version
        return integ.epoch if any(a.hpa <= hpa < a.end for a in self._attachments) else 0

    def _transform_versioned(self, integ: LineIntegrity, segs: list[tuple[int, int, LineCipher]], base: int,
                             src: U8Array, out: U8Array, encrypt: bool) -> None:
        """Freshness: each line's tweak is ``HPA || version`` (16 bytes little-endian); version 0
        is MKTME's tweak."""
        for s, e, cipher in segs:
            a, b = s - base, e - base
            if not isinstance(cipher, XtsLineCipher):
                (cipher.encrypt if encrypt else cipher.decrypt)(src[a:b], s, out[a:b])
                continue
            n = (e - s) // _LINE
            tweaks = np.zeros((n, 2), np.uint64)
            tweaks[:, 0] = np.arange(s, e, _LINE, dtype=np.uint64)
            for ps, pe, att in self._pieces(s, e):
                if att is not None:
                    tweaks[(ps - s) // _LINE : (pe - s) // _LINE, 1] = integ.epoch
            versions = integ.versions
            if n <= len(versions):
                for i, h in enumerate(range(s, e, _LINE)):
                    v = versions.get(h)
                    if v is not None:
                        tweaks[i, 1] = v
            else:
                for h, v in versions.items():
                    if s <= h < e:
                        tweaks[(h - s) // _LINE, 1] = v
            (encrypt_units if encrypt else decrypt_units)(cipher.key, src[a:b], tweaks.view(np.uint8), _LINE, out=out[a:b])

    def _same(self, keyid: int, att: Attachment, start: int, end: int) -> bool:
        if keyid == att.keyid:
            return True
        mine, theirs = self._segments(keyid, start, end), self._segments(att.keyid, start, end)
        return len(mine) == len(theirs) and all(
            x[0] == y[0] and x[1] == y[1] and x[2] is y[2] for x, y in zip(mine, theirs)
        )

    def _dram_lines(self, start: int, end: int, out: U8Array) -> None:
        """DRAM content of whole lines [start, end)."""
        for s, e, att in self._pieces(start, end):
            dst = out[s - start : e - start]
            if att is None:
                self._gather(s, e, dst)
            else:
                src = att.buffer[s - att.hpa : e - att.hpa]
                self._transform(self._segments(att.keyid, s, e), s, src, dst, True)
                if self.integrity is not None and self.integrity.dram:
                    for line, cipher_text in self.integrity.dram.items():
                        if s <= line < e:
                            dst[line - s : line - s + _LINE] = np.frombuffer(cipher_text, np.uint8)

    def _store_dram_lines(self, start: int, data: U8Array) -> None:
        end = start + data.size
        for s, e, att in self._pieces(start, end):
            src = data[s - start : e - start]
            if att is None:
                self._scatter(s, src)
            else:
                dst = att.buffer[s - att.hpa : e - att.hpa]
                self._transform(self._segments(att.keyid, s, e), s, src, dst, False)

    def _cpu_read_lines(self, keyid: int, start: int, end: int, out: U8Array) -> None:
        if self.integrity is not None:
            self._check_integrity(keyid, start, end)
        for s, e, att in self._pieces(start, end):
            dst = out[s - start : e - start]
            if att is not None and self._same(keyid, att, s, e):
                np.copyto(dst, att.buffer[s - att.hpa : e - att.hpa])
                continue
            self._dram_lines(s, e, dst)
            self._transform(self._segments(keyid, s, e), s, dst, dst, False)

    def _cpu_write_lines(self, keyid: int, start: int, data: U8Array) -> None:
        end = start + data.size
        for s, e, att in self._pieces(start, end):
            src = data[s - start : e - start]
            if att is not None and self._same(keyid, att, s, e):
                np.copyto(att.buffer[s - att.hpa : e - att.hpa], src)
                continue
            if self.integrity is not None and self.integrity.freshness is not None:
                for line in range(s, e, _LINE):
                    self.integrity.bump(line, self._version(line))
            if self.hiding is not None and att is None:
                self._owners.update(dict.fromkeys(range(s, e, _LINE), keyid))
            cipher_text = np.empty(e - s, np.uint8)
            self._transform(self._segments(keyid, s, e), s, src, cipher_text, True)
            self._store_dram_lines(s, cipher_text)
            if self.integrity is not None:
                self._tag_lines(keyid, s, cipher_text, att)
        if self.integrity is not None:
            for s, e, att in self._pieces(start, end):
                if att is not None and self._same(keyid, att, s, e):
                    self.integrity.forget(s, e)

    # --- integrity (see .integrity) -------------------------------------------------------------

    def _tag_lines(self, keyid: int, start: int, cipher_text: U8Array, att: Attachment | None) -> None:
        """A CPU write through ``keyid`` stored ``cipher_text``: tag each line; on an attached view
        of another KeyID the line now fails that KeyID's check (the guest will consume poison)."""
        integ = self.integrity
        assert integ is not None
        for i in range(0, cipher_text.size, _LINE):
            integ.store(keyid, start + i, cipher_text[i : i + _LINE].tobytes(), self._version(start + i))
            if att is not None:
                integ.notify(Poison(start + i, att.keyid, "foreign-write"))

    def _check_integrity(self, keyid: int, start: int, end: int) -> None:
        """Raise ``MachineCheck`` if a line of [start, end) read through ``keyid`` fails its MAC."""
        integ = self.integrity
        assert integ is not None
        if not self._private(keyid):
            return                 # shared KeyIDs carry no integrity (TDX checks TD private KeyIDs)
        line = np.empty(_LINE, np.uint8)
        for s, e, att in self._pieces(start, end):
            foreign = att is not None and not self._same(keyid, att, s, e)
            for hpa in range(s, e, _LINE) if foreign else integ.explicit(s, e):
                if not foreign and integ.verified.get(hpa) == keyid:
                    continue
                stored = integ.tags.get(hpa)
                self._dram_lines(hpa, hpa + _LINE, line)
                version = self._version(hpa)
                if stored is None:
                    assert att is not None
                    stored = integ.tag(att.keyid, hpa, line.tobytes(), version)
                if not integ.check(keyid, hpa, line.tobytes(), stored, version):
                    raise MachineCheck(f"integrity check failed on line {hpa:#x} read through KeyID {keyid}: "
                                       f"poisoned", hpa=hpa, keyid=keyid)

    def _meta_of(self, cell: int, cipher_text: bytes) -> LineMeta:
        """The metadata bits of the line at ``cell`` holding ``cipher_text`` (MAC modes)."""
        integ = self.integrity
        assert integ is not None
        tag = integ.tags.get(cell)
        att = self._attachment_at(cell)
        if tag is None and att is not None:
            tag = integ.tag(att.keyid, cell, cipher_text, self._version(cell))
        return LineMeta(tag, self._owner(cell))

    def _write_dram_checked(self, start: int, lines: U8Array, meta: LineMeta | None = None) -> None:
        """write_dram under integrity. Without ``meta`` the tags stay as the controller last
        wrote them; with it (one line) the line's metadata bits are written too. A line that
        passes its tag is what the controller will return: an attached line's buffer gets its
        plaintext. One that fails keeps its buffer (the CPU never gets tampered data), its DRAM
        content is kept aside and it is reported poisoned."""
        integ = self.integrity
        assert integ is not None
        old = np.empty(_LINE, np.uint8)
        for s, e, att in self._pieces(start, start + lines.size):
            if att is None:
                self._store_dram_lines(s, lines[s - start : e - start])
                for hpa in range(s, e, _LINE):
                    integ.tampered(hpa)
                    if meta is not None and meta.tag is not None:
                        integ.tags[hpa] = meta.tag
                    if meta is not None and meta.owner is not None and self.hiding is not None:
                        self._owners[hpa] = meta.owner
                continue
            for hpa in range(s, e, _LINE):
                new = lines[hpa - start : hpa - start + _LINE]
                version = self._version(hpa)
                stored = meta.tag if meta is not None and meta.tag is not None else integ.tags.get(hpa)
                if stored is None:
                    self._dram_lines(hpa, hpa + _LINE, old)
                    stored = integ.tag(att.keyid, hpa, old.tobytes(), version)
                if integ.tag(att.keyid, hpa, new.tobytes(), version) == stored:
                    self._store_dram_lines(hpa, new)
                    integ.forget(hpa, hpa + _LINE)             # a consistent line: implicit again
                    continue
                integ.tags[hpa] = stored
                integ.dram[hpa] = new.tobytes()
                integ.tampered(hpa)
                integ.notify(Poison(hpa, att.keyid, "dram-write"))

    # --- ownership (hiding) and the DIMM alias ---------------------------------------------------

    def _attachment_at(self, hpa: int) -> Attachment | None:
        for att in self._attachments:
            if att.hpa <= hpa < att.end:
                return att
        return None

    def _owner(self, cell: int) -> int | None:
        """The KeyID that owns the line at ``cell``: an attached view's, or the last writer's."""
        att = self._attachment_at(cell)
        return att.keyid if att is not None else self._owners.get(cell)

    def _hide(self, keyid: int, start: int, out: U8Array) -> None:
        """Hiding: lines of cells [start, start + out.size) that a private KeyID other than the
        shared reader ``keyid`` owns read as fill bytes."""
        hiding = self.hiding
        assert hiding is not None
        if self._private(keyid):
            return
        for line in range(start, start + out.size, _LINE):
            owner = self._owner(line)
            if owner is not None and owner != keyid and self._private(owner):
                out[line - start : line - start + _LINE] = hiding.fill

    def set_dimm(self, dimm: DimmMap) -> None:
        """Install the address decoding (at boot: BadRAM's SPD; at run time: Battering RAM's
        interposer). ``DimmAliasError`` if an attached view lies in, or reaches into, the ghost
        half: the model keeps attached views where the cells are."""
        for att in self._attachments:
            if any(addr != cell for addr, cell, _ in dimm.pieces(att.hpa, att.end - att.hpa)):
                raise DimmAliasError(f"{att!r} lies in the ghost half of alias bit {dimm.alias_bit}: "
                                     "attached views must stay below it")
        self.dimm = dimm
        self._alias_mask = dimm.mask

    def _ghost(self, hpa: int, nbytes: int) -> bool:
        """Whether [hpa, hpa + nbytes) reaches a cell through another address (alias on)."""
        return any(a != c for a, c, _ in self.dimm.pieces(hpa, nbytes))

    def _observe(self, start: int, end: int) -> None:
        """A DRAM-side read of cells [start, end): under freshness, attached lines were written
        back before it (see the module docstring); counted."""
        integ = self.integrity
        if integ is None or integ.freshness is None:
            return
        for s, e, att in self._pieces(start, end):
            if att is not None:
                integ.observed()
                integ.freshness.access_lines(s, (e - s) // _LINE, True)

    def _read_cells(self, keyid: int, a0: int, a1: int, out: U8Array) -> None:
        """A CPU read of whole lines [a0, a1) through ``keyid`` where some address reaches its
        cell through the alias: the cell's DRAM content, checked and decrypted with each
        access's own address (tweak, MAC, version)."""
        integ = self.integrity
        for addr, cell, n in self.dimm.pieces(a0, a1 - a0):
            dst = out[addr - a0 : addr - a0 + n]
            self._observe(cell, cell + n)
            self._dram_lines(cell, cell + n, dst)
            if integ is not None and self._private(keyid):
                for i in range(0, n, _LINE):
                    ct = dst[i : i + _LINE].tobytes()
                    stored = self._meta_of(cell + i, ct).tag
                    if stored is None or not integ.check(keyid, addr + i, ct, stored, self._version(addr + i)):
                        raise MachineCheck(f"integrity check failed on line {addr + i:#x} (DRAM cell {cell + i:#x}) "
                                           f"read through KeyID {keyid}: poisoned", hpa=addr + i, keyid=keyid)
            self._transform(self._segments(keyid, addr, addr + n), addr, dst, dst, False)
            if self.hiding is not None:
                self._hide(keyid, cell, dst)

    def _write_cells(self, keyid: int, start: int, lines: U8Array) -> None:
        """A CPU write of whole lines through ``keyid`` at addresses reaching cells through the
        alias: encrypted (tweak, version, MAC) with each address given, stored in the cell. An
        attached cell gets the line's plaintext under its own KeyID; under a MAC mode its tag is
        now the writer's, so the attached view's next read is poison."""
        integ = self.integrity
        cipher_text = np.empty(lines.size, np.uint8)
        for addr, cell, n in self.dimm.pieces(start, lines.size):
            a = addr - start
            if integ is not None and integ.freshness is not None:
                for i in range(0, n, _LINE):
                    integ.bump(addr + i, self._version(addr + i))
                integ.freshness.access_lines(addr, n // _LINE, True)
            self._transform(self._segments(keyid, addr, addr + n), addr, lines[a : a + n], cipher_text[a : a + n], True)
            if self.hiding is not None:
                self._owners.update(dict.fromkeys(range(cell, cell + n, _LINE), keyid))
            if integ is None:
                self._store_dram_lines(cell, cipher_text[a : a + n])
                continue
            for i in range(0, n, _LINE):
                ct = cipher_text[a + i : a + i + _LINE]
                att = self._attachment_at(cell + i)
                integ.tags[cell + i] = integ.tag(keyid, addr + i, ct.tobytes(), self._version(addr + i))
                integ.tampered(cell + i)
                if att is None:
                    self._store_dram_lines(cell + i, ct)
                else:
                    integ.dram[cell + i] = ct.tobytes()
                    integ.notify(Poison(cell + i, att.keyid, "alias-write"))

    @staticmethod
    def _line_bounds(hpa: int, nbytes: int) -> tuple[int, int]:
        return hpa - hpa % _LINE, -(-(hpa + nbytes) // _LINE) * _LINE

    def _patched(self, hpa: int, data: U8Array, read_lines: Callable[[int, int, U8Array], None]) -> tuple[int, U8Array]:
        """Whole lines covering [hpa, hpa+len(data)) with data written over them (read-modify-write)."""
        a0, a1 = self._line_bounds(hpa, data.size)
        if a0 == hpa and a1 == hpa + data.size:
            return a0, data
        buf = np.empty(a1 - a0, np.uint8)
        read_lines(a0, a0 + _LINE, buf[:_LINE])
        if a1 - _LINE > a0:
            read_lines(a1 - _LINE, a1, buf[-_LINE:])
        buf[hpa - a0 : hpa - a0 + data.size] = data
        return a0, buf

    def _count_fresh(self, keyid: int, hpa: int, nbytes: int, write: bool) -> None:
        """Freshness: the counter tree's extra accesses of a CPU access through a private KeyID."""
        integ = self.integrity
        if integ is not None and integ.freshness is not None and self._private(keyid):
            a0, a1 = self._line_bounds(hpa, nbytes)
            integ.freshness.access_lines(a0, (a1 - a0) // _LINE, write)

    # --- public CPU side ------------------------------------------------------------------------

    def read_array(self, pa: int, nbytes: int) -> U8Array:
        """CPU read of ``nbytes`` at physical address ``pa`` (KeyID in its upper bits).

        Returns a read-only array; when the whole range lies in an attachment of the same KeyID
        it is a zero-copy view of the attached buffer (it changes when the buffer does).
        """
        hpa, keyid = self._split(pa, nbytes)
        if self.observer is not None:
            self.observer.cpu_read(hpa, nbytes, keyid)
        if self._alias_mask and self._ghost(hpa, nbytes):
            a0, a1 = self._line_bounds(hpa, nbytes)
            buf = np.empty(a1 - a0, np.uint8)
            self._count_fresh(keyid, hpa, nbytes, False)
            self._read_cells(keyid, a0, a1, buf)
            out = buf[hpa - a0 : hpa - a0 + nbytes]
            out.flags.writeable = False
            return out
        if self.integrity is not None:
            if self.integrity.tags or self.integrity.dram:
                a0, a1 = self._line_bounds(hpa, nbytes)
                self._check_integrity(keyid, a0, a1)
            if self.integrity.freshness is not None:
                self._count_fresh(keyid, hpa, nbytes, False)
        for att in self._attachments:
            if att.keyid == keyid and att.hpa <= hpa and hpa + nbytes <= att.end:
                view = att.buffer[hpa - att.hpa : hpa - att.hpa + nbytes].view()
                view.flags.writeable = False
                return view
        a0, a1 = self._line_bounds(hpa, nbytes)
        buf = np.empty(a1 - a0, np.uint8)
        self._cpu_read_lines(keyid, a0, a1, buf)
        if self.hiding is not None:
            self._hide(keyid, a0, buf)
        out = buf[hpa - a0 : hpa - a0 + nbytes]
        out.flags.writeable = False
        return out

    def cpu_window(self, hpa: int, keyid: int, nbytes: int) -> U8Array | None:
        """A writable view of ``[hpa, hpa + nbytes)`` when an attachment of the same ``keyid``
        holds all of it: through the owner's KeyID the memory controller's encryption and
        decryption cancel out, so a CPU (or DMA) access is a plain copy there. ``None`` otherwise
        (another KeyID, or unattached DRAM): use :meth:`read` / :meth:`write`."""
        for att in self._attachments:
            if att.keyid == keyid and att.hpa <= hpa and hpa + nbytes <= att.end:
                return att.buffer[hpa - att.hpa : hpa - att.hpa + nbytes]
        return None

    def read(self, pa: int, nbytes: int) -> bytes:
        """CPU read, as bytes."""
        return self.read_array(pa, nbytes).tobytes()

    def write(self, pa: int, data: BytesLike) -> None:
        """CPU write through the KeyID in ``pa``: DRAM gets ``encrypt_keyid(lines)``."""
        src = _u8(data, "data")
        hpa, keyid = self._split(pa, src.size)
        if src.size == 0:
            return
        if self.observer is not None:
            self.observer.cpu_write(hpa, src.size, keyid)
        if self._alias_mask and self._ghost(hpa, src.size):
            start, lines = self._patched(hpa, src, lambda s, e, o: self._read_cells(keyid, s, e, o))
            self._write_cells(keyid, start, lines)
            return
        start, lines = self._patched(hpa, src, lambda s, e, o: self._cpu_read_lines(keyid, s, e, o))
        if self.integrity is not None and self.integrity.freshness is not None:
            self._count_fresh(keyid, start, lines.size, True)
        self._cpu_write_lines(keyid, start, lines)

    def read_qword(self, pa: int) -> int:
        """An 8-byte little-endian CPU read (what page walks use)."""
        return int.from_bytes(self.read_array(pa, 8).tobytes(), "little")

    def write_qword(self, pa: int, value: int) -> None:
        if not 0 <= value < 1 << 64:
            raise ValueError(f"value {value:#x} is not a 64-bit unsigned integer")
        self.write(pa, value.to_bytes(8, "little"))

    # --- public DRAM side -----------------------------------------------------------------------

    def _cell_range(self, hpa: int, nbytes: int) -> int:
        """The cell of a DRAM-side access (the bus drives the cell's row and column): one piece."""
        if not self._alias_mask:
            return hpa
        pieces = self.dimm.pieces(hpa, nbytes)
        if len(pieces) != 1:
            raise AddressError(f"DRAM range {hpa:#x}+{nbytes:#x} crosses the alias bit's boundary", address=hpa, nbytes=nbytes)
        return pieces[0][1]

    def read_dram_array(self, hpa: HPA | int, nbytes: int, *, out: U8Array | None = None) -> U8Array:
        """What DRAM holds at ``hpa`` (no KeyID bits): what a bus probe sees.

        ``out`` (line-aligned ranges only) receives the bytes without allocating: reuse one
        buffer when streaming a large range, since first-touch page faults of a fresh buffer
        cost more than the encryption on some hosts.
        """
        self._check_hpa(hpa, nbytes)
        hpa = self._cell_range(int(hpa), nbytes)
        a0, a1 = self._line_bounds(hpa, nbytes)
        self._observe(a0, a1)
        if out is not None:
            if (a0, a1) != (hpa, hpa + nbytes) or out.dtype != np.uint8 or out.size != nbytes:
                raise ValueError("out= needs a line-aligned range and a uint8 array of exactly nbytes")
            self._dram_lines(a0, a1, out)
            return out
        buf = np.empty(a1 - a0, np.uint8)
        self._dram_lines(a0, a1, buf)
        return buf[hpa - a0 : hpa - a0 + nbytes]

    def read_dram_line(self, hpa: HPA | int) -> tuple[bytes, LineMeta]:
        """One 64-byte line as an interposer on the data *and* metadata (ECC) pins reads it:
        the ciphertext and, under a MAC mode, its tag and owner (``LineMeta(None)`` otherwise)."""
        if hpa % _LINE:
            raise ValueError(f"read_dram_line needs a line-aligned address, got {hpa:#x}")
        cipher_text = self.read_dram(hpa, _LINE)
        if self.integrity is None:
            return cipher_text, LineMeta(None)
        return cipher_text, self._meta_of(self._cell_range(int(hpa), _LINE), cipher_text)

    def dram_image(self, keyid: int, hpa: HPA | int, plaintext: BytesLike, *, out: U8Array | None = None) -> U8Array:
        """What DRAM would hold if the CPU wrote ``plaintext`` (whole lines) at ``hpa`` through
        ``keyid``. Stores nothing: for ranges known to be zero (never-written guest RAM) a dump
        can compute their ciphertext without touching, and so allocating, the guest's memory."""
        src = _u8(plaintext, "plaintext")
        self._check_hpa(hpa, src.size)
        if hpa % _LINE or src.size % _LINE:
            raise ValueError("dram_image works on whole 64-byte lines")
        if not 0 <= keyid <= self._layout().max_keyid:
            raise ValueError(f"keyid {keyid} outside 0..{self._layout().max_keyid}")
        dst = np.empty(src.size, np.uint8) if out is None else out
        if dst.size != src.size:
            raise ValueError("out must be as long as plaintext")
        self._transform(self._segments(keyid, int(hpa), int(hpa) + src.size), int(hpa), src, dst, True)
        return dst

    def read_dram(self, hpa: HPA | int, nbytes: int) -> bytes:
        return self.read_dram_array(hpa, nbytes).tobytes()

    def write_dram(self, hpa: HPA | int, data: BytesLike, *, meta: LineMeta | None = None) -> None:
        """Store raw bytes in DRAM (a physical attacker writing, or replaying, ciphertext).

        ``meta`` (one whole line only, under a MAC mode): the line's metadata bits are written
        too, as an interposer replaying data and metadata together does."""
        src = _u8(data, "data")
        self._check_hpa(hpa, src.size)
        if src.size == 0:
            return
        if meta is not None and (hpa % _LINE or src.size != _LINE):
            raise ValueError("write_dram(meta=...) writes exactly one whole line")
        hpa = self._cell_range(int(hpa), src.size)
        start, lines = self._patched(hpa, src, self._dram_lines)
        self._observe(start, start + lines.size)           # freshness: the guest wrote back since
        if self.integrity is not None:
            self._write_dram_checked(start, lines, meta)
        else:
            self._store_dram_lines(start, lines)

    # --- attachments ----------------------------------------------------------------------------

    def attach_cpu_view(self, hpa: HPA | int, buffer: Any, keyid: int) -> Attachment:
        """Back [hpa, hpa+len(buffer)) with ``buffer``, the plaintext as ``keyid`` sees it.

        ``buffer`` is a writable, C-contiguous numpy array or writable buffer (e.g. a memoryview
        over an mmap of guest RAM). ``hpa`` and the length must be 4 KiB aligned. Whatever DRAM
        held in the range before is replaced by ``encrypt_keyid(buffer)``. Raises ``AddressError``
        for a range outside physical memory or overlapping another attachment, ``ValueError`` for
        a bad buffer, alignment or KeyID.
        """
        arr = buffer if isinstance(buffer, np.ndarray) else np.frombuffer(buffer, dtype=np.uint8)
        if not arr.flags.c_contiguous or not arr.flags.writeable:
            raise ValueError("buffer must be C-contiguous and writable")
        arr = arr.reshape(-1).view(np.uint8)
        if hpa % PAGE_SIZE or arr.size % PAGE_SIZE or arr.size == 0:
            raise ValueError(f"attachment must be whole 4 KiB pages at a 4 KiB-aligned hpa, got {hpa:#x}+{arr.size:#x}")
        layout = self._layout()
        if not 0 <= keyid <= layout.max_keyid:
            raise ValueError(f"keyid {keyid} outside 0..{layout.max_keyid} for the current activation")
        self._check_hpa(hpa, arr.size)
        if self._alias_mask and self._ghost(int(hpa), arr.size):
            raise AddressError(f"attachment at {hpa:#x}+{arr.size:#x} lies in the ghost half of DIMM alias bit "
                               f"{self.dimm.alias_bit}: attached views must stay where the cells are",
                               address=int(hpa), nbytes=arr.size)
        for other in self._attachments:
            if other.hpa < hpa + arr.size and hpa < other.end:
                raise AddressError(f"attachment at {hpa:#x}+{arr.size:#x} overlaps {other!r}", address=hpa, nbytes=arr.size)
        for page in range(hpa >> PAGE_SHIFT, (hpa + arr.size) >> PAGE_SHIFT):
            self._pages.pop(page, None)
        if self.integrity is not None:
            self.integrity.forget(int(hpa), int(hpa) + arr.size)
        att = Attachment(int(hpa), arr, keyid)
        self._attachments.append(att)
        self._attachments.sort(key=lambda a: a.hpa)
        return att

    def detach_cpu_view(self, hpa: HPA | int) -> Attachment:
        """Remove the attachment starting at ``hpa``. The range then reads as untouched DRAM
        (zeros); the buffer keeps its content. Raises ``AddressError`` if none starts there."""
        for i, att in enumerate(self._attachments):
            if att.hpa == hpa:
                if self.integrity is not None:
                    self.integrity.forget(att.hpa, att.end)
                return self._attachments.pop(i)
        raise AddressError(f"no CPU view attached at {hpa:#x}", address=int(hpa))

    @property
    def attachments(self) -> tuple[Attachment, ...]:
        return tuple(self._attachments)

    def transcode(self, old: Segments, new: Segments) -> None:
        """Keep DRAM content unchanged across a cipher change: re-express every attached buffer
        whose KeyID's ciphers differ between ``old`` and ``new``."""
        for att in self._attachments:
            for s in range(att.hpa, att.end, _TRANSCODE_NBYTES):
                e = min(att.end, s + _TRANSCODE_NBYTES)
                before, after = old(att.keyid, s, e), new(att.keyid, s, e)
                if len(before) == len(after) and all(
                    x[0] == y[0] and x[1] == y[1] and x[2] is y[2] for x, y in zip(before, after)
                ):
                    continue
                chunk = att.buffer[s - att.hpa : e - att.hpa]
                self._transform(before, s, chunk, chunk, True)
                self._transform(after, s, chunk, chunk, False)
