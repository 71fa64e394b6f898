"""One started virtqueue served by the compiled dataplane (``native/vhost_dp.c``) in a thread.

The thread's body is one ctypes call, ``dp_run``, which owns the ring while it runs and comes
back only to stop or to hand the queue to the asyncio thread (a chain or a ring it must not
judge, a kick fd gone, a dead call fd). Then the thread copies the ring state into the queue's
:class:`~.virtqueue.Virtqueue`, posts ``on_event(code)`` to the loop and waits: the loop thread
serves what it must with the Python path, calls :meth:`resume` (which copies the state back)
and the thread calls ``dp_run`` again. All host-model code thus stays on the loop thread.

:meth:`stop` (loop thread) never deadlocks: it sets ``stopping`` (read by C between requests),
signals the stop eventfd (C's poll), releases a thread waiting for a hand-off, and joins.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
from collections.abc import Callable

from .native import STOPPED, Mirror, QueueState
from .virtqueue import Virtqueue


class QueueThread:
    """The dataplane thread of one queue (``start`` after construction, ``stop`` to end it)."""

    def __init__(self, lib: ctypes.CDLL, mirror: Mirror, ring: Virtqueue, *, name: str, kick: int, call: int,
                 disk: int, buffered: int, capacity: int, readonly: bool, slow: bool,
                 on_event: Callable[[QueueThread, int], None], poll_max_ns: int = 0) -> None:
        self.lib, self.mirror, self.ring = lib, mirror, ring
        self.on_event = on_event
        self.loop = asyncio.get_running_loop()
        self.stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        s = self.state = QueueState()
        s.m = mirror.ptr
        s.desc, s.avail, s.used, s.num = ring.desc, ring.avail, ring.used, ring.num
        s.event_idx, s.indirect, s.max_bytes = int(ring.event_idx), int(ring.indirect), ring.max_bytes
        s.capacity, s.readonly, s.slow = capacity, int(readonly), int(slow)
        s.kick, s.call, s.stop, s.disk, s.buffered = kick, call, self.stop_fd, disk, buffered
        s.poll_max_ns = poll_max_ns
        self.to_c()
        self.stopping = False
        self._resume = threading.Event()
        self.thread = threading.Thread(target=self._body, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def to_c(self) -> None:
        """The ring state of the Python ``Virtqueue`` into C's (before ``dp_run``)."""
        s, r = self.state, self.ring
        s.last_avail, s.used_idx, s.signalled_used = r.last_avail, r.used_idx, r._signalled_used

    def _from_c(self) -> None:
        s, r = self.state, self.ring
        r.last_avail, r.used_idx, r._signalled_used, r._ready = s.last_avail, s.used_idx, s.signalled_used, 0

    def _body(self) -> None:
        _name_thread(self.thread.name)
        while True:
            code = self.lib.dp_run(ctypes.byref(self.state))
            self._from_c()
            if code == STOPPED or self.stopping:
                return
            self._resume.clear()
            if self.stopping:                      # stop() ran between the look above and clear()
                return
            try:
                self.loop.call_soon_threadsafe(self.on_event, self, code)
            except RuntimeError:                   # the loop is closed: nobody to hand to
                return
            self._resume.wait()
            if self.stopping:
                return

    def resume(self, call: int) -> None:
        """The loop thread is done with the queue: C takes it again (``call``: the call fd now)."""
        self.state.call = call
        self.to_c()
        self._resume.set()

    def set_slow(self, slow: bool) -> None:
        """Every request to Python (transfer hooks want each one) or back to C."""
        self.state.slow = int(slow)

    def stop(self) -> None:
        """End the thread (waiting for the request in flight); the ring state is in ``ring``."""
        self.stopping = True
        self.state.stopping = 1
        os.eventfd_write(self.stop_fd, 1)
        self._resume.set()
        if self.thread.ident is not None:
            self.thread.join(0.05)
            while self.thread.is_alive():       # blocked in a read or write the front end made blocking
                if self.thread.native_id is not None:
                    self.lib.dp_wake(self.thread.native_id)
                self.thread.join(0.05)
        os.close(self.stop_fd)


_PR_SET_NAME = 15


def _name_thread(name: str) -> None:
    """The OS thread's name (``top -H``, ``/proc/PID/task/TID/comm``), at most 15 bytes."""
    ctypes.CDLL(None).prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
