#!/usr/bin/env python3
"""Probe: hostile vhost-user peers against the vhost-user-blk backend (issue 22, item 3).

Each case starts the standalone backend (``python -m qemu_mktme.vhost``) as its own process,
attacks it as a hostile front end would, and checks that a well-behaved front end (the
hand-written one of ``tests/vhost/fake_driver.py``) is still served within a bound, that the
backend neither died nor spun a core, and that it kept its address space:

- ``full-call``: the call fd is a blocking eventfd at its maximum counter;
- ``idle``: silent connections, beyond the connection bound, before the good client;
- ``half-sent``: connections that send part of a header or of a payload and stop;
- ``dead-kick``: the kick fd is a pipe whose writer closed (EOF/HUP forever);
- ``tables``: many SET_MEM_TABLEs of 64 MiB each (VmSize must stay flat);
- ``truncated``: an unsealed memfd, truncated to 64 KiB after SET_MEM_TABLE, then a request
  (SIGBUS on access), and a sealed memfd smaller than its region;
- ``other-uid``: a peer of another uid (root only) connecting to the socket.

    .venv/bin/python scripts/probe_vhost.py                 # full counts; a line per case, exit 1 on a violation
    .venv/bin/python scripts/probe_vhost.py --case idle --idle 200
    PROBE_VHOST_CODE=/some/checkout .venv/bin/python scripts/probe_vhost.py   # attack another checkout's backend

``tests/vhost/test_hostile_peers.py`` runs every case with small counts in the suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import mmap
import os
import socket
import stat
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "vhost"))
sys.path.insert(0, str(ROOT))
from fake_driver import F_NEXT, F_WRITE, HEADER, FakeDriver, connect_unix, sealed_memfd  # noqa: E402

from qemu_mktme.qemu.machine import set_pdeathsig  # noqa: E402
from qemu_mktme.vhost import protocol as p  # noqa: E402

T_IN, T_OUT, T_FLUSH = 0, 1, 4
FULL = 0xFFFF_FFFF_FFFF_FFFE           # an eventfd counter's maximum: one more write blocks


def _scale() -> float:
    return float(os.environ.get("QEMU_MKTME_TIME_SCALE", "1") or 1)


class Backend:
    """The standalone backend as its own process, on a socket in a private directory."""

    def __init__(self, workdir: Path, *, message_deadline: float = 2.0, idle_deadline: float = 3.0,
                 max_connections: int = 8, disk_size: int = 4 << 20) -> None:
        self.dir = workdir
        self.disk = workdir / "disk.img"
        self.sock = workdir / "blk.sock"
        with open(self.disk, "wb") as f:
            f.truncate(disk_size)
        self.args = ["--message-deadline", str(message_deadline), "--idle-deadline", str(idle_deadline),
                     "--max-connections", str(max_connections)]
        self.proc: asyncio.subprocess.Process | None = None
        self.output = b""

    async def start(self) -> None:
        code = Path(os.environ.get("PROBE_VHOST_CODE", str(ROOT)))
        # an older backend without the deadline options gets its defaults
        args = self.args if "--idle-deadline" in (code / "qemu_mktme/vhost/__main__.py").read_text() else []
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "qemu_mktme.vhost", "--socket", str(self.sock), "--disk", str(self.disk),
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=self.dir,
            env=dict(os.environ, PYTHONPATH=str(code)), preexec_fn=set_pdeathsig)   # dies with the probe
        assert self.proc.stdout is not None
        while b"listening" not in (line := await asyncio.wait_for(self.proc.stdout.readline(), 20 * _scale())):
            if not line:
                raise RuntimeError(f"the backend did not start: {self.output.decode(errors='replace')}")
            self.output += line
        self._drain = asyncio.create_task(self._read_output())

    async def _read_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.output += line

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def vmsize(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmSize")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10 * _scale())
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self.proc is not None:
            await asyncio.sleep(0)
            self._drain.cancel()


@contextlib.asynccontextmanager
async def backend(**kw: float) -> AsyncIterator[Backend]:
    with tempfile.TemporaryDirectory(prefix="probe-vhost-") as tmp:
        os.chmod(tmp, 0o711)                     # another uid may reach the socket's own mode bits
        b = Backend(Path(tmp), **kw)             # type: ignore[arg-type]
        await b.start()
        try:
            yield b
        finally:
            await b.stop()


async def served(b: Backend, within: float) -> str | None:
    """A well-behaved front end gets its memory table, a write, a read back and a flush done
    within ``within`` seconds; None, or what went wrong."""
    d = FakeDriver(str(b.sock))
    data = os.urandom(4096)
    try:
        async def session() -> None:
            await d.setup()
            assert (await d.request(T_OUT, 8, data, seconds=within))[0] == 0, "write failed"
            status, _, back = await d.request(T_IN, 8, length=4096, seconds=within)
            assert status == 0 and back == data, "read back differs"
            assert (await d.request(T_FLUSH, 0, seconds=within))[0] == 0, "flush failed"
        await asyncio.wait_for(session(), within)
        return None
    except TimeoutError:
        return f"a well-behaved front end was not served within {within:.1f} s"
    except (AssertionError, OSError, EOFError) as err:
        return f"a well-behaved front end failed: {type(err).__name__}: {err}"
    finally:
        d.close()


async def query(b: Backend, within: float) -> bool:
    """Whether a new connection gets GET_FEATURES answered within ``within`` seconds."""
    loop = asyncio.get_running_loop()
    try:
        s = await connect_unix(str(b.sock), within)
    except (OSError, TimeoutError):
        return False
    try:
        await loop.sock_sendall(s, p.encode(p.Req.GET_FEATURES))
        return len(await asyncio.wait_for(loop.sock_recv(s, 64), within)) >= 20
    except (TimeoutError, OSError):
        return False
    finally:
        s.close()


async def connect(b: Backend) -> socket.socket:
    return await connect_unix(str(b.sock), 10 * _scale())


async def closed_by_peer(s: socket.socket, within: float) -> bool:
    try:
        return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(s, 64), within) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


# ---------------------------------------------------------------------------------------- cases

async def case_full_call(b: Backend, within: float) -> list[str]:
    """A blocking call eventfd at its maximum: the request completes, everyone is answered."""
    problems = []
    d = FakeDriver(str(b.sock))
    os.close(d.call)
    d.call = os.eventfd(0)                          # blocking, as a hostile front end may pass it
    os.eventfd_write(d.call, FULL)
    try:
        await asyncio.wait_for(d.setup(), within)
        for i in range(3):
            status = (await d.request(T_OUT, i, os.urandom(512), seconds=within))[0]
            if status:
                problems.append(f"request {i} failed ({status})")
        if not await query(b, within):
            problems.append("a second connection got no answer after a signal to a full call eventfd")
        try:
            await asyncio.wait_for(d.send(p.Req.GET_FEATURES, reply=True), within)
        except (TimeoutError, OSError, EOFError):
            problems.append("the front end with the full call eventfd got no answer")
    except (TimeoutError, AssertionError, OSError, EOFError) as err:
        problems.append(f"front end with a full call eventfd: {type(err).__name__}: {err}")
    finally:
        d.close()
    return problems


async def case_idle(b: Backend, within: float, count: int = 12) -> list[str]:
    """``count`` silent connections (more than the bound) opened first; a well-behaved client
    is served; a silent non-owner is closed after the idle deadline."""
    socks = [await connect(b) for _ in range(count)]
    try:
        why = await served(b, within)
        problems = [f"with {count} idle connections open: {why}"] if why else []
        if not await closed_by_peer(socks[-1], 3.0 * 2 * _scale() + within):
            problems.append("a silent connection was never closed (idle deadline)")
        return problems
    finally:
        for s in socks:
            s.close()


async def case_half_sent(b: Backend, within: float, count: int = 4) -> list[str]:
    """Connections that stop inside a header or a payload; the good client is served meanwhile
    and each half-sent connection is closed after the message deadline."""
    loop = asyncio.get_running_loop()
    socks = []
    for i in range(count):
        s = await connect(b)
        if i % 2:
            await loop.sock_sendall(s, p.encode(p.Req.SET_FEATURES, struct.pack("<Q", 0))[:6])          # half a header
        else:
            await loop.sock_sendall(s, p.encode(p.Req.SET_VRING_NUM, struct.pack("<II", 0, 64))[:15])  # half a payload
        socks.append(s)
    try:
        why = await served(b, within)
        problems = [f"with {count} half-sent messages pending: {why}"] if why else []
        for s in socks:
            if not await closed_by_peer(s, 2.0 * 2 * _scale() + within):
                problems.append("a half-sent message kept its connection open past the deadline")
                break
        return problems
    finally:
        for s in socks:
            s.close()


async def _attack(b: Backend, within: float, what: str, d: FakeDriver,
                  body: Callable[[list[str]], Awaitable[None]]) -> list[str]:
    """Run ``body`` (which notes problems) with front end ``d``, close it, then check that a
    well-behaved front end is served."""
    problems: list[str] = []
    try:
        await body(problems)
    except (TimeoutError, AssertionError, OSError, EOFError) as err:
        problems.append(f"{what}: {type(err).__name__}: {err}")
    finally:
        d.close()
    why = await served(b, within)
    return problems + ([f"after {what}: {why}"] if why else [])


async def case_dead_kick(b: Backend, within: float, watch: float = 1.5) -> list[str]:
    """A kick pipe whose writer closed: the queue stops, no core spins, others are served."""
    d = FakeDriver(str(b.sock))
    r, w = os.pipe()
    os.close(d.kick)
    d.kick = r

    async def body(problems: list[str]) -> None:
        await asyncio.wait_for(d.setup(), within)
        os.close(w)
        before, t0 = b.cpu_seconds(), time.monotonic()
        await asyncio.sleep(watch)
        busy = (b.cpu_seconds() - before) / (time.monotonic() - t0)
        if busy > 0.3:
            problems.append(f"the backend spun at {busy:.0%} of a core on a hung-up kick pipe")
        if not await query(b, within):
            problems.append("a second connection got no answer after the kick pipe hung up")
    return await _attack(b, within, "a dead kick pipe", d, body)


async def case_tables(b: Backend, within: float, tables: int = 30, size: int = 64 << 20) -> list[str]:
    """``tables`` memory tables of ``size`` bytes each: VmSize stays flat, the device serves."""
    d = FakeDriver(str(b.sock), ram_size=size)

    async def body(problems: list[str]) -> None:
        await asyncio.wait_for(d.setup(), within)
        first = b.vmsize()
        for _ in range(tables):
            fd = sealed_memfd(size)
            try:
                await d.send(p.Req.SET_MEM_TABLE, struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, size, 0x7F00_0000_0000, 0),
                             fds=(fd,))
            finally:
                os.close(fd)
            await asyncio.wait_for(d.send(p.Req.GET_FEATURES, reply=True), within)
        grew = b.vmsize() - first
        if grew > size // 2:
            problems.append(f"VmSize grew by {grew >> 20} MiB over {tables} tables of {size >> 20} MiB")
    return await _attack(b, within, f"{tables} memory tables", d, body)


async def case_truncated(b: Backend, within: float) -> list[str]:
    """An unsealed memfd truncated under the mapping, then a request; a sealed memfd smaller
    than its region. The backend lives and serves the next client."""
    problems = []
    d = FakeDriver(str(b.sock), sealed=False)
    try:
        with contextlib.suppress(TimeoutError, AssertionError, OSError, EOFError):
            await asyncio.wait_for(d.setup(), within)
            # a request made available (rings at 64 KiB and up), then the memory cut to 64 KiB
            d.write(HEADER, struct.pack("<IIQ", T_IN, 0, 0))
            d.desc(0, HEADER, 16, F_NEXT, 1)
            d.desc(1, HEADER + 0x200, 4096, F_WRITE | F_NEXT, 2)
            d.desc(2, HEADER + 0x100, 1, F_WRITE)
            d.make_available(0, kick=False)
            d.ram.close()                          # this process no longer touches that memory
            os.ftruncate(d.memfd, 64 << 10)
            os.eventfd_write(d.kick, 1)
            await asyncio.sleep(min(within, 2.0))
    finally:
        d.ram = mmap.mmap(-1, 4096) if d.ram.closed else d.ram
        d.close()
    await asyncio.sleep(0.2)
    if not b.alive:
        problems.append(f"the backend died (exit {b.proc.returncode if b.proc else '?'}) after a truncated memfd")
        return problems
    small = sealed_memfd(64 << 10)
    s = await connect(b)
    try:
        s.sendmsg([p.encode(p.Req.SET_MEM_TABLE, struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, 8 << 20, 0, 0))],
                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("<i", small))])
        if not await closed_by_peer(s, within):
            problems.append("a memfd smaller than its region was not refused")
    finally:
        s.close()
        os.close(small)
    if not b.alive:
        problems.append("the backend died on a memfd smaller than its region")
    why = await served(b, within)
    return problems + ([f"after truncated memory: {why}"] if why else [])


async def case_other_uid(b: Backend, within: float) -> list[str]:
    """A peer of another uid (nobody) cannot connect (the socket is 0600)."""
    if os.geteuid() != 0:
        return []                                # cannot become another uid: nothing to try
    mode = stat.S_IMODE(os.stat(b.sock).st_mode)
    problems = [f"socket mode {mode:o}, expected 600"] if mode != 0o600 else []
    code = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
            "try:\n s.connect(sys.argv[1])\nexcept PermissionError:\n sys.exit(3)\nsys.exit(0)")
    proc = await asyncio.create_subprocess_exec("/usr/bin/python3", "-c", code, str(b.sock), user=65534, group=65534)
    rc = await asyncio.wait_for(proc.wait(), within)
    if rc != 3:
        problems.append(f"a peer of uid 65534 was not refused (exit {rc})")
    return problems


CASES: dict[str, Callable[..., Awaitable[list[str]]]] = {
    "full-call": case_full_call, "idle": case_idle, "half-sent": case_half_sent, "dead-kick": case_dead_kick,
    "tables": case_tables, "truncated": case_truncated, "other-uid": case_other_uid,
}


async def run_case(name: str, within: float, **kw: int) -> list[str]:
    """One case on a fresh backend; its problems (empty: it held)."""
    async with backend() as b:
        try:
            problems = await CASES[name](b, within, **kw)
        except (OSError, TimeoutError, EOFError) as err:
            problems = [f"the attack itself failed: {type(err).__name__}: {err}"]
        if not b.alive:
            problems.append(f"the backend exited ({b.proc.returncode if b.proc else '?'})")
        return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=sorted(CASES), action="append", help="run only these (repeatable)")
    ap.add_argument("--within", type=float, default=5.0, help="seconds a well-behaved client may wait")
    ap.add_argument("--idle", type=int, default=64, help="silent connections in the idle case")
    ap.add_argument("--half", type=int, default=16, help="half-sent connections")
    ap.add_argument("--tables", type=int, default=100, help="memory tables of 64 MiB")
    args = ap.parse_args()
    extra = {"idle": {"count": args.idle}, "half-sent": {"count": args.half}, "tables": {"tables": args.tables}}
    failed = 0
    for name in args.case or list(CASES):
        t0 = time.monotonic()
        problems = asyncio.run(run_case(name, args.within * _scale(), **extra.get(name, {})))
        print(f"{name:10} {'FAIL' if problems else 'ok':4} {time.monotonic() - t0:5.1f} s  {'; '.join(problems)}",
              flush=True)
        failed += bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
