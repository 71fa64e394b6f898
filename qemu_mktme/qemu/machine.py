"""Launch, drive and tear down an unmodified ``qemu-system-x86_64``, or attach to a running one.

A machine owns everything it creates: the QEMU process, a private 0700 runtime directory with
the QMP and console sockets, the guest-RAM backend (a memfd by default, so nothing of guest
memory ever sits in the file system; or a 0600 file under /dev/shm), and the tasks that read
QEMU's output. One launch guard makes sure that a launch that fails, times out or is cancelled
leaves none of them behind; ``close()`` does the same for a running machine, and an ``atexit``
handler plus ``PR_SET_PDEATHSIG`` cover a Python process that dies without closing.

    async with Machine(MachineConfig(boot=images.load("baremetal").boot())) as vm:
        await vm.console.wait_for(r"ready mailbox=")
        secret = vm.ram.read(GPA(0x200000), 16)
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import ctypes
import enum
import functools
import logging
import os
import re
import shutil
import signal
import socket
import struct
import time
import weakref
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any, Self, TypeVar

from ..arch.sizes import parse_size
from ..errors import AttachError, LaunchError, QemuError, QemuExited, QmpCommandError
from ..files import runtime
from .binary import QemuBinary, find_qemu, kvm_works
from .console import Console
from .guestram import GuestRAM, parse_flat_view
from .boot import BootSpec
from .devices import DiskSpec, NetSpec, disk_args, net_args
from .monitor import Monitor
from .nvdimm import NvdimmBackend, backend_id, memory_option, nvdimm_args

log = logging.getLogger(__name__)

RAM_BACKEND_ID = "ram0"
STDERR_LINES = 40
_PR_SET_PDEATHSIG = 1
_Method = TypeVar("_Method", bound=Callable[..., Awaitable[Any]])


class VmState(enum.Enum):
    """Where a machine is in its life (qemu.qmp's ``Runstate`` idea, for the VM)."""

    IDLE = "idle"
    LAUNCHING = "launching"
    PAUSED = "paused"
    RUNNING = "running"
    STOPPING = "stopping"
    EXITED = "exited"


def requires(*states: VmState) -> Callable[[_Method], _Method]:
    """Decorator: the method runs only while the machine is in one of ``states``, else
    ``QemuError`` naming the state it is in (as qemu.qmp's ``@require`` guards its protocol)."""
    allowed = " or ".join(s.value for s in states)

    def decorator(method: _Method) -> _Method:
        @functools.wraps(method)
        async def guarded(self: Machine, *args: Any, **kwargs: Any) -> Any:
            if self.state not in states:
                raise QemuError(f"{self.name}: {method.__name__}() needs the machine {allowed}, "
                                f"it is {self.state.value}")
            return await method(self, *args, **kwargs)
        return guarded  # type: ignore[return-value]
    return decorator


MAX_CPUS = 288
"""vCPUs QEMU's q35 machine accepts (``-smp``), the bound a configuration is checked against."""
MAX_MEMORY = 1 << 40
"""Guest RAM a configuration may ask for (1 TiB): the host model builds its tables over all of it."""


@dataclass(frozen=True)
class MachineConfig:
    """How to start QEMU. ``boot`` may be None only for an incoming-migration target, or with
    ``firmware_boot`` (no kernel: the firmware, SeaBIOS, boots the first disk)."""

    boot: BootSpec | None = None
    memory: int | str = 512 << 20
    cpus: int = 1
    accel: str = "tcg"                     # "tcg", "kvm", or "auto" (KVM only when it works)
    cpu: str | None = None                 # -cpu model; QEMU's default when None
    machine: str = "q35"
    name: str = "guest"
    ram_backend: str = "memfd"             # "memfd" or "file"
    ram_dir: Path = Path("/dev/shm")       # for ram_backend="file"
    start_paused: bool = False
    incoming: bool = False                 # -incoming defer: wait for a migration stream
    firmware_boot: bool = False            # no -kernel: the firmware boots the first disk
    disks: tuple[DiskSpec, ...] = ()       # virtio block devices (qemu/devices.py)
    nets: tuple[NetSpec, ...] = ()         # virtio NICs on QEMU's user networking (qemu/devices.py)
    nvdimms: tuple[NvdimmBackend, ...] = ()  # guest NVDIMMs, each on a private shared file (qemu/nvdimm.py)
    plugins: tuple[str, ...] = ()          # -plugin arguments (the shim adds its own)
    pass_fds: tuple[int, ...] = ()         # descriptors QEMU inherits (a plugin opens /proc/self/fd/N)
    extra_args: tuple[str, ...] = ()
    qemu: str | None = None
    launch_timeout: float = 30.0
    kill_on_parent_death: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "memory", parse_size(self.memory))
        if self.accel not in ("tcg", "kvm", "auto"):
            raise ValueError(f"accel must be tcg, kvm or auto, got {self.accel!r}")
        if self.ram_backend not in ("memfd", "file"):
            raise ValueError(f"ram_backend must be memfd or file, got {self.ram_backend!r}")
        if int(self.memory) % (1 << 20):
            raise ValueError(f"memory must be a whole number of MiB, got {self.memory} bytes")
        if isinstance(self.cpus, bool) or not 1 <= self.cpus <= MAX_CPUS:
            raise ValueError(f"cpus must be in 1..{MAX_CPUS} (QEMU's q35 limit), got {self.cpus}")
        if int(self.memory) > MAX_MEMORY:
            raise ValueError(f"memory must be at most {MAX_MEMORY >> 30} GiB, got {int(self.memory) >> 30} GiB")
        object.__setattr__(self, "disks", tuple(self.disks))
        if any(not isinstance(d, DiskSpec) for d in self.disks):
            raise ValueError("disks must be DiskSpec objects (qemu_mktme.qemu.devices)")
        object.__setattr__(self, "nets", tuple(self.nets))
        if any(not isinstance(n, NetSpec) for n in self.nets):
            raise ValueError("nets must be NetSpec objects (qemu_mktme.qemu.devices)")
        object.__setattr__(self, "nvdimms", tuple(self.nvdimms))
        if any(not isinstance(n, NvdimmBackend) for n in self.nvdimms):
            raise ValueError("nvdimms must be NvdimmBackend objects (qemu_mktme.qemu.nvdimm)")
        if self.boot is not None and self.boot.min_memory and int(self.memory) < self.boot.min_memory:
            raise ValueError(f"the {self.boot.image} guest needs at least {self.boot.min_memory >> 20} MiB "
                             f"of memory, got {int(self.memory) >> 20} MiB")


@dataclass
class _Owned:
    """What a launched machine must remove on teardown (also read by the atexit handler)."""

    pid: int | None = None
    runtime_dir: Path | None = None
    ram_file: Path | None = None
    nvdimm_files: list[Path] = dataclasses.field(default_factory=list)


_live: weakref.WeakSet[Machine] = weakref.WeakSet()


@atexit.register
def _reap_at_exit() -> None:
    for vm in list(_live):
        vm._kill_now()


def sweep_stale_runtime_dirs() -> int:
    """Remove runtime directories whose owner died without cleaning up (kill -9); how many.

    Only directories in the private runtime parent whose marker proves that this tool made
    them for a process that is gone (:func:`qemu_mktme.files.runtime.sweep`).
    """
    return runtime.sweep()


def _append_config(append: str, log: logging.Logger | logging.LoggerAdapter) -> int | None:
    """The kernel command line as a QEMU config file (``[machine]`` ``append``) in a pipe whose
    read end QEMU inherits for ``-readconfig /dev/fd/N``: ``/proc/PID/cmdline`` is readable by
    every user (``ps``), the pipe only by QEMU; the command line may carry a guest's secrets (a
    restored snapshot's is sealed in the file). None when QEMU's config syntax cannot carry it (a
    double quote, a line break, over 1000 bytes: QEMU 7.2 reads values as ``"%1023[^"]"`` from
    lines of at most 1023 bytes); then it goes in ``-append`` and a warning says so.
    """
    if not append:
        return None
    if '"' in append or "\n" in append or "\r" in append or len(append.encode()) > 1000:
        log.warning("the kernel command line cannot go through a QEMU config file; it is passed with "
                    "-append and visible in ps while the VM runs")
        return None
    text = f'[machine]\n  append = "{append}"\n'.encode()
    r, w = os.pipe()
    try:
        os.write(w, text)                                # at most ~1 KiB: far below the pipe's buffer
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    return r


def set_pdeathsig() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Machine:
    """One QEMU process (launched or attached) with its QMP monitor, console and guest RAM."""

    def __init__(self, config: MachineConfig) -> None:
        self.config = config
        self.name = config.name
        self.log = log.getChild(config.name)
        self._state = VmState.IDLE
        self.console = Console(f"{config.name}-console")
        self.qmp = Monitor(config.name)
        self.qemu: QemuBinary | None = None
        self.accel = config.accel
        self.owned = True
        self._ram: GuestRAM | None = None
        self._nvdimm_ram: list[GuestRAM] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._pid: int | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        self._tasks: list[asyncio.Task[Any]] = []
        self._res = _Owned()
        self._closed = False
        self.argv: list[str] = []

    def __repr__(self) -> str:
        return f"<Machine {self.name} {self.state.value} pid={self.pid}>"

    # ------------------------------------------------------------------ public state

    @property
    def state(self) -> VmState:
        """Where the VM is; written only by :meth:`_set_state`."""
        return self._state

    def _set_state(self, state: VmState) -> None:
        """The one place the state changes (commands, QMP events, launch and teardown)."""
        if state is not self._state:
            self.log.debug("state %s -> %s", self._state.value, state.value)
            self._state = state

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def ram(self) -> GuestRAM:
        """Guest-physical memory (``QemuError`` before launch or after close)."""
        if self._ram is None:
            raise QemuError(f"{self.name}: guest RAM is not mapped ({self.state.value})")
        return self._ram

    @property
    def nvdimms(self) -> list[GuestRAM]:
        """Each NVDIMM's backend mapped here (its CPU view), at its guest-physical range."""
        return list(self._nvdimm_ram)

    @property
    def runtime_dir(self) -> Path | None:
        return self._res.runtime_dir

    @property
    def qmp_socket(self) -> Path | None:
        return self._res.runtime_dir / "qmp.sock" if self._res.runtime_dir else None

    @property
    def console_socket(self) -> Path | None:
        return self._res.runtime_dir / "console.sock" if self._res.runtime_dir else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr)

    # ------------------------------------------------------------------ context manager

    async def __aenter__(self) -> Self:
        if self.state is VmState.IDLE:
            await self.launch()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ launch

    async def launch(self) -> None:
        """Start QEMU paused, connect QMP and console, map RAM, then run (unless asked not to).

        Raises ``QemuNotFound``, ``LaunchError``/``QemuExited`` (with QEMU's stderr tail) or
        ``ImageError``; on any failure or cancellation nothing is left behind.
        """
        if self.state is not VmState.IDLE:
            raise QemuError(f"{self.name}: launch() in state {self.state.value}")
        self._set_state(VmState.LAUNCHING)
        _live.add(self)
        try:
            await self._launch()
            await self._bind()
            if not (self.config.start_paused or self.config.incoming):
                await self.resume()
        except BaseException:
            await self._teardown()
            raise

    async def _bind(self) -> None:
        """Hook for subclasses: runs after RAM is mapped, while the vCPUs are still held."""

    def _spawned(self) -> None:
        """Hook for subclasses: QEMU was just exec'd (``pid`` is known), nothing else is set up yet."""

    async def _launch(self) -> None:
        cfg = self.config
        if cfg.boot is None and not cfg.incoming and not (cfg.firmware_boot and cfg.disks):
            raise ValueError("a machine needs a boot (kernel) unless it is an incoming-migration target "
                             "or boots a disk through its firmware")
        self.qemu = find_qemu(cfg.qemu)
        if cfg.boot is not None:
            for path in (cfg.boot.kernel, cfg.boot.initrd):
                if path is not None and not Path(path).is_file():
                    raise LaunchError(f"{self.name}: boot file {path} does not exist")
        for disk in cfg.disks:
            try:
                disk.check()
            except ValueError as err:
                raise LaunchError(f"{self.name}: {err}") from None
        if cfg.accel == "auto":
            self.accel = "kvm" if kvm_works(str(self.qemu.path)) else "tcg"
        elif cfg.accel == "kvm" and not kvm_works(str(self.qemu.path)):
            raise LaunchError(f"{self.name}: KVM was asked for but does not work here (try accel='tcg')")
        try:
            sweep_stale_runtime_dirs()
            self._res.runtime_dir = runtime.make_runtime_dir(self.name)
        except PermissionError as err:
            raise LaunchError(f"{self.name}: {err}") from None
        if cfg.ram_backend == "file":
            self._res.ram_file = self._create_ram_file()
        for i, nv in enumerate(cfg.nvdimms):
            if nv.path is None:
                self._res.nvdimm_files.append(self._create_ram_file(f"nvdimm{i}"))
                os.truncate(self._res.nvdimm_files[-1], nv.size)
        append_fd = _append_config(cfg.boot.append if cfg.boot else "", self.log)
        try:
            self.argv = self._argv(append_fd)
            self.log.debug("launching %s", " ".join(self.argv))
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True,
                pass_fds=cfg.pass_fds + ((append_fd,) if append_fd is not None else ()),
                preexec_fn=set_pdeathsig if cfg.kill_on_parent_death else None)
        except OSError as err:
            raise LaunchError(f"{self.name}: cannot execute {self.qemu.path}: {err.strerror}") from err
        finally:
            if append_fd is not None:
                os.close(append_fd)
        self._pid = self._res.pid = self._proc.pid
        self._spawned()
        assert self._proc.stdout is not None
        self._tasks.append(asyncio.create_task(self._pump_stderr(self._proc.stdout), name=f"{self.name}-stderr"))
        deadline = time.monotonic() + cfg.launch_timeout
        await self._wait_for_sockets(deadline)
        try:
            await self.qmp.connect(str(self.qmp_socket), timeout=max(1.0, deadline - time.monotonic()))
            reader, writer = await asyncio.open_unix_connection(str(self.console_socket))
        except (AttachError, OSError) as err:
            # Sockets appear before machine init; QEMU may still fail and exit after that.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._proc.wait(), 2.0)
            if self._proc.returncode is not None:
                await self._drain_stderr()
                raise self._exit_error() from err
            raise LaunchError(f"{self.name}: {err}", stderr_tail=self.stderr_tail()) from err
        self.console.attach(reader, writer, self._exit_error_when_reaped)
        self._tasks.append(asyncio.create_task(self._watch_events(), name=f"{self.name}-events"))
        self._ram = await self._map_ram(self._ram_path(), int(cfg.memory))
        for i, (nv, path) in enumerate(zip(cfg.nvdimms, self._nvdimm_paths(), strict=True)):
            self._nvdimm_ram.append(await self._map_ram(str(path), nv.size, backend_id(i)))
        self._set_state(VmState.PAUSED)

    def _nvdimm_paths(self) -> list[Path]:
        """Each NVDIMM's backend file: its own ``path``, else the private file made for it."""
        private = iter(self._res.nvdimm_files)
        return [nv.path if nv.path is not None else next(private) for nv in self.config.nvdimms]

    def _create_ram_file(self, kind: str = "ram") -> Path:
        label = runtime.safe_label(self.name)
        path = self.config.ram_dir / f"qemu-mktme-{label}-{os.getpid()}-{os.urandom(4).hex()}.{kind}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)  # guest RAM: owner only
        except OSError as err:
            raise LaunchError(f"{self.name}: cannot create RAM file {path}: {err.strerror}") from err
        os.close(fd)
        return path

    def _argv(self, append_fd: int | None = None) -> list[str]:
        cfg, rd = self.config, self._res.runtime_dir
        assert self.qemu is not None and rd is not None
        mem = int(cfg.memory)
        if cfg.ram_backend == "memfd":
            backend = f"memory-backend-memfd,id={RAM_BACKEND_ID},size={mem},share=on"
        else:
            backend = f"memory-backend-file,id={RAM_BACKEND_ID},size={mem},share=on,mem-path={self._res.ram_file}"
        argv = [
            str(self.qemu.path), "-name", cfg.name, "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot", "-S",
            "-machine", f"{cfg.machine},memory-backend={RAM_BACKEND_ID}" + (",nvdimm=on" if cfg.nvdimms else ""),
            "-accel", self.accel, "-m", memory_option(mem, cfg.nvdimms), "-object", backend, "-smp", str(cfg.cpus),
            "-chardev", f"socket,id=qmp0,path={rd / 'qmp.sock'},server=on,wait=off",
            "-mon", "chardev=qmp0,mode=control",
            "-chardev", f"socket,id=console0,path={rd / 'console.sock'},server=on,wait=off",
            "-serial", "chardev:console0",
        ]
        if cfg.cpu:
            argv += ["-cpu", cfg.cpu]
        if cfg.boot is not None:
            argv += ["-kernel", str(cfg.boot.kernel)]
            if cfg.boot.initrd is not None:
                argv += ["-initrd", str(cfg.boot.initrd)]
            if append_fd is not None:
                argv += ["-readconfig", f"/dev/fd/{append_fd}"]
            elif cfg.boot.append:
                argv += ["-append", cfg.boot.append]
        argv += disk_args(cfg.disks)
        argv += net_args(cfg.nets)
        argv += nvdimm_args(cfg.nvdimms, self._nvdimm_paths())
        for plugin in cfg.plugins:
            argv += ["-plugin", plugin]
        if cfg.incoming:
            argv += ["-incoming", "defer"]
        return argv + list(cfg.extra_args)

    async def _pump_stderr(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            self._stderr.append(line)
            self.log.debug("qemu: %s", line)

    def _exit_error(self) -> QemuExited:
        rc = self.returncode
        status = "is gone" if rc is None else (f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}")
        tail = self.stderr_tail()
        locked = re.search(r'Failed to get "(\w+)" lock\s+Is another process using the image \[(.*)\]\?', tail)
        if locked:       # QEMU's image locking: say it in one line
            status += (f": disk {locked[2]} is in use by another process (QEMU's image locking refused the "
                       f"{locked[1]} lock; stop the other QEMU, give this VM a copy, or readonly=on for both)")
        return QemuExited(f"{self.name}: QEMU {status}", returncode=rc, stderr_tail=tail)

    async def _exit_error_when_reaped(self) -> QemuExited:
        """The exit error once QEMU is reaped (its console closes a moment before)."""
        if self._proc is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._proc.wait()), 2.0)
            await self._drain_stderr()
        return self._exit_error()

    async def _wait_for_sockets(self, deadline: float) -> None:
        assert self._proc is not None
        sockets = [self.qmp_socket, self.console_socket]
        while not all(p is not None and p.exists() for p in sockets):
            if self._proc.returncode is not None:
                await self._drain_stderr()
                raise self._exit_error()
            if time.monotonic() > deadline:
                raise LaunchError(f"{self.name}: QEMU did not open its sockets within "
                                  f"{self.config.launch_timeout:g} s", stderr_tail=self.stderr_tail())
            await asyncio.sleep(0.01)

    async def _drain_stderr(self) -> None:
        for task in self._tasks:
            if task.get_name().endswith("-stderr"):
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), 1.0)

    async def _watch_events(self) -> None:
        with self.qmp.listen("STOP", "RESUME", "SHUTDOWN") as events:
            async for event in events:
                kind = event.get("event")
                if kind == "STOP" and self.state is VmState.RUNNING:
                    self._set_state(VmState.PAUSED)
                elif kind == "RESUME" and self.state is VmState.PAUSED:
                    self._set_state(VmState.RUNNING)
                elif kind == "SHUTDOWN":
                    self._set_state(VmState.STOPPING)

    def _ram_path(self) -> str:
        if self._res.ram_file is not None:
            return str(self._res.ram_file)
        assert self._pid is not None
        return _find_memfd(self._pid, int(self.config.memory))

    async def _map_ram(self, path: str, size: int, backend_id: str = RAM_BACKEND_ID) -> GuestRAM:
        mtree = await self.qmp.hmp("info mtree -f")
        return GuestRAM(path, size, parse_flat_view(mtree, backend_id), backend_id=backend_id)

    async def refresh_ram_layout(self) -> GuestRAM:
        """Re-read the guest-physical layout (firmware may remap low memory after start)."""
        old = self.ram
        self._ram = await self._map_ram(str(old.backend_path), old.size, old.backend_id)
        old.close()
        return self._ram

    # ------------------------------------------------------------------ attach

    @classmethod
    async def attach(cls, qmp_socket: str | os.PathLike[str], *, ram_path: str | os.PathLike[str] | None = None,
                     console_socket: str | os.PathLike[str] | None = None, name: str = "attached") -> Machine:
        """Drive a QEMU that someone else started; its RAM backend must be shared (``share=on``).

        ``ram_path`` overrides discovery (``memory-backend-file`` paths and memfds are found
        through QMP and ``/proc``). Closing an attached machine disconnects, it does not kill.
        Raises ``AttachError`` for a dead socket, a socket that is not QEMU's QMP, or an
        unusable backend.
        """
        vm = cls(MachineConfig(name=name))
        await vm._attach(qmp_socket, ram_path=ram_path, console_socket=console_socket)
        return vm

    async def _attach(self, qmp_socket: str | os.PathLike[str], *, ram_path: str | os.PathLike[str] | None,
                      console_socket: str | os.PathLike[str] | None) -> None:
        """Connect this (idle) machine to a running QEMU, map its RAM, then :meth:`_bind`."""
        self.owned = False
        self._set_state(VmState.LAUNCHING)
        _live.add(self)
        try:
            self._pid = _peer_pid(str(qmp_socket))
            await self.qmp.connect(str(qmp_socket))
            backend_id, size, path = await self._discover_backend(ram_path)
            self._ram = await self._map_ram(path, size, backend_id)
            if console_socket is not None:
                try:
                    reader, writer = await asyncio.open_unix_connection(str(console_socket))
                except OSError as err:
                    raise AttachError(f"cannot connect to console socket {console_socket}: {err.strerror}") from err
                self.console.attach(reader, writer)
            status = await self.qmp.execute("query-status")
            self._set_state(VmState.RUNNING if status.get("running") else VmState.PAUSED)
            await self._bind()
            self._tasks.append(asyncio.create_task(self._watch_events(), name=f"{self.name}-events"))
        except BaseException:
            await self._teardown()
            raise

    async def _discover_backend(self, ram_path: str | os.PathLike[str] | None) -> tuple[str, int, str]:
        memdevs = await self.qmp.execute("query-memdev")
        try:
            main = await self.qmp.execute("qom-get", {"path": "/machine", "property": "memory-backend"})
        except QmpCommandError:
            main = None
        candidates = [m for m in memdevs if not main or m.get("id") == main] or memdevs
        if len(candidates) != 1:
            ids = ", ".join(str(m.get("id")) for m in memdevs) or "none"
            raise AttachError(f"cannot tell which memory backend is guest RAM (backends: {ids}); "
                              "start QEMU with -machine memory-backend=ID")
        dev = candidates[0]
        backend_id, size = str(dev["id"]), int(dev["size"])
        if not dev.get("share"):
            mib = size >> 20
            raise AttachError(f"guest RAM (memory backend {backend_id!r}) is not shared: start QEMU with "
                              f"-object memory-backend-memfd,id=ram0,size={mib}M,share=on "
                              "-machine memory-backend=ram0 (libvirt: <memoryBacking><source type='memfd'/>"
                              "<access mode='shared'/></memoryBacking>)")
        if ram_path is not None:
            return backend_id, size, str(ram_path)
        kind = await self.qmp.execute("qom-get", {"path": f"/objects/{backend_id}", "property": "type"})
        if kind == "memory-backend-file":
            path = await self.qmp.execute("qom-get", {"path": f"/objects/{backend_id}", "property": "mem-path"})
            return backend_id, size, str(path)
        if kind == "memory-backend-memfd" and self._pid is not None:
            return backend_id, size, _find_memfd(self._pid, size)
        raise AttachError(f"memory backend {backend_id!r} is a {kind}; give its path with ram_path=")

    # ------------------------------------------------------------------ control

    @requires(VmState.RUNNING, VmState.PAUSED)
    async def pause(self) -> None:
        """Stop the vCPUs (QMP ``stop``)."""
        await self.qmp.execute("stop")
        self._set_state(VmState.PAUSED)

    @requires(VmState.PAUSED, VmState.RUNNING)
    async def resume(self) -> None:
        """Run the vCPUs (QMP ``cont``)."""
        await self.qmp.execute("cont")
        self._set_state(VmState.RUNNING)

    async def wait(self, timeout: float | None = None) -> int | None:
        """Wait for QEMU to exit (e.g. the guest powered off); its exit status (None for an
        attached QEMU, which is not ours to reap: its QMP connection ending is its exit)."""
        if self._proc is None and not self.owned and self.state is not VmState.IDLE:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self.qmp.connected and self.state not in (VmState.STOPPING, VmState.EXITED):
                if deadline is not None and time.monotonic() > deadline:
                    raise LaunchError(f"{self.name}: QEMU still running after {timeout:g} s")
                await asyncio.sleep(0.2)
            return None
        if self._proc is None:
            raise QemuError(f"{self.name}: no process of ours to wait for")
        try:
            rc = await asyncio.wait_for(self._proc.wait(), timeout)
        except TimeoutError:
            raise LaunchError(f"{self.name}: QEMU still running after {timeout:g} s",
                              stderr_tail=self.stderr_tail()) from None
        self._set_state(VmState.EXITED)
        return rc

    @requires(VmState.PAUSED, VmState.RUNNING, VmState.STOPPING, VmState.EXITED)
    async def quit(self, timeout: float = 10.0) -> int | None:
        """Ask QEMU to quit (QMP ``quit``) and wait for it; its exit status when ours."""
        if self.state is not VmState.EXITED:
            self._set_state(VmState.STOPPING)
        if self._proc is not None and self._proc.returncode is not None:
            return self._proc.returncode
        with contextlib.suppress(QemuExited):
            await self.qmp.execute("quit", timeout=timeout)
        return await self.wait(timeout) if self._proc is not None else None

    # ------------------------------------------------------------------ teardown

    async def close(self) -> None:
        """Tear down: QEMU quits (or is killed), sockets, runtime dir and RAM file removed.

        Safe to call twice and from error paths; if cancelled it still kills QEMU before
        re-raising.
        """
        await self._teardown()

    async def _teardown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._set_state(VmState.STOPPING)
        try:
            if self.owned and self._proc is not None and self._proc.returncode is None:
                await self._stop_process()
        except asyncio.CancelledError:
            self._kill_now()
            raise
        finally:
            for task in self._tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks.clear()
            with contextlib.suppress(asyncio.CancelledError):
                await self.console.close()
                await self.qmp.disconnect()
            self._release_files()
            self._set_state(VmState.EXITED)

    async def _stop_process(self) -> None:
        assert self._proc is not None
        if self.qmp.connected:
            with contextlib.suppress(QemuError, asyncio.TimeoutError):
                await self.qmp.execute("quit", timeout=2.0)
        for sig, grace in ((None, 3.0), (signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    self._proc.send_signal(sig)
            try:
                await asyncio.wait_for(self._proc.wait(), grace)
                return
            except TimeoutError:
                continue

    def _kill_now(self) -> None:
        """Synchronous last resort (cancellation, atexit): SIGKILL and remove files."""
        if self.owned and self._res.pid is not None and (self._proc is None or self._proc.returncode is None):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self._res.pid, signal.SIGKILL)
        self._release_files()

    def _release_files(self) -> None:
        if self._ram is not None:
            self._ram.close()
            self._ram = None
        for nv_ram in self._nvdimm_ram:
            nv_ram.close()
        self._nvdimm_ram.clear()
        if self.owned:
            if self._res.ram_file is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._res.ram_file)
                self._res.ram_file = None
            for path in self._res.nvdimm_files:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            self._res.nvdimm_files.clear()
            if self._res.runtime_dir is not None:
                shutil.rmtree(self._res.runtime_dir, ignore_errors=True)
                self._res.runtime_dir = None
        _live.discard(self)


def _find_memfd(pid: int, size: int) -> str:
    """``/proc/PID/fd/N`` of the memfd backing guest RAM in process ``pid``."""
    fd_dir = Path(f"/proc/{pid}/fd")
    matches = []
    try:
        for entry in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(entry).startswith("/memfd:memory-backend-memfd") and entry.stat().st_size == size:
                    matches.append(str(entry))
    except OSError as err:
        raise AttachError(f"cannot list {fd_dir} to find guest RAM: {err.strerror}") from err
    if len(matches) != 1:
        raise AttachError(f"found {len(matches)} memfd backends of {size} bytes in QEMU pid {pid}; "
                          "give the RAM path explicitly")
    return matches[0]


def _peer_pid(socket_path: str) -> int | None:
    """PID of the process listening on a unix socket (SO_PEERCRED), or None if unknown.

    Raises ``AttachError`` when nothing listens there, before any QMP handshake is tried.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(5.0)
        try:
            probe.connect(socket_path)
        except OSError as err:
            raise AttachError(f"cannot connect to QMP socket {socket_path}: {err.strerror or err}") from err
        creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        probe.settimeout(2.0)           # QEMU greets at once; a busy socket (one client) stays silent
        greeting = b""
        with contextlib.suppress(OSError):
            while b"\n" not in greeting and len(greeting) < 4096 and (chunk := probe.recv(4096)):
                greeting += chunk
    if greeting and not greeting.lstrip().startswith(b'{"QMP"'):
        first = greeting.splitlines()[0][:60].decode(errors="replace")
        raise AttachError(f"{socket_path} is not a QEMU QMP socket (it greeted with {first!r}); give the "
                          "socket of QEMU's -mon chardev=...,mode=control (libvirt: .../monitor.sock)")
    pid, _uid, _gid = struct.unpack("3i", creds)
    return pid or None

