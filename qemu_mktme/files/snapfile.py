"""The encrypted snapshot container: one file, written atomically, verified before it is used.

Layout (all integers little-endian)::

    "QMKTSNAP" | u32 version                                  header, 12 bytes
    chunk 0 | chunk 1 | ...                                    guest RAM, sealed (see below)
    device state                                               AES-256-GCM ciphertext
    manifest                                                   JSON, UTF-8
    u64 manifest offset | u64 manifest length | 16-byte tag | "QMKTEND\\0"   trailer, 48 bytes

Guest RAM chunks are the **DRAM image** of the RAM: AES-XTS per 64-byte line under the VM's
key with tweak = the line's HPA at save time, exactly what the memory bus carried. Each chunk
has a GMAC tag (AES-256-GCM, empty plaintext) over the snapshot id, its index, backend offset
and length, and its bytes, so tampering, truncation, reordering and substitution from another
snapshot are all detected. The manifest lists every chunk with its tag and is itself
authenticated by the trailer's tag; the VM key is in it only wrapped (AES-256-GCM). All keys
come from the user's key-encryption key (KEK, 32 bytes) through HKDF-SHA256 with a random salt.

Chunks that were never written (memory holes) or are all zero are not stored: a reader of the
file learns which 1 MiB chunks of guest RAM are zero, and how many are not (README).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import IntegrityError, SnapshotError

MAGIC = b"QMKTSNAP"
END_MAGIC = b"QMKTEND\0"
VERSION = 1
HEADER = struct.Struct("<8sI")
TRAILER = struct.Struct("<QQ16s8s")
KEK_NBYTES = 32
_INFO = b"qemu-mktme snapshot v1"


def load_kek(text: bytes | str, source: str = "key-encryption key") -> bytes:
    """The KEK in a key file's content: exactly 64 hex digits, surrounding whitespace allowed.

    Anything else (32 raw bytes, 32 hex digits, an all-zero key) is a ``ValueError`` starting
    with ``source`` (e.g. ``key-encryption key file kek.hex``); it never echoes the content.
    """
    data = text.encode("latin-1") if isinstance(text, str) else bytes(text)
    words = data.split()
    kek = b""
    if len(words) == 1 and words[0].isascii():
        try:
            kek = bytes.fromhex(words[0].decode("ascii"))
        except ValueError:
            pass
    if len(kek) != KEK_NBYTES or len(words[0]) != 2 * KEK_NBYTES:
        if not words:
            found = "nothing"
        elif len(kek) and len(words[0]) == 2 * len(kek):
            found = f"{len(words[0])} hex digits"
        elif all(32 <= b < 127 or b in b"\t\r\n" for b in data):
            found = f"{len(words)} word{'s' if len(words) > 1 else ''} of text"
        else:
            found = f"{len(data)} bytes of binary data"
        raise ValueError(f"{source}: not a key-encryption key: expected {2 * KEK_NBYTES} hex digits, found {found}")
    if not any(kek):
        raise ValueError(f"{source}: the key-encryption key is all zeros")
    return kek


class Keys:
    """The per-snapshot keys derived from the KEK: one AEAD for tags, wrapping and device state."""

    def __init__(self, kek: bytes, salt: bytes) -> None:
        if len(kek) != KEK_NBYTES:
            raise ValueError(f"the KEK must be {KEK_NBYTES} bytes")
        okm = HKDF(hashes.SHA256(), 32, salt, _INFO).derive(kek)
        self.aead = AESGCM(okm)

    def tag(self, nonce: bytes, aad: bytes) -> bytes:
        return self.aead.encrypt(nonce, b"", aad)

    def check(self, nonce: bytes, aad: bytes, tag: bytes) -> bool:
        try:
            self.aead.decrypt(nonce, tag, aad)
            return True
        except InvalidTag:
            return False


def chunk_nonce(index: int) -> bytes:
    return b"C" + index.to_bytes(11, "little")


def chunk_aad(snapshot_id: bytes, index: int, offset: int, data: bytes | memoryview) -> bytes:
    return b"chunk" + snapshot_id + struct.pack("<QQQ", index, offset, len(data)) + bytes(data)


MANIFEST_NONCE = b"M" + bytes(11)
DEVICE_NONCE = b"D" + bytes(11)
WRAP_NONCE = b"W" + bytes(11)
PRIVATE_NONCE = b"P" + bytes(11)


def canonical(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class Snapshot:
    """A snapshot file read and authenticated (chunks not yet verified: see :meth:`verify_chunks`)."""

    path: str
    manifest: dict[str, Any]
    keys: Keys
    file_size: int

    @property
    def snapshot_id(self) -> bytes:
        return bytes.fromhex(self.manifest["snapshot_id"])

    def vm_key(self) -> tuple[bytes, bytes]:
        """(data key, tweak key) unwrapped with the KEK."""
        wrapped = bytes.fromhex(self.manifest["wrapped_key"])
        try:
            raw = self.keys.aead.decrypt(WRAP_NONCE, wrapped, b"wrap" + self.snapshot_id)
        except InvalidTag:
            raise IntegrityError(f"{self.path}: the wrapped VM key does not authenticate") from None
        half = len(raw) // 2
        return raw[:half], raw[half:]

    def read_at(self, f: BinaryIO, offset: int, nbytes: int) -> bytes:
        if offset < HEADER.size or offset + nbytes > self.file_size - TRAILER.size:
            raise IntegrityError(f"{self.path}: a section lies outside the file (truncated or tampered)")
        f.seek(offset)
        data = f.read(nbytes)
        if len(data) != nbytes:
            raise IntegrityError(f"{self.path}: short read (truncated)")
        return data

    def chunks(self) -> list[tuple[int, int, int, bytes]]:
        """(backend offset, length, file offset, tag) for every stored chunk, checked for sanity."""
        out, prev_end = [], 0
        memory = int(self.manifest["vm"]["memory"])
        for item in self.manifest["chunks"]:
            off, n, fo, tag = int(item[0]), int(item[1]), int(item[2]), bytes.fromhex(item[3])
            if off < prev_end or n <= 0 or n % 64 or off + n > memory or len(tag) != 16:
                raise IntegrityError(f"{self.path}: malformed chunk list")
            prev_end = off + n
            out.append((off, n, fo, tag))
        return out

    def verify_chunks(self, f: BinaryIO) -> None:
        """Authenticate every chunk; ``IntegrityError`` naming the first bad one."""
        sid = self.snapshot_id
        for index, (off, n, fo, tag) in enumerate(self.chunks()):
            data = self.read_at(f, fo, n)
            if not self.keys.check(chunk_nonce(index), chunk_aad(sid, index, off, data), tag):
                raise IntegrityError(f"{self.path}: chunk {index} (guest RAM offset {off:#x}) fails "
                                     "authentication: tampered, reordered or from another snapshot")

    def private(self) -> dict[str, Any]:
        """The sealed part of the manifest (the boot record: a kernel command line may hold secrets)."""
        try:
            raw = self.keys.aead.decrypt(PRIVATE_NONCE, bytes.fromhex(self.manifest["private"]),
                                         b"private" + self.snapshot_id)
            return dict(json.loads(raw))
        except (InvalidTag, KeyError, ValueError) as err:
            raise IntegrityError(f"{self.path}: the sealed manifest part does not authenticate") from err

    def device_state(self, f: BinaryIO) -> bytes:
        ds = self.manifest["device_state"]
        blob = self.read_at(f, int(ds["offset"]), int(ds["length"]))
        try:
            return self.keys.aead.decrypt(DEVICE_NONCE, blob, b"device" + self.snapshot_id)
        except InvalidTag:
            raise IntegrityError(f"{self.path}: the device state fails authentication") from None


def open_snapshot(path: str | os.PathLike[str], kek: bytes) -> Snapshot:
    """Read the trailer and manifest and authenticate the manifest with ``kek``.

    ``IntegrityError``: not a snapshot, truncated, a future format version, wrong KEK or a
    tampered manifest (the two cannot be told apart without the right key).
    """
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            head = f.read(HEADER.size)
            size = os.fstat(f.fileno()).st_size
            if len(head) < HEADER.size or HEADER.unpack(head)[0] != MAGIC:
                raise IntegrityError(f"{p} is not a qemu-mktme snapshot")
            version = HEADER.unpack(head)[1]
            if version > VERSION:
                raise IntegrityError(f"{p}: snapshot format version {version} is newer than this qemu-mktme ({VERSION})")
            if size < HEADER.size + TRAILER.size:
                raise IntegrityError(f"{p}: truncated (no trailer)")
            f.seek(size - TRAILER.size)
            m_off, m_len, tag, end = TRAILER.unpack(f.read(TRAILER.size))
            if end != END_MAGIC or m_off < HEADER.size or m_off + m_len != size - TRAILER.size:
                raise IntegrityError(f"{p}: truncated or damaged (bad trailer)")
            f.seek(m_off)
            raw = f.read(m_len)
    except FileNotFoundError:
        raise SnapshotError(f"{p}: no such snapshot") from None
    except OSError as err:
        raise SnapshotError(f"{p}: {err.strerror}") from err
    try:
        manifest = json.loads(raw)
        salt = bytes.fromhex(manifest["kdf"]["salt"])
    except (ValueError, KeyError, TypeError) as err:
        raise IntegrityError(f"{p}: unreadable manifest ({err})") from err
    keys = Keys(kek, salt)
    if not hmac.compare_digest(keys.tag(MANIFEST_NONCE, b"manifest" + canonical(manifest)), tag):
        raise IntegrityError(f"{p}: manifest does not authenticate: wrong key-encryption key, or tampered")
    return Snapshot(p, manifest, keys, size)


class Writer:
    """Streams a snapshot into ``f`` (opened by the caller on a temporary path)."""

    def __init__(self, f: BinaryIO, kek: bytes) -> None:
        self.f = f
        self.snapshot_id = os.urandom(16)
        self.salt = os.urandom(32)
        self.keys = Keys(kek, self.salt)
        self.chunks: list[list[Any]] = []
        f.write(HEADER.pack(MAGIC, VERSION))

    def add_chunk(self, offset: int, data: bytes | memoryview) -> None:
        index = len(self.chunks)
        tag = self.keys.tag(chunk_nonce(index), chunk_aad(self.snapshot_id, index, offset, data))
        self.chunks.append([offset, len(data), self.f.tell(), tag.hex()])
        self.f.write(data)

    def finish(self, manifest: dict[str, Any], device_state: bytes, vm_key: bytes,
               private: dict[str, Any]) -> None:
        """Seal the device state, the VM key and ``private`` (manifest fields that may hold guest
        secrets), then write the manifest and the trailer."""
        sealed = self.keys.aead.encrypt(DEVICE_NONCE, device_state, b"device" + self.snapshot_id)
        ds_off = self.f.tell()
        self.f.write(sealed)
        manifest = dict(manifest, version=VERSION, snapshot_id=self.snapshot_id.hex(),
                        kdf={"alg": "HKDF-SHA256", "salt": self.salt.hex()},
                        wrapped_key=self.keys.aead.encrypt(WRAP_NONCE, vm_key, b"wrap" + self.snapshot_id).hex(),
                        private=self.keys.aead.encrypt(PRIVATE_NONCE, canonical(private),
                                                       b"private" + self.snapshot_id).hex(),
                        device_state={"offset": ds_off, "length": len(sealed),
                                      "sha256_of_sealed": hashlib.sha256(sealed).hexdigest()},
                        chunks=self.chunks)
        raw = canonical(manifest)
        m_off = self.f.tell()
        self.f.write(raw)
        tag = self.keys.tag(MANIFEST_NONCE, b"manifest" + raw)
        self.f.write(TRAILER.pack(m_off, len(raw), tag, END_MAGIC))
