"""The encrypted snapshot container: one file, written atomically, every byte authenticated.

Layout, format version 2 (integers little-endian)::

    "QMKTSNAP" | u32 version | 32-byte KDF salt | 16-byte snapshot id     header, 60 bytes
    chunk 0 | chunk 1 | ...        guest RAM: AES-256-GCM ciphertext + 16-byte tag each
    device state                   AES-256-GCM ciphertext + tag
    manifest                       AES-256-GCM ciphertext of JSON (UTF-8), its tag in the trailer
    u64 manifest offset | u64 manifest length | 16-byte manifest tag | "QMKTEND\\0"   trailer

Sections follow each other with no gap: a chunk's place in the file is implied by the chunk
lengths before it (the file stores no offsets but the trailer's), and the manifest must start
exactly where the device state ends. Keys come from the user's key-encryption key (KEK, 32
bytes) through HKDF-SHA256 with the header's random salt, bound to the snapshot id: one key
for RAM, one for the metadata, one for wrapping the VM key. What each tag covers:

- the manifest tag: the manifest's exact stored bytes, the whole header (magic, version, salt,
  id) and the trailer's offset and length. The manifest is decrypted (authenticated) before
  any of it is parsed; JSON with a duplicated key is refused.
- a chunk's tag: its bytes, the snapshot id, its index, guest RAM offset and length (nonce =
  its index, unique under a key that is unique to the snapshot), so reordered, substituted,
  truncated or foreign chunks fail; the manifest lists every chunk (RAM offset, length).
- the device state's tag: its bytes and the snapshot id. The end magic is a constant.

A chunk's plaintext is the **DRAM image** of that part of guest RAM (AES-XTS under the VM key,
tweak = the line's HPA at save time), so restore rebuilds what the memory bus carried; the file
holds it re-encrypted under the per-snapshot RAM key, so two snapshots share no bytes even of
unchanged RAM, and the file does not show which 16-byte blocks changed between two saves.

What a reader without the KEK learns: the file size (so, since all-zero 1 MiB chunks are not
stored, how many chunks are not all zero, to within the few hundred KiB of device state), the
format version, and the manifest's length. Not which chunks are zero, nor any name or setting
of the VM: the manifest is sealed.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Self

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import IntegrityError, SnapshotError
from ..keymaterial import check_kek
from .regular import open_regular

MAGIC = b"QMKTSNAP"
END_MAGIC = b"QMKTEND\0"
VERSION = 2
HEADER = struct.Struct("<8sI32s16s")        # magic, version, salt, snapshot id
TRAILER = struct.Struct("<QQ16s8s")
TAG_NBYTES = 16
MAX_MANIFEST_NBYTES = 64 << 20
_INFO = b"qemu-mktme snapshot v2 "
_V1_HEADER_NBYTES = 12


class Keys:
    """The per-snapshot keys derived from the KEK, the salt and the snapshot id."""

    def __init__(self, kek: bytes, salt: bytes, snapshot_id: bytes) -> None:
        check_kek(kek)

        def derive(purpose: bytes) -> AESGCM:
            return AESGCM(HKDF(hashes.SHA256(), 32, salt, _INFO + purpose + snapshot_id).derive(kek))

        self.ram = derive(b"ram")          # chunks
        self.meta = derive(b"meta")        # manifest, device state
        self.wrap = derive(b"wrap")        # the VM key


def chunk_nonce(index: int) -> bytes:
    return b"C" + index.to_bytes(11, "little")


def chunk_aad(snapshot_id: bytes, index: int, offset: int, nbytes: int) -> bytes:
    return b"chunk" + snapshot_id + struct.pack("<QQQ", index, offset, nbytes)


def manifest_aad(header: bytes, m_off: int, m_len: int) -> bytes:
    return b"manifest" + header + struct.pack("<QQ", m_off, m_len)


MANIFEST_NONCE = b"M" + bytes(11)
DEVICE_NONCE = b"D" + bytes(11)
WRAP_NONCE = b"W" + bytes(11)


def canonical(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def parse_manifest(raw: bytes) -> dict[str, Any]:
    """Strict JSON: UTF-8, an object, no duplicated key anywhere. ``ValueError`` otherwise."""
    value = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    if not isinstance(value, dict):
        raise ValueError("the manifest is not a JSON object")  # noqa: TRY004 (malformed data, as json's own errors)
    return value


@dataclass(frozen=True)
class Chunk:
    index: int
    offset: int           # in guest RAM (the backend)
    nbytes: int           # of RAM; the file holds nbytes + TAG_NBYTES
    file_offset: int


@dataclass
class Snapshot:
    """An open snapshot whose header, trailer and manifest authenticated. It keeps the file open
    and reads every section through that one descriptor, each byte once per use: a chunk or the
    device state is authenticated in the very buffer that is returned to the caller."""

    path: str
    fd: int
    manifest: dict[str, Any]
    keys: Keys
    snapshot_id: bytes
    file_size: int
    chunks: list[Chunk] = field(default_factory=list)
    device_state_offset: int = 0
    device_state_nbytes: int = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _read(self, offset: int, nbytes: int) -> bytes:
        return _pread_exact(self.fd, nbytes, offset, self.path)

    def chunk(self, c: Chunk) -> bytes:
        """The chunk's DRAM image, read once and authenticated; ``IntegrityError`` otherwise."""
        sealed = self._read(c.file_offset, c.nbytes + TAG_NBYTES)
        try:
            return self.keys.ram.decrypt(chunk_nonce(c.index), sealed,
                                         chunk_aad(self.snapshot_id, c.index, c.offset, c.nbytes))
        except InvalidTag:
            raise IntegrityError(f"{self.path}: chunk {c.index} (guest RAM offset {c.offset:#x}) fails "
                                 "authentication: corrupted, tampered, reordered or from another snapshot") from None

    def iter_chunks(self) -> Iterator[tuple[Chunk, bytes]]:
        for c in self.chunks:
            yield c, self.chunk(c)

    def device_state(self) -> bytes:
        sealed = self._read(self.device_state_offset, self.device_state_nbytes)
        try:
            return self.keys.meta.decrypt(DEVICE_NONCE, sealed, b"device" + self.snapshot_id)
        except InvalidTag:
            raise IntegrityError(f"{self.path}: the device state fails authentication") from None

    def vm_key(self) -> tuple[bytes, bytes]:
        """(data key, tweak key) unwrapped with the KEK."""
        try:
            raw = self.keys.wrap.decrypt(WRAP_NONCE, bytes.fromhex(self.manifest["wrapped_key"]),
                                         b"wrap" + self.snapshot_id)
        except (InvalidTag, KeyError, TypeError, ValueError):
            raise IntegrityError(f"{self.path}: the wrapped VM key does not authenticate") from None
        half = len(raw) // 2
        return raw[:half], raw[half:]

    def verify_all(self) -> None:
        """Authenticate every chunk, the device state and the wrapped key."""
        for c in self.chunks:
            self.chunk(c)
        self.device_state()
        self.vm_key()


def _pread_exact(fd: int, nbytes: int, offset: int, path: str) -> bytes:
    parts, got = [], 0
    while got < nbytes:
        part = os.pread(fd, nbytes - got, offset + got)
        if not part:
            raise IntegrityError(f"{path}: short read (truncated while open?)")
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _open_regular(p: str) -> int:
    return open_regular(p, SnapshotError, p, missing=f"{p}: no such snapshot")


def _authenticate(fd: int, p: str, header: bytes, size: int, kek: bytes) -> tuple[Keys, bytes, int]:
    """Decrypt the manifest with keys from ``header``; (keys, manifest bytes, manifest offset)."""
    _magic, _version, salt, snapshot_id = HEADER.unpack(header)
    if size < HEADER.size + TRAILER.size:
        raise IntegrityError(f"{p}: truncated (no trailer)")
    m_off, m_len, tag, end = TRAILER.unpack(_pread_exact(fd, TRAILER.size, size - TRAILER.size, p))
    if end != END_MAGIC or m_off < HEADER.size or m_len > MAX_MANIFEST_NBYTES or \
            m_off + m_len != size - TRAILER.size:
        raise IntegrityError(f"{p}: truncated or damaged (bad trailer)")
    keys = Keys(kek, salt, snapshot_id)
    try:
        raw = keys.meta.decrypt(MANIFEST_NONCE, _pread_exact(fd, m_len, m_off, p) + tag,
                                manifest_aad(header, m_off, m_len))
    except InvalidTag:
        raise IntegrityError(f"{p}: the manifest does not authenticate: wrong key-encryption key, or the "
                             "file is corrupted or tampered") from None
    return keys, raw, m_off


def _refuse_version(fd: int, p: str, header: bytes, size: int, kek: bytes) -> None:
    """Always raises: say what a version other than ours means, without trusting the field."""
    version = HEADER.unpack(header)[1]
    as_ours = header[:8] + struct.pack("<I", VERSION) + header[12:]
    try:
        _authenticate(fd, p, as_ours, size, kek)
    except IntegrityError:
        pass
    else:
        raise IntegrityError(f"{p}: corrupted header: the version field was damaged (the file "
                             f"authenticates as version {VERSION}, the field reads {version})")
    if version == 1 and size >= _V1_HEADER_NBYTES + TRAILER.size:
        m_off, m_len, _tag, end = TRAILER.unpack(_pread_exact(fd, TRAILER.size, size - TRAILER.size, p))
        if end == END_MAGIC and m_off + m_len == size - TRAILER.size:
            raise IntegrityError(f"{p}: a format version 1 snapshot, which this qemu-mktme no longer reads "
                                 "(its RAM chunks were the raw DRAM ciphertext): restore it with the "
                                 "release that wrote it and save it again")
    if VERSION < version <= VERSION + 16:
        raise IntegrityError(f"{p}: snapshot format version {version} is newer than this qemu-mktme "
                             f"({VERSION}), or the file is corrupted")
    raise IntegrityError(f"{p}: corrupted header (version field {version} is no format version)")


def open_snapshot(path: str | os.PathLike[str], kek: bytes) -> Snapshot:
    """Open a snapshot and authenticate its header, trailer and manifest with ``kek``.

    The caller closes it (``with open_snapshot(...) as snap``). ``IntegrityError``: not a
    snapshot, truncated, another format version, a wrong KEK or a corrupted/tampered file (the
    last two cannot be told apart without the right key), a malformed manifest or a gap.
    ``SnapshotError``: the file cannot be opened or is not a regular file.
    """
    p = os.fspath(path)
    fd = _open_regular(p)
    try:
        size = os.fstat(fd).st_size
        header = os.pread(fd, HEADER.size, 0)
        if header[:len(MAGIC)] != MAGIC:
            raise IntegrityError(f"{p} is not a qemu-mktme snapshot (or its first bytes are corrupted)")
        if len(header) < HEADER.size:
            raise IntegrityError(f"{p}: truncated (short header)")
        if HEADER.unpack(header)[1] != VERSION:
            _refuse_version(fd, p, header, size, kek)
        keys, raw, m_off = _authenticate(fd, p, header, size, kek)
        snapshot_id = HEADER.unpack(header)[3]
        try:
            manifest = parse_manifest(raw)
        except ValueError as err:
            raise IntegrityError(f"{p}: malformed manifest ({err})") from None
        snap = Snapshot(p, fd, manifest, keys, snapshot_id, size)
        _lay_out(snap, m_off)
        return snap
    except BaseException:
        os.close(fd)
        raise


def _lay_out(snap: Snapshot, m_off: int) -> None:
    """Place every section from the authenticated manifest; they must tile the file exactly."""
    m, p = snap.manifest, snap.path
    try:
        if m.get("version") != VERSION or bytes.fromhex(m["snapshot_id"]) != snap.snapshot_id:
            raise ValueError("version or snapshot id differs from the header")
        memory = int(m["vm"]["memory"])
        pos, prev_end = HEADER.size, 0
        for index, item in enumerate(m["chunks"]):
            off, n = int(item[0]), int(item[1])
            if len(item) != 2 or off < prev_end or n <= 0 or n % 64 or off + n > memory:
                raise ValueError(f"chunk {index}")
            snap.chunks.append(Chunk(index, off, n, pos))
            prev_end, pos = off + n, pos + n + TAG_NBYTES
        snap.device_state_offset, snap.device_state_nbytes = pos, int(m["device_state"]["length"])
        if snap.device_state_nbytes < TAG_NBYTES:
            raise ValueError("device state")
    except (KeyError, TypeError, ValueError) as err:
        raise IntegrityError(f"{p}: malformed manifest ({err})") from None
    if pos + snap.device_state_nbytes != m_off:
        raise IntegrityError(f"{p}: the sections do not tile the file (a gap or overlap before the manifest)")


class Writer:
    """Streams a snapshot into ``f`` (opened by the caller on a temporary path)."""

    def __init__(self, f: BinaryIO, kek: bytes) -> None:
        self.f = f
        self.snapshot_id = os.urandom(16)
        self.salt = os.urandom(32)
        self.keys = Keys(kek, self.salt, self.snapshot_id)
        self.header = HEADER.pack(MAGIC, VERSION, self.salt, self.snapshot_id)
        self.chunks: list[list[int]] = []
        self._sealed = bytearray()   # reused: a fresh 1 MiB object per chunk costs page faults
        f.write(self.header)

    def add_chunk(self, offset: int, data: bytes | memoryview) -> None:
        """Seal ``data`` (the DRAM image of guest RAM at ``offset``) as the next chunk."""
        index = len(self.chunks)
        n = len(data)
        nonce, aad = chunk_nonce(index), chunk_aad(self.snapshot_id, index, offset, n)
        if not hasattr(self.keys.ram, "encrypt_into"):   # cryptography < 45
            self.f.write(self.keys.ram.encrypt(nonce, data, aad))
        else:
            if len(self._sealed) != n + TAG_NBYTES:
                self._sealed = bytearray(n + TAG_NBYTES)
            self.keys.ram.encrypt_into(nonce, data, aad, self._sealed)
            self.f.write(self._sealed)
        self.chunks.append([offset, n])

    def finish(self, manifest: dict[str, Any], device_state: bytes, vm_key: bytes) -> None:
        """Seal the device state, wrap the VM key, then seal the manifest and write the trailer."""
        sealed_ds = self.keys.meta.encrypt(DEVICE_NONCE, device_state, b"device" + self.snapshot_id)
        self.f.write(sealed_ds)
        manifest = dict(manifest, version=VERSION, snapshot_id=self.snapshot_id.hex(),
                        kdf={"alg": "HKDF-SHA256", "aead": "AES-256-GCM"},
                        wrapped_key=self.keys.wrap.encrypt(WRAP_NONCE, vm_key, b"wrap" + self.snapshot_id).hex(),
                        device_state={"length": len(sealed_ds)}, chunks=self.chunks)
        raw = canonical(manifest)
        m_off = self.f.tell()
        sealed = self.keys.meta.encrypt(MANIFEST_NONCE, raw, manifest_aad(self.header, m_off, len(raw)))
        self.f.write(sealed[:-TAG_NBYTES])
        self.f.write(TRAILER.pack(m_off, len(raw), sealed[-TAG_NBYTES:], END_MAGIC))
