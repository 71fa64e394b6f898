"""QMP on top of ``qemu.qmp``: our errors at the boundary, HMP passthrough, scoped event listeners."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any
from collections.abc import AsyncIterator, Iterator

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError, Runstate

from ..errors import AttachError, QemuExited, QmpCommandError, logged


class Monitor:
    """A QMP connection to one QEMU."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._client = QMPClient(name)

    async def connect(self, socket_path: str, timeout: float = 10.0) -> None:
        """Connect and negotiate; ``AttachError`` if nobody answers (dead or busy socket)."""
        try:
            await asyncio.wait_for(self._client.connect(socket_path), timeout)
        except TimeoutError as err:
            await self._abort()
            raise AttachError(f"QMP socket {socket_path}: no greeting within {timeout:g} s "
                              "(another client connected, or not a QMP socket?)") from err
        except (QMPError, OSError) as err:
            await self._abort()
            cause = getattr(err, "exc", None) or err  # ConnectError wraps the OSError
            raise AttachError(f"cannot connect to QMP socket {socket_path}: {cause}") from err

    async def _abort(self) -> None:
        with logged(__name__, "disconnecting QMP"):
            await self._client.disconnect()

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout: float | None = 60.0) -> Any:
        """Run a QMP command; ``QmpCommandError`` if QEMU refuses, ``QemuExited`` if it is gone."""
        try:
            coro = self._client.execute(command, arguments)
            return await (asyncio.wait_for(coro, timeout) if timeout else coro)
        except ExecuteError as err:
            raise QmpCommandError(command, err.error_class, str(err)) from err
        except (QMPError, EOFError, ConnectionError) as err:
            raise QemuExited(f"QMP {command}: connection lost ({err or type(err).__name__})") from err

    async def pass_fd(self, fd: int, name: str) -> None:
        """Hand QEMU a file descriptor (SCM_RIGHTS + ``getfd``) under ``name``, e.g. for an
        ``fd:NAME`` migration URI. The caller keeps (and closes) its own copy."""
        try:
            self._client.send_fd_scm(fd)
        except (QMPError, OSError) as err:
            raise QemuExited(f"passing a file descriptor to QEMU failed: {err}") from err
        await self.execute("getfd", {"fdname": name})

    async def add_fd(self, fd: int, fdset: int) -> None:
        """Put a duplicate of ``fd`` (SCM_RIGHTS + ``add-fd``) into QEMU's fd set ``fdset``: QEMU
        then opens ``/dev/fdset/N`` as that very open file. The caller keeps its own copy."""
        try:
            self._client.send_fd_scm(fd)
        except (QMPError, OSError) as err:
            raise QemuExited(f"passing a file descriptor to QEMU failed: {err}") from err
        await self.execute("add-fd", {"fdset-id": fdset})

    async def hmp(self, command_line: str) -> str:
        """An HMP command through QMP (``info mtree -f``, ``info registers``, ...)."""
        return str(await self.execute("human-monitor-command", {"command-line": command_line}))

    @contextlib.contextmanager
    def listen(self, *names: str) -> Iterator[AsyncIterator[dict[str, Any]]]:
        """Events named ``names`` (all if none) while the block runs::

            with vm.qmp.listen("STOP") as events:
                await vm.qmp.execute("stop")
                event = await anext(events)
        """
        listener = EventListener(list(names) or None)
        with self._client.listen(listener):
            yield _events(listener)

    async def disconnect(self) -> None:
        with contextlib.suppress(QMPError, EOFError, ConnectionError, OSError):
            await self._client.disconnect()

    @property
    def connected(self) -> bool:
        return self._client.runstate == Runstate.RUNNING


async def _events(listener: EventListener) -> AsyncIterator[dict[str, Any]]:
    async for event in listener:
        yield dict(event)
