"""QEMU options a user passes through (``qemu-mktme run ... -- OPTIONS``), checked first.

The driver owns guest RAM (one shared memfd/file backend that the host model maps and tags),
the machine's start (paused, then resumed after binding), QMP and the console; an option that
would take one of these away would break the emulation silently. :data:`REFUSED` lists them,
each with what to use instead (README "Passing options to QEMU" prints the same list). Any
other option is handed to QEMU unchanged, once QEMU's own ``-help`` confirms it knows it (a
typo is one clear line here, not a QEMU exit after the host is built).
"""

from __future__ import annotations

import functools
import re
import subprocess
from collections.abc import Sequence

REFUSED: dict[str, str] = {
    "-m": "guest RAM is the emulated DRAM: use --memory",
    "-mem-path": "guest RAM is the driver's shared memfd/file backend",
    "-mem-prealloc": "guest RAM is the driver's shared memfd/file backend",
    "-numa": "NUMA nodes would put guest RAM in backends the host model does not tag",
    "-smp": "use --cpus",
    "-accel": "use --accel (KVM bypasses the TCG shim, so it cannot be traced)",
    "-enable-kvm": "use --accel (KVM bypasses the TCG shim, so it cannot be traced)",
    "-incoming": "the driver restores snapshots itself (qemu-mktme snapshot restore)",
    "-S": "use --paused (the driver starts QEMU stopped and binds RAM before the guest runs)",
    "-loadvm": "an internal snapshot's RAM would bypass the host model: use qemu-mktme snapshot",
    "-kernel": "use --guest PATH", "-initrd": "use --initrd", "-append": "use --append",
    "-serial": "the first serial port is the driver's console",
    "-nographic": "it moves the serial port and monitor to stdio, which the driver owns",
    "-qmp": "the driver owns QMP (reach it with 'qemu-mktme host query', or start QEMU yourself and "
            "use 'qemu-mktme attach')",
    "-mon": "the driver owns the monitor", "-monitor": "the driver owns the monitor",
    "-daemonize": "the driver supervises the QEMU process",
    "-readconfig": "a config file could change any of the above unchecked",
    "-runas": "the driver maps guest RAM through /proc/PID/fd", "-chroot": "the driver maps guest RAM through /proc/PID/fd",
    "-run-with": "the driver maps guest RAM through /proc/PID/fd",
    "-name": "use --name", "-no-user-config": "already given", "-nodefaults": "already given",
}
"""Options refused outright, and why / what to use instead."""

REFUSED_VALUES: list[tuple[str, re.Pattern[str], str]] = [
    ("-machine", re.compile(r"(^|,)(memory-backend|type|accel)=|^[^=,]+(,|$)"),
     "the machine type and its memory backend are the driver's (q35 with the shared backend); "
     "-machine PROP=VALUE without type=, accel= or memory-backend= is passed"),
    ("-object", re.compile(r"^memory-backend-"),
     "guest RAM is the driver's one backend: a second one would not be emulated DRAM"),
    ("-device", re.compile(r"^(nvdimm|virtio-pmem)"),
     "persistent memory is the driver's: use --nvdimm PATH[,size=SIZE][,hpa=ADDR] (encrypted under the VM's key)"),
    ("-device", re.compile(r"^(pc-dimm|virtio-mem|memory-backend)"),
     "hot-pluggable memory would not be emulated DRAM"),
    ("-chardev", re.compile(r"(^|,)id=(qmp0|console0)(,|$)"), "ids qmp0 and console0 are the driver's"),
]
"""Options passed unless their value matches: (option, pattern, why)."""

ALIASES = {"-M": "-machine", "-h": "-help"}


@functools.lru_cache(maxsize=8)
def qemu_options(qemu: str) -> dict[str, bool]:
    """Every option ``qemu -help`` lists, and whether it takes an argument (its synopsis has one)."""
    out = subprocess.run([qemu, "-help"], capture_output=True, text=True, timeout=30, check=False).stdout
    options: dict[str, bool] = {}
    for line in out.splitlines():
        m = re.match(r"(-[\w-]+(?:(?: or |/)-?[\w-]+)*)( \S|\s{2,}|$)", line)
        if not m:
            continue
        takes_arg = m[2].startswith(" ") and len(m[2]) == 2 and m[2][1] != " "
        for name in re.split(r" or |/", m[1]):
            options["-" + name.lstrip("-")] = takes_arg
    return options


def check_passthrough(argv: Sequence[str], qemu: str) -> tuple[str, ...]:
    """``argv`` unchanged if QEMU may get it, else ``ValueError`` with one line naming the
    option and what to use instead. ``qemu`` is the binary whose ``-help`` defines the options."""
    known = qemu_options(qemu)
    args = list(argv)
    i = 0
    while i < len(args):
        word = args[i]
        if not word.startswith("-") or word == "-":
            raise ValueError(f"QEMU option expected after --, got {word!r} (QEMU's own options only, "
                             "e.g. -- -device virtio-rng-pci)")
        name = "-" + word.lstrip("-")
        name = ALIASES.get(name, name)
        if name in REFUSED:
            raise ValueError(f"QEMU option {word} is refused: {REFUSED[name]}")
        if name not in known:
            raise ValueError(f"QEMU option {word} is unknown to this QEMU (see {qemu} -help)")
        value = None
        if known[name]:
            if i + 1 >= len(args):
                raise ValueError(f"QEMU option {word} needs a value")
            value = args[i + 1]
            i += 1
        for option, pattern, why in REFUSED_VALUES:
            if name == option and value is not None and pattern.search(value):
                raise ValueError(f"QEMU option {word} {value} is refused: {why}")
        i += 1
    return tuple(args)


def refusal_table() -> str:
    """The refusal list as text (for --help and the README)."""
    rows = [f"  {opt:14} {why}" for opt, why in REFUSED.items()]
    rows += [f"  {opt} {pattern.pattern!r:.40}: {why}" for opt, pattern, why in REFUSED_VALUES]
    return "\n".join(rows)
