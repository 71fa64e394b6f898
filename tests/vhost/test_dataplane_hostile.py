"""A hostile review of the compiled dataplane (qemu_mktme/vhost/native): a driver rewriting its
rings under the C thread, domain changes racing a stream, stop racing a hand-off, the counters
against the Python path's, a cached library that is not ours, and no thread, fd or mapping left
after a reset, a new memory table or a killed front end."""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import sys
import threading
import time

import pytest

from fake_driver import DATA, FakeDriver
from helpers import patience
from qemu_mktme.vhost import dataplane, native
from qemu_mktme.vhost.protocol import Req
from test_dataplane import Rig, chain, dp_threads

T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"no compiled dataplane: {native.status()}")


async def _sequence(d: FakeDriver) -> None:
    """IN, OUT, FLUSH, an indirect IN: what both paths serve alike."""
    await d.request(T_IN, 8, length=8192)
    await d.request(T_OUT, 16, os.urandom(4096))
    await d.request(T_FLUSH, 0)
    await d.request(T_IN, 8, length=4096, indirect=True)


async def _counted(tmp_path, monkeypatch, select: str) -> tuple[dict[str, int], dict[str, int], int]:
    monkeypatch.setenv(native.ENV_SELECT, select)
    monkeypatch.setattr(native, "_state", {})
    tmp = tmp_path / select
    tmp.mkdir()
    async with Rig(tmp) as rig:
        await _sequence(rig.driver)                  # first touches: the IOTLB and the mirror learn
        before = rig.assigned.counters.as_dict()
        requests = rig.device.counters["requests"]
        await _sequence(rig.driver)
        after = rig.assigned.counters.as_dict()
        served = rig.served
        return ({k: after[k] - before[k] for k in after}, {"requests": rig.device.counters["requests"] - requests},
                served)


async def test_dma_counters_are_the_python_paths(tmp_path, monkeypatch):
    """``run --trace`` prints these: the same requests count the same DMA on both paths."""
    python, python_req, _ = await _counted(tmp_path, monkeypatch, "python")
    compiled, compiled_req, served = await _counted(tmp_path, monkeypatch, "native")
    assert served >= 4
    assert compiled_req == python_req
    assert compiled == python


class _SlowClearEvent(threading.Event):
    """An Event whose clear() lingers when asked: widens the window between the queue thread's
    look at ``stopping`` and its wait for the loop."""

    slow = False
    hung: list[str] = []

    def clear(self) -> None:
        if _SlowClearEvent.slow:
            time.sleep(0.3)
        super().clear()

    def wait(self, timeout: float | None = None) -> bool:
        if super().wait(patience(2)):
            return True
        _SlowClearEvent.hung.append(threading.current_thread().name)
        return True                                  # let it go: the test fails, not hangs


async def test_a_stop_racing_a_hand_off_never_hangs_the_loop(tmp_path, monkeypatch):
    class Threading:
        Event = _SlowClearEvent
        Thread = threading.Thread
    monkeypatch.setattr(dataplane, "threading", Threading)
    _SlowClearEvent.hung = []
    async with Rig(tmp_path) as rig:
        d = rig.driver
        await d.request(T_IN, 0, length=4096)
        await d.request(T_IN, 0, length=4096)
        _SlowClearEvent.slow = True
        try:
            chain(d, 10, T_GET_ID, 0, DATA + 0x1000, 20, 1)    # C hands it to Python
            d.make_available(10)
            await asyncio.sleep(0.1)                         # the thread is in clear() now
            await d.send(Req.GET_VRING_BASE, struct.pack("<II", 0, 0), reply=True)
        finally:
            _SlowClearEvent.slow = False
        assert not dp_threads()
    assert _SlowClearEvent.hung == [], "the queue thread waited for a hand-off after stop() let it go"


def test_a_foreign_cached_library_is_rebuilt_not_a_crash(tmp_path, monkeypatch):
    """A shared object at the cache path that is not the dataplane (no dp_api_version)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("QEMU_MKTME_CACHE", str(cache))
    monkeypatch.delenv(native.ENV_SELECT, raising=False)
    path = native.build()
    other = tmp_path / "other.c"
    other.write_text("int something_else(void) { return 1; }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(path), str(other)], check=True)
    monkeypatch.setattr(native, "_state", {})
    lib = native.library()
    assert lib is not None and lib.dp_api_version() == native.API_VERSION
    path.unlink()                                        # and a truncated one, in a new process
    path.write_bytes(b"\x7fELF garbage")
    probe = "from qemu_mktme.vhost import native; print(native.library() is not None, native.status())"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         timeout=patience(30)).stdout
    assert out.startswith("True native dataplane"), out
