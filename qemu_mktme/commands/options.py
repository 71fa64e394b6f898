"""What several commands share: argument types, option groups, the usage error, JSON output."""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from .. import images
from ..qemu.devices import DiskSpec, NetSpec
from ..arch.sizes import parse_size
from ..engine.platform import MAX_PACKAGES
from ..qemu.machine import MAX_CPUS, MAX_MEMORY

PROG = "qemu-mktme"
VM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
KEK_HELP = ("file holding the 32-byte key-encryption key as 64 hex digits (a regular file, or <(...)); "
            "never stored")


class UsageError(Exception):
    """A command line that cannot work, found before anything starts: exit 2, as argparse does."""


def param(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return key, value


def vm_name(text: str) -> str:
    if not VM_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"invalid VM name {text!r}: use up to 64 letters, digits, '_', '.' and '-', not starting with '.' or '-'")
    return text


def alias_bit(text: str) -> int:
    """A DIMM alias bit for ``run --dimm-alias`` and the alias attacks: above the VMs' RAM (from
    4 GiB, 1 GiB each), below the 40-bit physical space 6 KeyID bits leave."""
    if not (text.isascii() and text.isdigit()) or not 33 <= int(text) <= 39:
        raise argparse.ArgumentTypeError(f"the alias bit must be in 33..39 (above the VMs' RAM from 4 GiB, "
                                         f"below the 40-bit physical space), got {text!r}")
    return int(text)


def command(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("empty bare-metal command")
    return text


def count(low: int, high: int, what: str) -> Callable[[str], int]:
    """An argument type: a whole number ``low..high`` written in ASCII digits (``int`` alone takes
    '１' and '1_000'), so a count the platform model allocates for is bounded before anything starts."""
    def parse(text: str) -> int:
        if not re.fullmatch(r"[+-]?[0-9]+", text.strip(), re.ASCII):
            raise argparse.ArgumentTypeError(f"{what}: not a whole number: {text!r}")
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} must be {low}..{high}, got {value}")
        return value
    parse.__name__ = what              # argparse names the type in its messages
    return parse


def seconds(low: float, high: float, what: str) -> Callable[[str], float]:
    """An argument type: a finite number of seconds in ``(low, high]`` (no nan, inf, 0 or negative)."""
    def parse(text: str) -> float:
        if not re.fullmatch(r"\s*([0-9]+\.?[0-9]*|\.[0-9]+)\s*", text, re.ASCII):
            raise argparse.ArgumentTypeError(f"{what}: not a positive number of seconds: {text!r}")
        value = float(text)
        if not (low < value <= high and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{what} must be more than {low:g} and at most {high:g} s, got {text!r}")
        return value
    parse.__name__ = what
    return parse


keyid_bits = count(1, 15, "KeyID bits")
cpus = count(1, MAX_CPUS, "vCPUs")
packages = count(1, MAX_PACKAGES, "CPU packages")
pid = count(1, 1 << 22, "process id")


def size(text: str) -> int:
    try:
        value = parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if value > MAX_MEMORY:
        raise argparse.ArgumentTypeError(f"at most {MAX_MEMORY >> 30} GiB, got {text!r}")
    return value


def disk(text: str) -> DiskSpec:
    try:
        return DiskSpec.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def net(text: str) -> NetSpec:
    try:
        return NetSpec.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


class Unlisted:
    """Subparsers that register a command under its old NAME: it parses and runs as before, but
    ``--help`` does not list it (an alias kept so that scripts written against it keep working)."""

    def __init__(self, sub: Any, name: str) -> None:
        self._sub, self._name = sub, name

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        kwargs.pop("help", None)            # argparse lists a subcommand only when it has help
        parser: argparse.ArgumentParser = self._sub.add_parser(self._name, **kwargs)
        return parser


class ListedChoices(Mapping[str, argparse.ArgumentParser]):
    """A subparsers action's choices as an error message shows them: every name parses, but
    "invalid choice ... (choose from ...)" offers only the listed ones, not the :class:`Unlisted`."""

    def __init__(self, parsers: dict[str, argparse.ArgumentParser], unlisted: Iterable[str]) -> None:
        self._parsers, self._unlisted = parsers, frozenset(unlisted)

    def __getitem__(self, name: str) -> argparse.ArgumentParser:
        return self._parsers[name]

    def __iter__(self) -> Iterator[str]:
        return (name for name in self._parsers if name not in self._unlisted)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def add_guest_options(p: argparse.ArgumentParser) -> None:
    """Options that choose and boot a guest (shared by run and the commands that boot one)."""
    g = p.add_argument_group("guest")
    g.add_argument("--guest", default="baremetal", metavar="baremetal|linux|debian|PATH",
                   help="image to boot, or a kernel file (default: baremetal)")
    g.add_argument("--memory", "-m", type=size, default=None, metavar="SIZE",
                   help=f"guest RAM, e.g. 512M or 5G (default: {images.default_memory_help()})")
    g.add_argument("--cpus", type=cpus, default=1, metavar="N", help=f"vCPUs, 1..{MAX_CPUS} (default: 1)")
    g.add_argument("--workload", metavar="NAME", help="Linux guest: workload to run (default: hello)")
    g.add_argument("--param", type=param, action="append", default=[], metavar="NAME=VALUE",
                   help="Linux guest: workload parameter (repeatable), e.g. --param secret=abc")
    g.add_argument("--command", "-c", type=command, action="append", default=[], metavar="CMD",
                   help="bare-metal guest: command to run at boot (repeatable), e.g. -c 'crc 0x200000 4096'")
    g.add_argument("--append", default="", metavar="ARGS", help="extra kernel command line")
    g.add_argument("--initrd", metavar="PATH", help="initrd for a kernel given as --guest PATH")
    g.add_argument("--disk", type=disk, action="append", default=[], metavar="PATH[,format=raw|qcow2][,dma=vhost|qemu][,readonly=on][,cache=writeback|none][,poll-max-ns=N]",
                   help="attach a file as a virtio disk (repeatable); dma=qemu is QEMU's own virtio-blk; "
                        "cache=none bypasses the host page cache (O_DIRECT) as QEMU's does; "
                        "poll-max-ns=N bounds how long our backend watches an empty ring (0: never). "
                        "The debian guest boots from the first disk, or from a throwaway overlay on its image")
    g.add_argument("--net", type=net, action="append", default=[], metavar="user[,hostfwd=tcp:ADDR:PORT-:PORT]",
                   help="a virtio NIC on QEMU's user networking (repeatable), e.g. "
                        "--net user,hostfwd=tcp:127.0.0.1:2222-:22")
    g.add_argument("--qemu", metavar="PATH|qemu10", default=None,
                   help="the qemu-system-x86_64 binary, or qemu10 for the one 'images build qemu10' unpacked "
                        "(default: $QEMU_MKTME_QEMU, else the one in PATH)")
    g.add_argument("--accel", choices=("tcg", "kvm", "auto"), default="tcg",
                   help="accelerator (default: tcg; auto uses KVM only when it works)")


def add_mktme_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("MKTME")
    g.add_argument("--key", default="cpu", metavar="SPEC",
                   help="the VM's key: cpu[:ALG], user:KEYHEX:TWEAKHEX[:ALG], user:@FILE[:ALG] (keeps the "
                        "key out of ps), clear, no-encrypt, or none for plain QEMU (default: cpu)")
    g.add_argument("--tenant", default=None,
                   help="tenant owning the key (default: default; with --tenant-server: the tenant's certificate CN)")
    g.add_argument("--iommu-keyid", type=count(0, 0x7FFF, "KeyID"), default=None, metavar="N",
                   help="fault injection: program the VM's IOMMU domain with KeyID N (device DMA then "
                        "reads and writes garbage; the DMA sanitizer reports each transfer)")
    g.add_argument("--keyid-bits", type=keyid_bits, default=6, metavar="N",
                   help="MK_TME_KEYID_BITS the BIOS activates (default 6: 63 KeyIDs)")
    g.add_argument("--packages", type=packages, default=1, metavar="N",
                   help=f"CPU packages (key tables), 1..{MAX_PACKAGES} (default 1)")
