"""Devices a machine carries besides RAM and the console: disks and network cards.

A disk is a host file the guest sees as a virtio block device. Who moves its data is the disk's
``dma``: ``qemu`` is QEMU's own ``virtio-blk-pci`` (QEMU's block layer reads and writes guest RAM
directly: the plain-QEMU baseline and the choice for runs without emulation); ``vhost`` is a
vhost-user-blk backend outside QEMU whose every access goes through the host model's IOMMU
(the live layer starts it and gives the machine its socket). ``None`` leaves the choice to
whoever launches the machine.

The command-line form is QEMU's own style: ``PATH[,format=raw|qcow2][,dma=vhost|qemu][,readonly=on]
[,cache=writeback|none][,poll-max-ns=N]``; ``cache=none`` is QEMU's: the host page cache is bypassed
(``O_DIRECT``), by QEMU's block layer and by our backend alike. ``poll-max-ns`` is QEMU's iothread
option for our backend's queue threads (``dma=vhost`` only): how long one may watch a ring that ran
empty for the guest's next request instead of waiting for its kick (adaptive below it; 0: never).

A network card is QEMU's ``virtio-net-pci`` on its user-mode network stack (slirp: the guest
is 10.0.2.15 behind NAT, no host privileges, no tap), with ``hostfwd`` rules forwarding host
ports into the guest: ``user[,hostfwd=tcp:127.0.0.1:2222-:22]...``. Its option ROM (iPXE) is
left out: the guests here boot from a kernel or a disk, never from the network, and under TCG
the ROM costs seconds of firmware time.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

DISK_FORMATS = ("raw", "qcow2")
DMA_MODES = ("qemu", "vhost")
CACHE_MODES = ("writeback", "none")
POLL_MAX_NS_LIMIT = 10_000_000
"""The longest polling window a disk may ask for (10 ms; QEMU's iothread takes any value)."""
QCOW2_MAGIC = b"QFI\xfb"
LUKS_MAGIC = b"LUKS\xba\xbe"


def _split_commas(text: str) -> list[str]:
    """``text`` split at single commas, ``,,`` standing for a comma (QEMU's ``QemuOpts`` rule)."""
    parts, part, i = [], [], 0
    while i < len(text):
        if text[i] == ",":
            if text.startswith(",,", i):
                part.append(",")
                i += 2
                continue
            parts.append("".join(part))
            part = []
        else:
            part.append(text[i])
        i += 1
    parts.append("".join(part))
    return parts


def split_options(text: str, what: str, allowed: tuple[str, ...], usage: str) -> tuple[str, dict[str, str]]:
    """``PATH[,KEY=VALUE]...`` (``--disk``, ``--nvdimm``): the path and the options, each one of
    ``allowed``, non-empty and given once; else ``ValueError`` with one line quoting ``usage``.
    A comma inside the path or a value is written ``,,``, as in QEMU's own options."""
    path, *opts = _split_commas(text)
    if not path:
        raise ValueError(f"--{what} needs a file: {text!r}")
    fields: dict[str, str] = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or key not in allowed or not value:
            raise ValueError(f"unknown {what} option {opt!r} in {text!r} (expected {usage})")
        if key in fields:
            raise ValueError(f"{what} option {key!r} given twice in {text!r}")
        fields[key] = value
    return path, fields


@dataclass(frozen=True)
class DiskSpec:
    """One disk: the file, its format, who does its DMA, and whether the guest may write it."""

    path: Path
    format: str = "raw"
    dma: str | None = None
    readonly: bool = False
    secret_fd: int | None = None           # LUKS-in-qcow2: an inherited fd QEMU reads the passphrase from
    cache: str = "writeback"               # "none": O_DIRECT, QEMU's cache=none
    poll_max_ns: int | None = None         # dma=vhost: the queue threads' polling bound (None: the backend's default)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.format not in DISK_FORMATS:
            raise ValueError(f"disk format must be one of {', '.join(DISK_FORMATS)}, got {self.format!r}")
        if self.dma is not None and self.dma not in DMA_MODES:
            raise ValueError(f"disk dma must be one of {', '.join(DMA_MODES)}, got {self.dma!r}")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"disk cache must be one of {', '.join(CACHE_MODES)}, got {self.cache!r}")
        if self.poll_max_ns is not None:
            if self.dma == "qemu":
                raise ValueError(f"disk {self.path}: poll-max-ns is our backend's (dma=vhost); QEMU's virtio-blk "
                                 "under TCG has no polling")
            if not 0 <= self.poll_max_ns <= POLL_MAX_NS_LIMIT:
                raise ValueError(f"disk poll-max-ns must be in 0..{POLL_MAX_NS_LIMIT}, got {self.poll_max_ns}")
        if self.dma == "vhost" and self.format != "raw":
            raise ValueError(f"disk {self.path}: dma=vhost serves raw images only (our backend has no {self.format} "
                             f"driver): use dma=qemu, or qemu-img convert -O raw")

    @classmethod
    def parse(cls, text: str) -> DiskSpec:
        """``PATH[,format=raw|qcow2][,dma=vhost|qemu][,readonly=on][,cache=writeback|none][,poll-max-ns=N]``; the format is read from the
        file's header when not given (a qcow2 header means qcow2, anything else raw), never left to
        QEMU's probing (which would let a raw guest-written disk turn itself into a qcow2 one)."""
        usage = "PATH[,format=raw|qcow2][,dma=vhost|qemu][,readonly=on][,cache=writeback|none][,poll-max-ns=N]"
        path, fields = split_options(text, "disk", ("format", "dma", "readonly", "cache", "poll-max-ns"), usage)
        poll = fields.get("poll-max-ns")
        if poll is not None and not (poll.isascii() and poll.isdigit()):
            raise ValueError(f"disk poll-max-ns must be a number of nanoseconds, got {poll!r}")
        if fields.get("readonly", "off") not in ("on", "off"):
            raise ValueError(f"readonly must be on or off, got {fields['readonly']!r}")
        fmt = fields.get("format") or sniff_format(Path(path))
        if fmt == "luks":
            raise ValueError(f"disk {path} is a LUKS volume: it needs its key (not supported by --disk yet)")
        return cls(Path(path), format=fmt, dma=fields.get("dma"), readonly=fields.get("readonly") == "on",
                   cache=fields.get("cache", "writeback"), poll_max_ns=None if poll is None else int(poll))

    def check(self) -> None:
        """``ValueError`` with one clear line unless the file can be a disk: it exists, is a regular
        file (not a FIFO, a directory or a character device such as /dev/zero), and is readable
        (and writable unless read-only)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise ValueError(f"disk {self.path} does not exist") from None
        except OSError as err:
            raise ValueError(f"disk {self.path}: {err.strerror}") from None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise ValueError(f"disk {self.path} is not a regular file or block device")
        mode = os.R_OK if self.readonly else os.R_OK | os.W_OK
        if not os.access(self.path, mode):
            raise ValueError(f"disk {self.path} is not {'readable' if self.readonly else 'readable and writable'}")
        if self.format == "raw" and sniff_format(self.path) == "luks":
            raise ValueError(f"disk {self.path} is a LUKS volume: it needs its key (not supported by --disk yet)")
        if self.format == "qcow2" and self.secret_fd is None and qcow2_encrypted(self.path):
            raise ValueError(f"disk {self.path} is an encrypted qcow2: it opens only with its key "
                             "(run --tenant-server URL --image PATH)")

    def secret_id(self, node: str) -> str:
        return f"{node}-secret"

    def blockdev(self, node: str) -> str:
        """The ``-blockdev`` argument (JSON, so that any file name passes unquoted)."""
        opts: dict[str, object] = {"read-only": True} if self.readonly else {}
        if self.cache == "none":
            opts["cache"] = {"direct": True}
        spec = {"driver": self.format, "node-name": node, **opts,
                "file": {"driver": "file", "filename": str(self.path), **opts}}
        if self.secret_fd is not None:
            spec["encrypt"] = {"format": "luks", "key-secret": self.secret_id(node)}
        return json.dumps(spec, separators=(",", ":"))


def sniff_format(path: Path) -> str:
    """``qcow2`` or ``luks`` by the file's magic, else ``raw`` (unreadable files are left to check())."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)   # a FIFO must not block us
    except OSError:
        return "raw"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "raw"
        head = os.pread(fd, 6, 0)
    except OSError:
        return "raw"
    finally:
        os.close(fd)
    if head.startswith(QCOW2_MAGIC):
        return "qcow2"
    if head.startswith(LUKS_MAGIC):
        return "luks"
    return "raw"


def qcow2_encrypted(path: Path) -> bool:
    """Whether a qcow2 header says its data are encrypted (crypt_method, big-endian u32 at 32)."""
    try:
        with open(path, "rb") as f:
            head = f.read(36)
    except OSError:
        return False
    return head.startswith(QCOW2_MAGIC) and len(head) == 36 and int.from_bytes(head[32:36], "big") != 0


def disk_args(disks: tuple[DiskSpec, ...]) -> list[str]:
    """QEMU options for the disks QEMU serves itself (``dma`` qemu or unset)."""
    argv: list[str] = []
    for n, disk in enumerate(disks):
        if disk.dma == "vhost":
            continue                  # the live layer adds the vhost-user device with its socket
        node = f"disk{n}"
        if disk.secret_fd is not None:        # never on the command line: QEMU reads the inherited fd
            argv += ["-object", f"secret,id={disk.secret_id(node)},file=/dev/fd/{disk.secret_fd}"]
        argv += ["-blockdev", disk.blockdev(node),
                 "-device", f"virtio-blk-pci,drive={node},id={node}-dev,serial=qemu-mktme-{node}"]
    return argv


NET_MODES = ("user",)
_HOSTFWD = re.compile(r"(tcp|udp):([^:]*):(\d+)-([^:]*):(\d+)")


@dataclass(frozen=True)
class NetSpec:
    """One virtio NIC on QEMU's user networking, with host-to-guest port forwards."""

    mode: str = "user"
    hostfwd: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in NET_MODES:
            raise ValueError(f"network mode must be one of {', '.join(NET_MODES)}, got {self.mode!r}")
        object.__setattr__(self, "hostfwd", tuple(self.hostfwd))
        for rule in self.hostfwd:
            _check_hostfwd(rule)

    @classmethod
    def parse(cls, text: str) -> NetSpec:
        """``user[,hostfwd=tcp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT]...`` (QEMU's syntax)."""
        mode, *opts = text.split(",")
        if mode not in NET_MODES:
            raise ValueError(f"--net {text!r}: the mode must be one of {', '.join(NET_MODES)} "
                             "(QEMU's user networking; e.g. user,hostfwd=tcp:127.0.0.1:2222-:22)")
        rules = []
        for opt in opts:
            key, sep, value = opt.partition("=")
            if key != "hostfwd" or not sep:
                raise ValueError(f"unknown network option {opt!r} in {text!r} "
                                 "(expected user[,hostfwd=tcp:HOSTADDR:HOSTPORT-:GUESTPORT]...)")
            rules.append(value)
        return cls(mode, tuple(rules))


def _check_hostfwd(rule: str) -> None:
    m = _HOSTFWD.fullmatch(rule)
    if not m:
        raise ValueError(f"hostfwd {rule!r} is not PROTO:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT "
                         "(e.g. tcp:127.0.0.1:2222-:22)")
    for addr in (m[2], m[4]):
        if addr:
            try:
                ipaddress.IPv4Address(addr)
            except ValueError:
                raise ValueError(f"hostfwd {rule!r}: {addr!r} is not an IPv4 address") from None
    for port in (m[3], m[5]):
        if not 0 < int(port) < 65536:
            raise ValueError(f"hostfwd {rule!r}: port {port} is not 1..65535")


def net_args(nets: tuple[NetSpec, ...]) -> list[str]:
    """QEMU options for the NICs: a user netdev each and a virtio-net-pci on it."""
    argv: list[str] = []
    for n, net in enumerate(nets):
        netdev = ",".join([f"user,id=net{n}", *(f"hostfwd={rule}" for rule in net.hostfwd)])
        argv += ["-netdev", netdev, "-device", f"virtio-net-pci,netdev=net{n},id=net{n}-dev,romfile="]
    return argv
