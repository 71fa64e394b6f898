"""The tenant's image at rest: QEMU's native LUKS-in-qcow2 under a disk key kept in the KMIP
server, and a signed manifest checked before launch.

QEMU does the encryption (``qemu-img convert -O qcow2 -o encrypt.format=luks``); the passphrase
is the disk key in hex (QEMU secrets must be UTF-8) and reaches ``qemu-img`` and QEMU only
through an inherited pipe (``-object secret,file=/dev/fd/N``), never a command line or a file.
LUKS in qcow2 gives confidentiality, not integrity, hence the manifest: the image file's SHA-256,
size and disk-key name, signed with the tenant's Ed25519 key (``IMAGE.manifest.json``). The image
is attached read-only, so the signed digest stays the image's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from ..errors import TenantError
from ..files.regular import open_regular
from .digests import measure_fd

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".manifest.json"
ITER_TIME_MS = 10
"""LUKS's PBKDF2 time per unlock. Stretching protects guessable passphrases; ours is a random
256-bit key in hex, so stretching adds nothing and 10 ms keeps the disk open fast (vs ~0.25 s)."""
PBKDF_BENCHMARK_ERROR = "Unable to get accurate CPU usage"
"""QEMU 7.2's PBKDF iteration benchmark (``qcrypto_pbkdf2_count_iters``) fails with this when the
thread's CPU time did not advance over a round: tick-based accounting on a busy (or just shared)
machine, 1 creation in 5-10 measured here. Fixed upstream in 2025 (not in Debian 12's QEMU);
``qemu-img`` has no option that skips the benchmark (``encrypt.iter-time`` only scales its result),
so a creation that fails with exactly this message is run again, up to :data:`PBKDF_ATTEMPTS` times."""
PBKDF_ATTEMPTS = 12


def manifest_path(image: str | os.PathLike[str]) -> Path:
    return Path(str(image) + MANIFEST_SUFFIX)


@contextlib.contextmanager
def secret_pipe(secret: str) -> Iterator[int]:
    """The read end of a pipe holding ``secret`` (written and closed: EOF follows); closed after."""
    r, w = os.pipe()
    try:
        os.write(w, secret.encode())
    finally:
        os.close(w)
    try:
        yield r
    finally:
        os.close(r)


def passphrase(key: bytes) -> str:
    return key.hex()


def _qemu_img() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        raise TenantError("qemu-img is not installed (Debian package qemu-utils)")
    return path


def encrypt(source: str | os.PathLike[str], target: str | os.PathLike[str], key: bytes) -> None:
    """``target``: a LUKS qcow2 holding ``source``'s data (raw or qcow2), under ``key``."""
    src, dst = Path(source), Path(target)
    if not src.is_file():
        raise TenantError(f"image {src} is not a regular file")
    if dst.exists():
        raise TenantError(f"{dst} exists; choose a new file for the encrypted image")
    fmt = "qcow2" if src.read_bytes()[:4] == b"QFI\xfb" else "raw"
    partial = dst.with_name(dst.name + ".partial")
    for attempt in range(1, PBKDF_ATTEMPTS + 1):
        partial.unlink(missing_ok=True)
        with secret_pipe(passphrase(key)) as fd:
            proc = subprocess.run(
                [_qemu_img(), "convert", "-f", fmt, "-O", "qcow2", "--object", f"secret,id=s0,file=/dev/fd/{fd}",
                 "-o", f"encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time={ITER_TIME_MS}",
                 str(src), str(partial)], pass_fds=(fd,), capture_output=True, text=True, check=False)
        if proc.returncode == 0 or PBKDF_BENCHMARK_ERROR not in proc.stderr:
            break
        log.info("qemu-img convert: %s (attempt %d of %d); again", PBKDF_BENCHMARK_ERROR, attempt, PBKDF_ATTEMPTS)
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        raise TenantError(f"qemu-img convert failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else ''}")
    os.replace(partial, dst)


def _digest_fd(fd: int) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        h.update(chunk)
        offset += len(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def write_manifest(image: str | os.PathLike[str], disk_key: str, tenant: str,
                   signing_key: ed25519.Ed25519PrivateKey) -> Path:
    fd = os.open(image, os.O_RDONLY)
    try:
        digest, size = _digest_fd(fd)
    finally:
        os.close(fd)
    body = {"format": 1, "image": Path(image).name, "sha256": digest, "size": size, "disk_key": disk_key,
            "tenant": tenant, "encryption": "luks-in-qcow2"}
    manifest = {**body, "signature": signing_key.sign(_canonical(body)).hex()}
    path = manifest_path(image)
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return path


def disk_key_hint(image: str | os.PathLike[str]) -> str | None:
    """The disk-key name the image's manifest gives, unverified (None if unreadable): only a hint
    for the broker to fetch the key early; what is released is what the verified manifest names."""
    try:
        name = json.loads(manifest_path(image).read_text()).get("disk_key")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


@dataclass(frozen=True)
class VerifiedImage:
    """An image whose manifest verified: ``fd`` is the file opened for the check (QEMU reads the
    same file through it, so a file swapped after the check is not the one launched)."""

    path: Path
    fd: int
    disk_key: str
    sha256: str


def verify(image: str | os.PathLike[str], verify_key: ed25519.Ed25519PublicKey) -> VerifiedImage:
    """Open ``image``, check its manifest's signature and the file's digest; the caller closes ``fd``."""
    path = Path(image)
    mpath = manifest_path(path)
    try:
        manifest = json.loads(mpath.read_text())
        body = {k: v for k, v in manifest.items() if k != "signature"}
        signature = bytes.fromhex(manifest["signature"])
    except FileNotFoundError:
        raise TenantError(f"image {path} has no manifest ({mpath.name}); encrypt it with 'qemu-mktme disk encrypt'") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise TenantError(f"manifest {mpath} is malformed") from None
    try:
        verify_key.verify(signature, _canonical(body))
    except InvalidSignature:
        raise TenantError(f"manifest {mpath}: bad signature (not signed by the tenant, or modified)") from None
    fd = open_regular(path, TenantError, f"image {path}", nofollow=True)
    try:
        measured = measure_fd(fd, path)          # by file identity, as the measured launch (digests.py)
        digest, size = measured.digest.hex(), measured.state[2]
        if size != body.get("size") or digest != body.get("sha256"):
            raise TenantError(f"image {path} does not match its signed manifest "
                              f"({'truncated or extended' if size != body.get('size') else 'modified'}: "
                              f"sha256 {digest[:16]}..., manifest {str(body.get('sha256'))[:16]}...)")
    except BaseException:
        os.close(fd)
        raise
    return VerifiedImage(path, fd, str(body["disk_key"]), digest)


def info(image: str | os.PathLike[str]) -> dict[str, Any]:
    """``qemu-img info`` as JSON (shows the encryption without any key)."""
    proc = subprocess.run([_qemu_img(), "info", "--output=json", str(image)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise TenantError(f"qemu-img info {image}: {proc.stderr.strip()}")
    return json.loads(proc.stdout)
