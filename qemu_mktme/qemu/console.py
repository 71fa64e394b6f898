"""The guest's serial console: a transcript kept in memory, waits on it, and input to the guest.

The console is a QEMU ``socket`` chardev that we connect to before the vCPUs start, so nothing
the guest prints is lost. The transcript never goes to disk or to logs: it may hold guest
secrets that the user did not ask to have written anywhere.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable

from ..errors import ConsoleTimeout, QemuExited
import contextlib

TAIL_CHARS = 2000


class Console:
    """Transcript of a serial console with ``wait_for``; see :meth:`wait_for` for the cursor."""

    def __init__(self, name: str = "console") -> None:
        self.name = name
        self._chunks: list[str] = []
        self._text = ""
        self._dirty = False
        self._cursor = 0
        self._changed = asyncio.Condition()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._closed_reason: str | None = None
        self._exit_info: Callable[[], Awaitable[QemuExited]] | None = None
        self._pending_cr = False

    # ------------------------------------------------------------------ plumbing

    def attach(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               exit_info: Callable[[], Awaitable[QemuExited]] | None = None) -> None:
        """Start reading from a connected stream (done by the machine)."""
        self._writer = writer
        self._exit_info = exit_info
        self._reader_task = asyncio.create_task(self._pump(reader), name=f"{self.name}-reader")

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        try:
            while chunk := await reader.read(65536):
                self._append(chunk.decode("utf-8", errors="replace"))
                async with self._changed:
                    self._changed.notify_all()
        except (ConnectionError, OSError):
            pass
        finally:
            self._closed_reason = "console closed (QEMU exited?)"
            async with self._changed:
                self._changed.notify_all()

    def _append(self, text: str) -> None:
        # Normalise CRLF (and CR-only progress redraws) to "\n"-separated lines.
        if self._pending_cr:
            text = "\r" + text
            self._pending_cr = False
        if text.endswith("\r"):
            text, self._pending_cr = text[:-1], True
        text = text.replace("\r\n", "\n")
        self._chunks.append(text)
        self._dirty = True

    async def close(self) -> None:
        """Stop reading and close the stream; the transcript stays readable."""
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)
            self._reader_task = None
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()
            self._writer = None
        if self._closed_reason is None:
            self._closed_reason = "console closed"

    # ------------------------------------------------------------------ the user's side

    @property
    def transcript(self) -> str:
        """Everything the guest printed so far, lines separated by ``\\n``."""
        if self._dirty:
            self._text += "".join(self._chunks)
            self._chunks.clear()
            self._dirty = False
        return self._text

    def tail(self, nchars: int = TAIL_CHARS) -> str:
        return self.transcript[-nchars:]

    def mark(self) -> int:
        """The current end of the transcript, to wait for output after this point."""
        return len(self.transcript)

    async def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 30.0, *,
                       since: int | None = None) -> re.Match[str]:
        """Wait until ``pattern`` (a regex, multiline mode) appears in the transcript.

        Output arrives in chunks: end a pattern where the line ends (``\n`` or a fixed-width
        group), or it may match a line that is still arriving. The search starts at ``since`` if given, else where the previous successful wait ended,
        so consecutive waits consume output in order. Returns the match (positions are offsets
        into :attr:`transcript`). Raises ``ConsoleTimeout`` with the transcript tail after
        ``timeout`` seconds, or ``QemuExited`` if QEMU goes away first.
        """
        regex = re.compile(pattern, re.M) if isinstance(pattern, str) else pattern
        start = self._cursor if since is None else since
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with self._changed:
            while True:
                match = regex.search(self.transcript, start)
                if match:
                    self._cursor = match.end()
                    return match
                if self._reader_task is None or self._reader_task.done():
                    raise await self._gone(f"while waiting for {regex.pattern!r} on the console")
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise ConsoleTimeout(regex.pattern, timeout, self.tail())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)

    async def _gone(self, doing: str) -> QemuExited:
        if self._exit_info is not None:
            exc = await self._exit_info()
            return QemuExited(f"{exc.args[0]} {doing}", returncode=exc.returncode, stderr_tail=exc.stderr_tail)
        return QemuExited(f"{self._closed_reason or 'console not connected'} {doing}")

    async def write(self, text: str | bytes) -> None:
        """Send input to the guest (as if typed on the serial line)."""
        if self._writer is None or self._writer.is_closing():
            raise await self._gone("(cannot write to the console)")
        self._writer.write(text.encode() if isinstance(text, str) else text)
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as err:
            raise QemuExited(f"{self.name}: write failed: {err}") from err

    async def command(self, line: str, expect: str | re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        """Type ``line`` and Enter, then wait for ``expect`` in the output that follows."""
        since = self.mark()
        await self.write(line + "\r")
        return await self.wait_for(expect, timeout, since=since)
