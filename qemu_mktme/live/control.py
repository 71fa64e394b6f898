"""The control socket of a running ``qemu-mktme run``: how other commands reach its host model.

The emulated host (key service, KeyID table, DRAM views) lives in the process that runs the
VMs, so ``qemu-mktme query`` (and ``dump``, ``snapshot``) talk to it over a unix socket in a
private directory (0700, per user): one JSON request per line, one JSON answer per line.

    {"cmd": "query"}                 -> {"ok": true, "result": {...}}
    {"cmd": "nope"}                  -> {"ok": false, "error": "unknown command 'nope' (...)"}

Long commands may first send ``{"progress": [done, total]}`` lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..errors import AttachError, MktmeError, remote_error
from ..files import Progress
from ..files import runtime

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any], Progress], Awaitable[Any]]
"""handler(request, progress) -> result; progress(done, total) streams progress lines."""
MAX_REQUEST = 1 << 20


def control_dir() -> Path:
    """The private runtime parent (``$XDG_RUNTIME_DIR/qemu-mktme`` or ``/tmp/qemu-mktme-<uid>``, 0700)."""
    try:
        return runtime.private_parent()
    except PermissionError as err:
        raise AttachError(str(err)) from None


class ControlServer:
    """Serves ``handlers`` (name -> async callable taking the request) on ``<dir>/<pid>.sock``."""

    def __init__(self, handlers: dict[str, Handler], path: Path | None = None, name: str | None = None) -> None:
        self.handlers = handlers
        self.path = path or control_dir() / f"{os.getpid()}.sock"
        self.name = name                  # the host's name: ``<pid>.name`` beside the socket
        self._server: asyncio.AbstractServer | None = None

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
            try:
                await self._server.wait_closed()
            except Exception as err:  # noqa: BLE001  the socket goes away below either way
                log.warning("control socket %s: closing: %s", self.path, err)
        for path in (self.path, self.path.with_suffix(".name")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                def progress(done: int, total: int) -> None:
                    writer.write(json.dumps({"progress": [done, total]}).encode() + b"\n")
                answer = await self._answer(line, progress)
                writer.write(json.dumps(answer, default=str).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        except asyncio.CancelledError:    # the host is stopping with a client still connected
            pass
        finally:
            writer.close()

    async def _answer(self, line: bytes, progress: Callable[[int, int], None]) -> dict[str, Any]:
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                raise ValueError("a request is a JSON object with a string 'cmd'")
            handler = self.handlers.get(request["cmd"])
            if handler is None:
                raise ValueError(f"unknown command {request['cmd']!r} (known: {', '.join(sorted(self.handlers))})")
            return {"ok": True, "result": await handler(request, progress)}
        except (MktmeError, ValueError, OSError) as err:
            return {"ok": False, "error": str(err), "type": type(err).__name__}


def running_hosts() -> list[Path]:
    """Control sockets of live ``qemu-mktme run`` processes of this user (stale ones removed)."""
    out = []
    for sock in sorted(control_dir().glob("*.sock")):
        pid = sock.stem
        if pid.isdigit() and Path(f"/proc/{pid}").exists():
            out.append(sock)
        else:
            for path in (sock, sock.with_suffix(".name")):
                with contextlib.suppress(OSError):
                    path.unlink()
    return out


def host_name(sock: Path) -> str | None:
    """The name a running host was given (``run --host-name``, ``host start NAME``), if any."""
    try:
        return sock.with_suffix(".name").read_text()
    except OSError:
        return None


async def request(cmd: str, *, pid: int | None = None, host: str | None = None, timeout: float = 600.0,
                  progress: Callable[[int, int], None] | None = None, **args: Any) -> Any:
    """Send one command to a running host (the only one, ``pid``'s, or the one named ``host``); its result.

    ``AttachError`` when there is no such host; an error it answers is raised as its own class
    (:func:`~qemu_mktme.errors.remote_error`).
    """
    socks = running_hosts()
    if pid is not None:
        socks = [s for s in socks if s.stem == str(pid)]
    if host is not None:
        socks = [s for s in socks if host_name(s) == host]
    if not socks:
        raise AttachError("no running 'qemu-mktme run' found" + (f" with pid {pid}" if pid else "")
                          + (f" named {host!r}" if host else ""))
    if len(socks) > 1:
        raise AttachError(f"{len(socks)} hosts are running (pids {', '.join(s.stem for s in socks)}); choose one with --pid")
    try:
        reader, writer = await asyncio.open_unix_connection(str(socks[0]), limit=64 << 20)
    except OSError as err:
        raise AttachError(f"cannot reach {socks[0]}: {err.strerror}") from err
    try:
        writer.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        await writer.drain()
        while True:
            line = await asyncio.wait_for(reader.readline(), timeout)
            if not line:
                raise AttachError(f"host {socks[0].stem} closed the connection")
            answer = json.loads(line)
            if "progress" not in answer:
                break
            if progress is not None:
                progress(*answer["progress"])
    finally:
        writer.close()
    if not answer.get("ok"):            # the error's own class, as a RemoteError
        raise remote_error(str(answer.get("type")), f"host {socks[0].stem}: {answer.get('error')}")
    return answer["result"]
