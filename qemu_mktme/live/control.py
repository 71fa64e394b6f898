"""The control socket of a running ``qemu-mktme run``: how other commands reach its host model.

The emulated host (key service, KeyID table, DRAM views) lives in the process that runs the
VMs, so ``qemu-mktme host query`` (and ``host dump``, ``snapshot``, ``host migrate``) talk to it over a unix
socket in a private directory (0700, per user): one JSON request per line, one JSON answer per
line, on a connection that may carry several requests.

    {"cmd": "query"}                 -> {"ok": true, "result": {...}}
    {"cmd": "nope"}                  -> {"ok": false, "error": "unknown command 'nope' (...)", "type": "ValueError"}

Long commands may first send ``{"progress": [done, total]}`` lines. Every request gets exactly
one answer: each command declares its arguments once (a :class:`Command` with its :class:`Arg`
table) and the server checks them before the handler runs, so a missing, unknown or mistyped
argument, JSON that is not an object, too long or nested too deeply is an ``{"ok": false, ...}``
line naming the argument, never a closed connection. ``type`` is the error's class name: the
client raises :class:`~qemu_mktme.errors.RemoteError` of that class (a ``SnapshotError`` stays one).

Connections are served concurrently, at most :data:`MAX_CONNECTIONS` at a time. Past the bound a
newcomer takes the slot of an idle connection (no request in flight, owning nothing), as the
tenant's broker does: one that never asked anything first, then the one idle the longest; it gets
a ``HostBusy`` line and is closed. Only when every slot has a request in flight or owns state is
the newcomer answered ``HostBusy`` and closed. A connection must send its first request within
``first_request_timeout`` seconds and later ones within ``idle_timeout``, and a request begun
must be complete within ``request_timeout`` seconds, so a silent, half-sent or flooding peer costs
only its own connection. A connection may *own* state on the host (an incoming migration it set
up, :meth:`Connection.own`): that state is torn down when the connection goes away, whatever the
reason (its client killed); the idle deadline does not apply and it is not evicted while it owns
something.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AttachError, MktmeError, RemoteError, remote_error
from ..files import runtime

log = logging.getLogger(__name__)

MAX_REQUEST = 1 << 20
MAX_CONNECTIONS = 64
"""Connections served at a time; past it a newcomer takes an idle connection's slot."""
IDLE_TIMEOUT = 120.0
"""Seconds a connection that owns nothing may stay silent between requests."""
FIRST_REQUEST_TIMEOUT = 5.0
"""Seconds a new connection has to begin its first request (every client asks at once)."""
REQUEST_TIMEOUT = 10.0
"""Seconds a request has, from its first byte, to arrive whole (its newline)."""
WRITE_TIMEOUT = 30.0
"""Seconds an answer may wait for a client that does not read."""


def control_dir() -> Path:
    """The private runtime parent (``$XDG_RUNTIME_DIR/qemu-mktme`` or ``/tmp/qemu-mktme-<uid>``, 0700)."""
    try:
        return runtime.private_parent()
    except PermissionError as err:
        raise AttachError(str(err)) from None


# ---------------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Arg:
    """One argument of a command: the JSON types it may have, whether it must be given, and a
    conversion (``convert(value) -> value``; its ``ValueError``/``TypeError``/``KeyError`` is
    a refusal naming the argument)."""

    kinds: tuple[type, ...]
    required: bool = False
    convert: Callable[[Any], Any] | None = None

    def parse(self, value: Any) -> Any:
        if value is None and not self.required:
            return None
        if isinstance(value, bool) and bool not in self.kinds:
            raise TypeError(f"expected {_kinds(self.kinds)}, got a boolean")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("not a finite number")
        if not isinstance(value, self.kinds):
            raise TypeError(f"expected {_kinds(self.kinds)}, got {_json_kind(value)}")
        return self.convert(value) if self.convert is not None else value


def _kinds(kinds: tuple[type, ...]) -> str:
    return " or ".join(_json_kind(k) for k in kinds)


def _json_kind(value: Any) -> str:
    kind = value if isinstance(value, type) else type(value)
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list",
             dict: "an object", type(None): "null"}
    return names.get(kind, kind.__name__)


def string_list(value: list[Any]) -> list[str]:
    if not all(isinstance(v, str) for v in value):
        raise TypeError("expected a list of strings")
    return list(value)


STR = Arg((str,))
STR_REQUIRED = Arg((str,), required=True)
BOOL = Arg((bool,))
STR_LIST = Arg((list,), convert=string_list)


@dataclass(frozen=True)
class Command:
    """A control command: its handler and its argument table (``cmd`` itself excluded)."""

    handler: Handler
    args: Mapping[str, Arg] = field(default_factory=dict)

    def parse(self, name: str, request: dict[str, Any]) -> dict[str, Any]:
        """The request's arguments, checked and converted (absent optional ones are None)."""
        unknown = sorted(set(request) - set(self.args) - {"cmd"})
        if unknown:
            known = ", ".join(sorted(self.args)) or "none"
            raise ValueError(f"{name}: unknown argument {unknown[0]!r} (known: {known})")
        out: dict[str, Any] = {}
        for key, arg in self.args.items():
            if arg.required and key not in request:
                raise ValueError(f"{name}: missing argument {key!r}")
            try:
                out[key] = arg.parse(request.get(key))
            except (TypeError, ValueError, KeyError) as err:
                detail = f"missing field {err}" if isinstance(err, KeyError) else str(err)
                raise ValueError(f"{name}: argument {key!r}: {detail}") from None
        return out


class Connection:
    """One client connection as a handler sees it: progress lines, and state it owns."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._owned: dict[str, Callable[[], Awaitable[object]]] = {}

    def progress(self, done: int, total: int) -> None:
        """Send a ``{"progress": [done, total]}`` line (dropped if the client went away)."""
        if not self._writer.is_closing():
            self._writer.write(json.dumps({"progress": [done, total]}).encode() + b"\n")

    def own(self, key: str, teardown: Callable[[], Awaitable[object]]) -> None:
        """``teardown()`` runs when this connection ends, unless :meth:`disown` ``key`` first."""
        self._owned[key] = teardown

    def disown(self, key: str) -> Callable[[], Awaitable[object]] | None:
        return self._owned.pop(key, None)

    @property
    def owns(self) -> bool:
        return bool(self._owned)

    async def close(self) -> None:
        for key, teardown in list(self._owned.items()):
            self._owned.pop(key, None)
            try:
                await teardown()
            except (MktmeError, OSError) as err:
                log.warning("control connection gone: tearing down %s: %s", key, err)


Handler = Callable[[dict[str, Any], Connection], Awaitable[Any]]
"""handler(arguments, connection) -> result (JSON-ready); arguments as its :class:`Command` parsed them."""


@dataclass(eq=False)
class _Slot:
    """A connection being served: whether a request of it is in flight, when it last asked."""

    task: asyncio.Task[None]
    conn: Connection
    last: float
    asked: bool = False
    busy: bool = False
    evicted: bool = False

    def idle_since(self) -> tuple[bool, float] | None:
        """The eviction order (never asked first, then idle the longest); None if not evictable."""
        return None if self.busy or self.conn.owns else (self.asked, self.last)


class _Refused(Exception):
    """A request answered with an error and the connection closed (too long, timed out, busy)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


_servers = itertools.count()


def _free_path() -> Path:
    """``<dir>/<pid>.sock``, or ``<dir>/<pid>.hosts/<n>.sock`` for a further host in this process (a
    test harness; a directory of its own, so that a tool that knows only ``<pid>.sock`` leaves it be)."""
    n = next(_servers)
    if n == 0:
        return control_dir() / f"{os.getpid()}.sock"
    more = control_dir() / f"{os.getpid()}.hosts"
    more.mkdir(mode=0o700, exist_ok=True)
    return more / f"{n}.sock"


def _pid_of(sock: Path) -> str:
    return sock.parent.name.split(".", 1)[0] if sock.parent.name.endswith(".hosts") else sock.stem


class ControlServer:
    """Serves ``commands`` (name -> :class:`Command`) on ``<dir>/<pid>.sock`` (:func:`_free_path`)."""

    def __init__(self, commands: dict[str, Command], path: Path | None = None, name: str | None = None, *,
                 idle_timeout: float = IDLE_TIMEOUT, request_timeout: float = REQUEST_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS, first_request_timeout: float = FIRST_REQUEST_TIMEOUT) -> None:
        self.commands = commands
        self.path = path or _free_path()
        self.name = name                  # the host's name: ``<pid>.name`` beside the socket
        self.idle_timeout = idle_timeout
        self.first_request_timeout = min(first_request_timeout, idle_timeout)
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self._server: asyncio.AbstractServer | None = None
        self._connections: dict[asyncio.Task[None], _Slot] = {}
        self.evicted = 0

    async def __aenter__(self) -> ControlServer:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._client, path=str(self.path), limit=MAX_REQUEST)
        os.chmod(self.path, 0o600)
        if self.name:
            tmp = self.path.with_suffix(".name.tmp")
            tmp.write_text(self.name)
            os.replace(tmp, self.path.with_suffix(".name"))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            if self._connections:
                await asyncio.wait(list(self._connections), timeout=30)
            try:
                await self._server.wait_closed()
            except OSError as err:  # the socket goes away below either way
                log.warning("control socket %s: closing: %s", self.path, err)
        for path in (self.path, self.path.with_suffix(".name")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if self.path.parent.name.endswith(".hosts"):
            with contextlib.suppress(OSError):              # (not empty: another host of this process)
                self.path.parent.rmdir()

    @property
    def connections(self) -> int:
        """Connections being served now."""
        return len(self._connections)

    def _evict(self) -> bool:
        """Free a slot by closing the idle connection first in :meth:`_Slot.idle_since`'s order;
        False when every connection has a request in flight or owns state."""
        idle = [(order, slot) for slot in self._connections.values() if (order := slot.idle_since()) is not None]
        if not idle:
            return False
        victim = min(idle, key=lambda pair: pair[0])[1]
        del self._connections[victim.task]
        victim.evicted = True
        victim.task.cancel()
        self.evicted += 1
        return True

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn = Connection(writer)
        slot = _Slot(task, conn, asyncio.get_running_loop().time())
        try:
            if len(self._connections) >= self.max_connections and not self._evict():
                raise _Refused(f"the host serves {self.max_connections} control connections, each with a "
                               "request in flight; try again", "HostBusy")
            self._connections[task] = slot
            while line := await self._read(reader, slot):
                slot.busy = slot.asked = True
                answer = await self._answer(line, conn)
                await self._send(writer, answer)
                slot.busy = False
                slot.last = asyncio.get_running_loop().time()
        except _Refused as err:
            with contextlib.suppress(ConnectionError, TimeoutError):
                await self._send(writer, {"ok": False, "error": str(err), "type": err.kind})
        except (ConnectionError, TimeoutError):
            pass
        except asyncio.CancelledError:    # the host is stopping with a client still connected, or evicted
            if slot.evicted and not writer.is_closing():
                writer.write(json.dumps({"ok": False, "error": f"idle connection closed for a newer one (the "
                                         f"host serves {self.max_connections} at a time)", "type": "HostBusy"}
                                        ).encode() + b"\n")
        finally:
            if self._connections.get(task) is slot:
                del self._connections[task]
            writer.close()
            await asyncio.shield(conn.close())

    async def _read(self, reader: asyncio.StreamReader, slot: _Slot) -> bytes:
        """The next request line (b"" at the end), within the connection's deadlines."""
        conn = slot.conn
        wait = None if conn.owns else self.idle_timeout if slot.asked else self.first_request_timeout
        try:
            first = await asyncio.wait_for(reader.read(1), wait)
        except TimeoutError:
            return b""                    # idle: closed without a word (it asked nothing)
        if not first or first == b"\n":
            return first
        try:
            rest = await asyncio.wait_for(reader.readline(), self.request_timeout)
        except TimeoutError:
            raise _Refused(f"request not completed within {self.request_timeout:g} s", "Timeout") from None
        except ValueError:                # asyncio: longer than the limit, no newline in it
            raise _Refused(f"request longer than {MAX_REQUEST} bytes", "ValueError") from None
        if not rest.endswith(b"\n"):
            return b""                    # the client closed in the middle of a request
        return first + rest

    async def _send(self, writer: asyncio.StreamWriter, answer: dict[str, Any]) -> None:
        try:
            data = json.dumps(answer, default=str).encode()
        except (TypeError, ValueError, RecursionError) as err:
            log.error("control answer not serialisable: %s", err)
            data = json.dumps({"ok": False, "error": f"the host could not encode its answer: {err}",
                               "type": "InternalError"}).encode()
        writer.write(data + b"\n")
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)

    async def _answer(self, line: bytes, conn: Connection) -> dict[str, Any]:
        try:
            try:
                request = json.loads(line)
            except RecursionError:
                raise ValueError("request nested too deeply") from None
            except ValueError as err:
                raise ValueError(f"not a JSON request: {err}") from None
            if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                raise ValueError("a request is a JSON object with a string 'cmd'")
            name = request["cmd"]
            command = self.commands.get(name)
            if command is None:
                raise ValueError(f"unknown command {name[:64]!r} (known: {', '.join(sorted(self.commands))})")
            args = command.parse(name, request)
            return {"ok": True, "result": await command.handler(args, conn)}
        except (MktmeError, ValueError, OSError) as err:
            kind = err.remote_type if isinstance(err, RemoteError) and err.remote_type else type(err).__name__
            return {"ok": False, "error": str(err), "type": kind}       # (a refusal passed on keeps its class)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001  logged with its traceback; the client gets one answer
            log.exception("control request failed: %s", err)
            return {"ok": False, "error": f"internal error: {type(err).__name__}: {err}", "type": "InternalError"}


# ---------------------------------------------------------------------------------- client


def running_hosts() -> list[Path]:
    """Control sockets of live ``qemu-mktme run`` processes of this user (stale ones removed)."""
    out = []
    parent = control_dir()
    for sock in sorted(parent.glob("*.sock")) + sorted(parent.glob("*.hosts/*.sock")):
        pid = _pid_of(sock)
        if pid.isdigit() and Path(f"/proc/{pid}").exists():
            out.append(sock)
        else:
            for path in (sock, sock.with_suffix(".name")):
                with contextlib.suppress(OSError):
                    path.unlink()
            if sock.parent != parent:
                with contextlib.suppress(OSError):          # (not empty: another host of it is there)
                    sock.parent.rmdir()
    return out


def host_name(sock: Path) -> str | None:
    """The name a running host was given (``run --host-name``, ``host start NAME``), if any."""
    try:
        return sock.with_suffix(".name").read_text()
    except OSError:
        return None


def find_host(*, pid: int | None = None, host: str | None = None) -> Path:
    """The control socket of the only running host, ``pid``'s, or the one named ``host``
    (``AttachError`` when there is none, or several)."""
    socks = running_hosts()
    if pid is not None:
        socks = [s for s in socks if _pid_of(s) == str(pid)]
    if host is not None:
        socks = [s for s in socks if host_name(s) == host]
    if not socks:
        raise AttachError("no running 'qemu-mktme run' found" + (f" with pid {pid}" if pid else "")
                          + (f" named {host!r}" if host else ""))
    if len(socks) > 1:
        raise AttachError(f"{len(socks)} hosts are running (pids {', '.join(_pid_of(s) for s in socks)}); "
                          "choose one with --pid or by name")
    return socks[0]


class ControlClient:
    """One connection to a running host, for several requests (what the connection sets up on
    the host, it owns: closing it tears that down)::

        async with await ControlClient.connect(host="h1") as c:
            port = (await c.call("migrate-incoming", config=..., tenant="t"))["port"]
    """

    def __init__(self, sock: Path, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sock = sock
        self.label = host_name(sock) or _pid_of(sock)
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, *, pid: int | None = None, host: str | None = None) -> ControlClient:
        """A connection to the only running host, ``pid``'s, or the one named ``host``."""
        return await cls.open(find_host(pid=pid, host=host))

    @classmethod
    async def open(cls, sock: Path) -> ControlClient:
        """A connection to the control socket at ``sock``."""
        try:
            reader, writer = await asyncio.open_unix_connection(str(sock), limit=64 << 20)
        except OSError as err:
            raise AttachError(f"cannot reach {sock}: {err.strerror}") from err
        return cls(sock, reader, writer)

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()

    async def call(self, cmd: str, *, timeout: float = 600.0, progress: Callable[[int, int], None] | None = None,
                   **args: Any) -> Any:
        """Send ``cmd`` and wait for its answer: its result, or :class:`~qemu_mktme.errors.RemoteError`
        of the class the host raised; ``AttachError`` if the host went away."""
        async with self._lock:
            try:
                self._writer.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
                await self._writer.drain()
                while True:
                    line = await asyncio.wait_for(self._reader.readline(), timeout)
                    if not line:
                        raise AttachError(f"host {self.label} closed the connection")
                    answer = json.loads(line)
                    if "progress" not in answer:
                        break
                    if progress is not None:
                        progress(*answer["progress"])
            except (ConnectionError, BrokenPipeError) as err:
                raise AttachError(f"host {self.label}: connection lost: {err}") from None
            except TimeoutError:
                raise AttachError(f"host {self.label} did not answer {cmd!r} within {timeout:g} s") from None
            except ValueError as err:
                raise AttachError(f"host {self.label} answered {cmd!r} with something not JSON: {err}") from None
        if not answer.get("ok"):
            raise remote_error(str(answer.get("type") or "RemoteError"), f"host {self.label}: {answer.get('error')}",
                               host=self.label)
        return answer["result"]


async def request(cmd: str, *, pid: int | None = None, host: str | None = None, timeout: float = 600.0,
                  progress: Callable[[int, int], None] | None = None, **args: Any) -> Any:
    """Send one command to a running host (the only one, ``pid``'s, or the one named ``host``); its result.

    ``AttachError`` when there is no such host or it went away; the host's refusal as
    :class:`~qemu_mktme.errors.RemoteError` of the refusal's own class.
    """
    async with await ControlClient.connect(pid=pid, host=host) as client:
        return await client.call(cmd, timeout=timeout, progress=progress, **args)
