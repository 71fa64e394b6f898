"""A VM's NVDIMM bound to its media image: ciphertext at rest, plaintext only in QEMU's backend.

The life of one module (:class:`MediaBinding`), driven by :class:`.encrypted.EncryptedMachine`:

1. **before QEMU starts** (:meth:`~MediaBinding.prepare`): the media image is locked (one VM per
   image) and copied, ciphertext as it is, into QEMU's backend, a memfd of this process (never
   in the file system; gone when the VM ends, even by ``kill -9``) while its digests are checked: a tampered or truncated image is refused here, in
   the same pass. A bad path (a directory, a FIFO, ``/dev/zero``, a file that is no media image
   or holds less than its size), an ``hpa=`` overlapping the VM's RAM or another of its NVDIMMs,
   or (``strict``) an ``hpa=`` other than the one the image was written at: one line, and
   nothing started.
2. **bound** (:meth:`~MediaBinding.bind`, QEMU paused): the host model places the module in the
   host physical map (``hpa=``, else where the image was written if free, else the next free
   range) and tags it like RAM; the backend's bytes are what DRAM holds, and the memory
   controller decrypts them (in place) through the VM's KeyID at *this* HPA. At another HPA than the image
   was written at the guest reads garbage, exactly as the talk warns; a warning says so.
3. **written** (:meth:`~MediaBinding.store`, on shutdown, ``dump`` and any flush): the DRAM view
   (AES-XTS under the VM's key, tweak = HPA) replaces the image atomically, with this HPA in its
   header: only its changed units, in place through a redo journal (a writer killed midway is
   completed or undone by the next :meth:`~MediaBinding.prepare`, ``rekey`` or ``show``).
   A module attached at another HPA than its image is *not* written back: its untouched lines
   still hold the old address's ciphertext, and one header can name one address; writing would
   destroy the data that ``nvdimm rekey`` can still recover (a warning says so).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import NvdimmError
from ..engine.xts import XtsKey
from ..keymaterial import key_payload
from ..files.journal import journal_path
from ..files.nvdimmfile import (ALIGN, DIGEST_UNIT, MediaHeader, MediaLock, UnitDigests, check_kind, check_size,
                               read_header, read_media, recover_media, rekey_media, verify_media,
                               write_media)
from ..host.guest import EncryptedGuest
from ..host.host import Host
from ..host.payload import KeyType
from ..host.payload import parse as parse_payload
from ..qemu.devices import split_options
from ..qemu.guestram import GuestRAM
from ..arch.addresses import KeyIdLayout
from ..arch.sizes import parse_size
from ..qemu.nvdimm import NvdimmBackend

log = logging.getLogger(__name__)

Warn = Callable[[str], None]
PHYS_LIMIT = 1 << 52
"""No host physical address reaches this (MAXPHYADDR is at most 52): a larger size or HPA is a typo."""
MAXPHYADDR = 46
"""The emulated platform's MAXPHYADDR (:class:`~qemu_mktme.host.host.Host`'s; a test keeps them equal)."""


def hpa_limit(keyid_bits: int) -> int:
    """The first host physical address past the KeyID-reduced space: MAXPHYADDR minus the KeyID bits."""
    return 1 << KeyIdLayout(maxphyaddr=MAXPHYADDR, keyid_bits=keyid_bits).keyid_shift


@dataclass(frozen=True)
class NvdimmMedia:
    """What ``run --nvdimm PATH[,size=SIZE][,hpa=ADDR]`` asks for."""

    path: Path
    size: int | None = None
    hpa: int | None = None

    @classmethod
    def parse(cls, text: str) -> NvdimmMedia:
        """``PATH[,size=SIZE][,hpa=ADDR]`` (``ValueError`` with one line for anything else)."""
        path, opts = split_options(text, "nvdimm", ("size", "hpa"), "PATH[,size=SIZE][,hpa=ADDR]")
        fields: dict[str, int] = {}
        if "size" in opts:
            fields["size"] = parse_size(opts["size"])
        if "hpa" in opts:
            if not re.fullmatch(r"0[xX][0-9a-fA-F]+|\d+", opts["hpa"]):
                raise ValueError(f"--nvdimm {text}: hpa= must be an address (0x hex or decimal), got {opts['hpa']!r}")
            fields["hpa"] = int(opts["hpa"], 0)
        if "size" in fields and fields["size"] % ALIGN:
            raise ValueError(f"--nvdimm {text}: size must be a multiple of 2 MiB")
        if "hpa" in fields and fields["hpa"] % ALIGN:
            raise ValueError(f"--nvdimm {text}: hpa= must be 2 MiB aligned")
        if fields.get("hpa", 0) + fields.get("size", 0) > PHYS_LIMIT:
            raise ValueError(f"--nvdimm {text}: beyond any host physical address (MAXPHYADDR is at most 52)")
        return cls(Path(path), fields.get("size"), fields.get("hpa"))


class MediaBinding:
    """One NVDIMM of VM ``vm`` and its media image (see the module docstring)."""

    def __init__(self, media: NvdimmMedia, vm: str, *, strict: bool = False, warn: Warn | None = None) -> None:
        self.media = media
        self.vm = vm
        self.strict = strict
        self.warn: Warn = warn or (lambda line: log.warning("%s", line))
        self.header: MediaHeader | None = None        # the image as found (None: a new module)
        self.size = 0
        self.hpa: int | None = None                   # where the module sits once bound
        self.loaded = False                           # the backend holds what the media holds
        self.write_back = False
        self._lock: MediaLock | None = None
        self._index = -1
        self.path = media.path                        # the image's real path (symlinks resolved by prepare)
        self.backend: Path | None = None              # QEMU's backend: /proc/OURPID/fd/N of a memfd
        self.memfd_name = ""
        self._fd = -1
        self._digests: UnitDigests | None = None      # the image's unit digests as read at launch

    @property
    def label(self) -> str:
        return f"{self.vm}: NVDIMM media {self.media.path}"

    def prepare(self, index: int) -> NvdimmBackend:
        """Before QEMU starts: lock the image, copy its ciphertext into a new memfd (the backend:
        never in the file system, gone with the last process that holds it, even after ``kill
        -9``) while checking its digests (one pass), size it; the QEMU backend on that memfd
        (``/proc/OURPID/fd/N``). It holds ciphertext until :meth:`bind` decrypts it in place."""
        path = self.path = Path(os.path.realpath(self.media.path))   # a symlink stays one: its target is written
        self._index = index
        if not path.parent.is_dir():
            raise NvdimmError(f"{self.label}: no directory {path.parent}")
        check_kind(path, self.label)               # (a FIFO, a device: refused before anything is locked)
        self._lock = MediaLock(path, f"VM {self.vm}")
        outcome = recover_media(path)             # a writer was killed: its write is completed or undone
        if outcome is not None:
            self.warn(f"{self.label}: an interrupted write-back was " + (
                "completed from its journal" if outcome == "replayed" else "undone (its journal was incomplete)"))
        if os.path.lexists(path):
            self.header = read_header(path)
            if self.media.size is not None and self.media.size != self.header.size:
                raise NvdimmError(f"{self.label} holds {self.header.size >> 20} MiB, size= asks for "
                                  f"{self.media.size >> 20} MiB: refused (a module does not change size)")
            self.size = self.header.size
            if self.media.hpa is not None and self.media.hpa != self.header.hpa:
                self._misplaced(self.media.hpa)
        else:
            if self.media.size is None:
                raise NvdimmError(f"{self.label} does not exist: give size= to create a new module")
            check_size(self.media.size, self.label)
            self.size = self.media.size
        self.memfd_name = f"qemu-mktme-nvdimm{index}"
        self._fd = os.memfd_create(self.memfd_name, os.MFD_CLOEXEC)   # gone with the last process holding it
        try:
            os.ftruncate(self._fd, self.size)
            if self.header is not None:
                self._digests = UnitDigests()
                with read_media(path, digests=self._digests) as (_header, chunks):
                    for off, data in chunks:           # the digest is checked after the last chunk
                        os.pwrite(self._fd, data.data, off)
        except NvdimmError as err:
            raise NvdimmError(f"{self.label}: {err}") from None
        self.backend = Path(f"/proc/{os.getpid()}/fd/{self._fd}")
        return NvdimmBackend(self.size, path=self.backend)

    def _misplaced(self, hpa: int) -> None:
        assert self.header is not None
        line = (f"{self.label} was written at HPA {self.header.hpa:#x}, attached at {hpa:#x}: AES-XTS takes the "
                "physical address as its tweak, so the guest will read garbage (re-encrypt it first: "
                f"qemu-mktme nvdimm rekey {self.media.path} --to-hpa {hpa:#x} --key ...)")
        if self.strict:
            raise NvdimmError(line.replace(": AES-XTS", ": refused (--nvdimm-strict); AES-XTS", 1))
        self.warn(line)

    def bind(self, host: Host, guest: EncryptedGuest, backend: GuestRAM, hva: int | None) -> None:
        """Place and tag the module, then load the image's ciphertext into its DRAM (QEMU paused)."""
        if len(backend.ranges) != 1:
            raise NvdimmError(f"{self.label}: QEMU maps the module at {backend.map.describe()}, expected one range")
        hpa = self.media.hpa
        if hpa is None and self.header is not None and host.hpa_ranges.is_free(self.header.hpa, self.size):
            hpa = self.header.hpa                      # pinned where it was written
        nv = host.add_nvdimm(guest.name, backend.backend, backend.ranges[0].gpa, hpa=hpa, hva=hva)
        self.hpa = nv.hpa
        key_type = guest.describe_key().get("type")
        if key_type == "cpu":
            self.warn(f"{self.label}: the VM's key is CPU-generated and dies with the VM; what the guest writes "
                      "to this module cannot be read by any later boot (use a tenant key: --key user:KEYHEX:TWEAKHEX)")
        if self.header is None:
            self.loaded = self.write_back = True        # a new module: zeros through the KeyID
            return
        if self.media.hpa is None and nv.hpa != self.header.hpa:
            self._misplaced(nv.hpa)
        guest.load_nvdimm_in_place(nv.index)
        self.loaded = True
        self.write_back = nv.hpa == self.header.hpa

    def store(self, guest: EncryptedGuest, reason: str) -> MediaHeader | None:
        """Write the module's DRAM view to the image (atomically); None when it must not be."""
        if not self.loaded or self._index < 0 or self._index >= len(guest.nvdimms):
            return None
        if not self.write_back:
            assert self.header is not None
            self.warn(f"{self.label}: not written back ({reason}): the module sat at HPA {self.hpa:#x}, its image "
                      f"was written at {self.header.hpa:#x}; the image keeps what it held")
            return None
        nv = guest.nvdimms[self._index]
        previous = self._digests.units if self._digests is not None else None
        units: list[bytes] = []
        header = write_media(self.path, guest.nvdimm_dram(self._index, 4 * DIGEST_UNIT), size=nv.size, hpa=nv.hpa,
                             algorithm=str(guest.describe_key().get("algorithm", "")), keyid=int(guest.keyid),
                             reason=reason, previous=previous, units=units)
        if header is None:
            log.info("%s: unchanged (%s): the image already holds it", self.label, reason)
            return self.header
        self.header = header
        self._digests = UnitDigests()
        self._digests.units = units                     # the next flush compares with this image
        log.info("%s: written (%s) at HPA %#x", self.label, reason, nv.hpa)
        return header

    def release(self) -> None:
        """Drop the backend (after QEMU is gone) and give the image's lock back."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.backend = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def check_placement(bindings: list[MediaBinding], host: Host, ram_hpa: int | None, ram_size: int) -> None:
    """Before QEMU starts: every ``hpa=`` must be free, off the VM's RAM (where it will be placed)
    and off the VM's other NVDIMMs; one ``NvdimmError`` line naming the overlap otherwise."""
    ram = ram_hpa if ram_hpa is not None else host.hpa_ranges.place(ram_size)
    taken: list[tuple[int, int, str]] = [(ram, ram_size, "the VM's RAM")]
    for b in bindings:
        if b.media.hpa is None:
            continue
        start, end = b.media.hpa, b.media.hpa + b.size
        for other, size, what in taken:
            if start < other + size and other < end:
                raise NvdimmError(f"{b.label}: hpa={start:#x}+{b.size:#x} overlaps {what} at {other:#x}+{size:#x}")
        if not host.hpa_ranges.is_free(start, b.size):
            raise NvdimmError(f"{b.label}: hpa={start:#x}+{b.size:#x} {host.hpa_ranges.why_not(start, b.size)}")
        taken.append((start, b.size, f"NVDIMM media {b.media.path}"))


def media_key(spec: str) -> XtsKey:
    """The AES-XTS key of a ``--key`` spec (``user:KEYHEX:TWEAKHEX[:ALG]`` or ``user:@FILE``):
    media is re-encrypted offline, so only a tenant key, never a CPU-generated one, will do."""
    payload_text = key_payload(spec)
    payload = parse_payload(payload_text) if payload_text else None
    if payload is None or payload.type is not KeyType.USER or not payload.key or not payload.tweak:
        raise NvdimmError("an NVDIMM image is re-encrypted with the tenant's key: give --key user:KEYHEX:TWEAKHEX "
                          "or user:@FILE (a CPU-generated key never leaves the CPU)")
    return XtsKey(payload.key, payload.tweak)


def rekey(path: str | os.PathLike[str], key_spec: str, *, to_hpa: int | None = None,
          to_key_spec: str | None = None, keyid_bits: int = 6) -> tuple[MediaHeader, MediaHeader]:
    """``qemu-mktme nvdimm rekey``: re-encrypt the image at ``path`` (not in use by a VM: its lock
    is taken) for HPA ``to_hpa`` and/or the key ``to_key_spec``; (old header, new header). The
    module must end within the host's addresses below its ``keyid_bits`` KeyID bits."""
    if to_hpa is None and to_key_spec is None:
        raise NvdimmError("nvdimm rekey needs --to-hpa ADDR and/or --to-key SPEC")
    if to_hpa is not None and (to_hpa < 0 or to_hpa % ALIGN or to_hpa >= PHYS_LIMIT):
        raise NvdimmError(f"--to-hpa {to_hpa:#x} is not a 2 MiB aligned host physical address")
    check_kind(path, f"NVDIMM media {path}")
    path = os.path.realpath(path)                     # a symlink stays one: its target is re-encrypted
    key = media_key(key_spec)
    to_key = media_key(to_key_spec) if to_key_spec is not None else None
    lock = MediaLock(path, "nvdimm rekey")
    try:
        recover_media(path)
        limit, size = hpa_limit(keyid_bits), read_header(path).size
        if to_hpa is not None and to_hpa + size > limit:
            raise NvdimmError(f"--to-hpa {to_hpa:#x}: the {size >> 20} MiB module would end at {to_hpa + size:#x}, "
                              f"past the host's physical addresses (below {limit:#x}: MAXPHYADDR {MAXPHYADDR} minus "
                              f"{keyid_bits} KeyID bits)")
        return rekey_media(path, key, to_hpa=to_hpa, to_key=to_key)
    finally:
        lock.release()


def describe(path: str | os.PathLike[str]) -> dict[str, object]:
    """``qemu-mktme nvdimm show``: where and how the image was written, once its digests passed."""
    check_kind(path, f"NVDIMM media {path}")
    real, lock = os.path.realpath(path), None
    if journal_path(real).exists():                   # a writer at work, or killed: complete or drop its write
        with contextlib.suppress(NvdimmError):        # (in use by a VM: read it as it is)
            lock = MediaLock(real, "nvdimm show")
    try:
        if lock is not None:
            recover_media(real)
        header = verify_media(path)
    finally:
        if lock is not None:
            lock.release()
    return {"path": str(path), **header.describe(), "digests": "ok (header and body)",
            "plaintext": "none: the body is AES-XTS ciphertext; only this key at this HPA reads it"}
