"""Measured launch of an emulated host: what defines its trustworthiness, as TPM events.

    PCR 8   the QEMU binary that will run the guests
    PCR 9   the TCG plugin shim (the built library)
    PCR 10  the qemu-mktme package (every module and the shim's source, by relative path)
    PCR 11  the platform configuration: IA32_TME_CAPABILITY, IA32_TME_ACTIVATE as the BIOS left
            them (KeyID bits, algorithms), the number of packages, the memory integrity mode
            (``integrity="mac"``; absent when off)
    PCR 12  the guest's boot files: kernel and initrd (not the command line, which carries the
            run's commands and workload parameters)

The same function computes the events on the host (then extended into its TPM) and for the
tenant's reference values (``tenant policy``), so the two can only differ where the files do.

What is measured is what runs: an attested launch starts QEMU beside the attestation; before
any key reaches it, :func:`check_running` proves that the process executes the very file hashed
for PCR 8, unchanged; the boot files are hashed once and given to QEMU as sealed memfd copies of
the hashed bytes (:func:`sealed_boot`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import qemu_mktme

from ..arch import msr as msr_bits
from ..errors import TenantError
from ..files.regular import open_regular
from ..host.host import Host
from ..qemu.binary import find_qemu
from ..qemu.boot import BootSpec
from ..trace.shim import build_shim
from .digests import Measured, fd_digest, file_digest, measure_file, path_digest, state
from .eventlog import Event, measure
from .tpm import Tpm


def package_digest(root: Path | None = None) -> tuple[bytes, int]:
    """SHA-256 over (relative path, SHA-256) of every ``.py``, ``.c`` and ``.h`` of the package."""
    base = str(root or Path(qemu_mktme.__file__).parent)
    files = [os.path.relpath(os.path.join(d, n), base) for d, _, names in os.walk(base) for n in names
             if n.endswith((".py", ".c", ".h")) and os.path.isfile(os.path.join(d, n))]
    files.sort(key=lambda rel: rel.split(os.sep))          # pathlib's order (by path components)
    h = hashlib.sha256()
    for rel in files:                 # plain strings and stat-keyed digests: this runs beside QEMU's start
        h.update(rel.encode() + b"\0" + path_digest(os.path.join(base, rel)))
    return h.digest(), len(files)


def platform_config(keyid_bits: int, packages: int, integrity: str | None = None) -> bytes:
    """The TME MSRs as the modelled BIOS programs them for this configuration, and the memory
    integrity mode when there is one (a host without its MACs is not the platform the tenant
    approved for a VM that relies on them)."""
    host = Host(keyid_bits=keyid_bits, packages=packages, integrity=integrity)
    cap = host.platform.rdmsr(msr_bits.IA32_TME_CAPABILITY)
    act = host.platform.rdmsr(msr_bits.IA32_TME_ACTIVATE)
    return (f"IA32_TME_CAPABILITY={cap:#018x} IA32_TME_ACTIVATE={act:#018x} "
            f"keyid_bits={keyid_bits} packages={packages}" + (f" integrity={integrity}" if integrity else "")).encode()


def _platform_description(keyid_bits: int, packages: int, integrity: str | None) -> str:
    return (f"platform: {keyid_bits} KeyID bits, {packages} package(s)"
            + (f", integrity {integrity}" if integrity else ""))


def measured_set(boot: BootSpec, *, keyid_bits: int, packages: int = 1, qemu: str | os.PathLike[str] | None = None,
                 shim: Path | None = None, binary_file: Measured | None = None,
                 boot_digests: dict[Path, bytes] | None = None, integrity: str | None = None) -> list[Event]:
    """The events of one host boot, in order.

    ``binary_file``: the QEMU binary as hashed for a launch (:func:`measure_binary`; a QEMU
    started from it is checked against it with :func:`check_running`). ``boot_digests``: the
    boot files' digests, already computed over the bytes QEMU loads (:func:`sealed_boot`).
    """
    binary = find_qemu(qemu)
    shim_path = shim or build_shim(binary)
    pkg, nfiles = package_digest()
    known = boot_digests or {}
    events = [
        Event(8, (binary_file or measure_file(binary.path)).digest, f"QEMU binary {binary.path} ({binary.version_str})"),
        Event(9, file_digest(shim_path), "TCG plugin shim"),
        Event(10, pkg, f"qemu-mktme {qemu_mktme.__version__} package ({nfiles} files)"),
        measure(11, platform_config(keyid_bits, packages, integrity), _platform_description(keyid_bits, packages, integrity)),
        Event(12, known.get(boot.kernel) or file_digest(boot.kernel), f"guest kernel {boot.kernel.name}"),
    ]
    if boot.initrd is not None:
        events.append(Event(12, known.get(boot.initrd) or file_digest(boot.initrd), f"guest initrd {boot.initrd.name}"))
    return events


def measure_binary(qemu: str | os.PathLike[str] | None = None) -> Measured:
    """The QEMU binary a launch will start, hashed (PCR 8)."""
    return measure_file(find_qemu(qemu).path)


def check_running(pid: int, measured: Measured) -> None:
    """``TenantError`` unless process ``pid`` executes the very file ``measured`` hashed, unchanged.

    ``/proc/PID/exe`` is the inode it runs, whatever the path names now, and while it runs Linux
    refuses to open it for writing (ETXTBSY). The same device, inode, size, mtime and ctime as
    when hashed prove it unchanged if its last change was settled then (:mod:`.digests`);
    otherwise the running binary is hashed again.
    """
    try:
        fd = os.open(f"/proc/{pid}/exe", os.O_RDONLY)
    except OSError as err:
        raise TenantError(f"QEMU (pid {pid}) is gone: {err.strerror}") from None
    try:
        if state(os.fstat(fd)) != measured.state or (not measured.settled and fd_digest(fd) != measured.digest):
            raise TenantError(f"QEMU (pid {pid}) does not run the measured {measured.path}: the file changed or "
                              "was replaced after it was hashed")
    finally:
        os.close(fd)


@dataclass
class SealedBoot:
    """The guest's boot files as QEMU loads them: ``boot`` names sealed memfd copies
    (``/dev/fd/N``, inherited through ``fds``); ``digests`` are those bytes' SHA-256, by the
    original path (what the measured set describes)."""

    boot: BootSpec
    fds: list[int]
    digests: dict[Path, bytes]

    def close(self) -> None:
        """Drop the copies (QEMU has loaded them once it answers QMP); again: nothing."""
        while self.fds:
            os.close(self.fds.pop())


@contextlib.contextmanager
def sealed_boot(boot: BootSpec) -> Iterator[SealedBoot]:
    """Copies of ``boot``'s kernel and initrd in memfds sealed against any change, hashed while
    copied; closed after the block (QEMU has read them once it runs)."""
    sealed = SealedBoot(boot, [], {})
    try:
        paths: dict[str, Path] = {}
        for field, path in (("kernel", boot.kernel), ("initrd", boot.initrd)):
            if path is not None:
                sealed.fds.append(_sealed_copy(Path(path), sealed.digests))
                paths[field] = Path(f"/dev/fd/{sealed.fds[-1]}")
        sealed.boot = dataclasses.replace(boot, **paths)  # type: ignore[arg-type]
        yield sealed
    finally:
        sealed.close()


def _sealed_copy(path: Path, digests: dict[Path, bytes]) -> int:
    src = open_regular(path, TenantError, f"boot file {path}")
    try:
        memfd = os.memfd_create(f"qemu-mktme-boot-{path.name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            h = hashlib.sha256()
            while chunk := os.read(src, 1 << 20):
                h.update(chunk)
                os.write(memfd, chunk)
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
                        | fcntl.F_SEAL_SEAL)
        except BaseException:
            os.close(memfd)
            raise
        digests[path] = h.digest()
        return memfd
    finally:
        os.close(src)


def extend_all(tpm: Tpm, events: list[Event]) -> None:
    """Measured launch proper: every event into its PCR, in order."""
    for e in events:
        tpm.extend(e.pcr, e.digest)
