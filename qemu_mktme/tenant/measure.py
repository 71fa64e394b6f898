"""Measured launch of an emulated host: what defines its trustworthiness, as TPM events.

    PCR 8   the QEMU binary that will run the guests
    PCR 9   the TCG plugin shim (the built library)
    PCR 10  the qemu-mktme package (every module and the shim's source, by relative path)
    PCR 11  the platform configuration: IA32_TME_CAPABILITY, IA32_TME_ACTIVATE as the BIOS left
            them (KeyID bits, algorithms), the number of packages
    PCR 12  the guest's boot files: kernel and initrd (not the command line, which carries the
            run's commands and workload parameters)

The same function computes the events on the host (then extended into its TPM) and for the
tenant's reference values (``tenant policy``), so the two can only differ where the files do.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import qemu_mktme

from ..arch import msr as msr_bits
from ..host.host import Host
from ..qemu.binary import find_qemu
from ..qemu.boot import BootSpec
from ..trace.shim import build_shim
from .eventlog import Event, measure
from .tpm import Tpm, file_digest


def package_digest(root: Path | None = None) -> tuple[bytes, int]:
    """SHA-256 over (relative path, SHA-256) of every ``.py``, ``.c`` and ``.h`` of the package."""
    base = root or Path(qemu_mktme.__file__).parent
    h = hashlib.sha256()
    files = sorted(p for p in base.rglob("*") if p.suffix in (".py", ".c", ".h") and p.is_file())
    for p in files:
        h.update(str(p.relative_to(base)).encode() + b"\0" + file_digest(p))
    return h.digest(), len(files)


def platform_config(keyid_bits: int, packages: int) -> bytes:
    """The TME MSRs as the modelled BIOS programs them for this configuration."""
    host = Host(keyid_bits=keyid_bits, packages=packages)
    cap = host.platform.rdmsr(msr_bits.IA32_TME_CAPABILITY)
    act = host.platform.rdmsr(msr_bits.IA32_TME_ACTIVATE)
    return (f"IA32_TME_CAPABILITY={cap:#018x} IA32_TME_ACTIVATE={act:#018x} "
            f"keyid_bits={keyid_bits} packages={packages}").encode()


def measured_set(boot: BootSpec, *, keyid_bits: int, packages: int = 1, qemu: str | os.PathLike[str] | None = None,
                 shim: Path | None = None) -> list[Event]:
    """The events of one host boot, in order."""
    binary = find_qemu(qemu)
    shim_path = shim or build_shim(binary)
    pkg, nfiles = package_digest()
    events = [
        Event(8, file_digest(binary.path), f"QEMU binary {binary.path} ({binary.version_str})"),
        Event(9, file_digest(shim_path), "TCG plugin shim"),
        Event(10, pkg, f"qemu-mktme {qemu_mktme.__version__} package ({nfiles} files)"),
        measure(11, platform_config(keyid_bits, packages), f"platform: {keyid_bits} KeyID bits, {packages} package(s)"),
        Event(12, file_digest(boot.kernel), f"guest kernel {boot.kernel.name}"),
    ]
    if boot.initrd is not None:
        events.append(Event(12, file_digest(boot.initrd), f"guest initrd {boot.initrd.name}"))
    return events


def extend_all(tpm: Tpm, events: list[Event]) -> None:
    """Measured launch proper: every event into its PCR, in order."""
    for e in events:
        tpm.extend(e.pcr, e.digest)
