"""The incoming-domain guard (``virt/guard.py``) against a real QEMU: after its pipe ends without
``done`` it ends a QEMU still waiting for a migration stream, and leaves any other alone."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from helpers import patience
from qemu_mktme.qemu.binary import find_qemu
from qemu_mktme.virt import guard

pytestmark = pytest.mark.qemu


def _qemu(tmp_path, *extra: str) -> tuple[subprocess.Popen, str, socket.socket]:
    qmp = str(tmp_path / f"qmp-{len(list(tmp_path.iterdir()))}.sock")
    proc = subprocess.Popen([str(find_qemu().path), "-nodefaults", "-display", "none", "-machine", "q35", "-accel", "tcg",
                             "-m", "64", "-S", "-chardev", f"socket,id=q,path={qmp},server=on,wait=off",
                             "-mon", "chardev=q,mode=control", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + patience(10)
    while True:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(qmp)
            break
        except OSError:
            s.close()
            assert time.monotonic() < deadline and proc.poll() is None, "QEMU's monitor never came"
            time.sleep(0.02)
    return proc, qmp, s                                 # s: the host model's monitor connection


def _guard(qmp: str, proc: subprocess.Popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-I", guard.__file__, qmp, "vmg", str(proc.pid)], stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_the_guard_ends_only_a_qemu_still_taking_its_stream(tmp_path):
    incoming, qmp_in, held_in = _qemu(tmp_path, "-incoming", "defer")
    paused, qmp_p, held_p = _qemu(tmp_path)
    try:
        g_in, g_p = _guard(qmp_in, incoming), _guard(qmp_p, paused)
        held_in.recv(4096)
        held_in.sendall(b'{"execute": "qmp_capabilities"}\n')      # the host model at work, then killed:
        held_in.close()                                             # its connection and its pipe end
        held_p.close()
        assert "its incoming QEMU ended" in g_in.communicate(timeout=patience(10))[1]   # its pipe's end
        assert g_in.returncode == 0
        assert incoming.wait(patience(10)) == 0                      # 'quit': a clean exit
        err = g_p.communicate(timeout=patience(10))[1]
        assert g_p.returncode == 0 and "'prelaunch', past the migration stream: left" in err, err
        assert paused.poll() is None
    finally:
        for p in (incoming, paused):
            p.kill()
            p.wait()


def test_done_or_a_gone_qemu_end_the_guard_at_once(tmp_path):
    proc, qmp, held = _qemu(tmp_path, "-incoming", "defer")
    try:
        g = _guard(qmp, proc)
        held.close()
        g.communicate("done\n", timeout=patience(5))
        assert g.returncode == 0 and proc.poll() is None            # nothing to guard: QEMU untouched
        g = _guard(qmp, proc)
        proc.kill()
        proc.wait()
        t0 = time.monotonic()
        out = g.communicate("", timeout=patience(5))
        assert g.returncode == 0 and out[1] == "" and time.monotonic() - t0 < guard.CONNECT_WAIT / 2
    finally:
        proc.kill()
        proc.wait()


def test_the_guard_refuses_bad_arguments():
    r = subprocess.run([sys.executable, "-I", guard.__file__, "x", "y"], capture_output=True, text=True, input="")
    assert r.returncode == 2 and "usage: guard.py" in r.stderr
