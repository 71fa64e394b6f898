"""Attaching MKTME to a QEMU someone else started: the command line a libvirt domain with
``<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>``, a QMP socket and
the shim through ``<qemu:commandline>`` produces (libvirt 9's JSON ``-object``, ``pc.ram``,
``charmonitor``), bound to a host model; and the ways a socket or a QEMU can be wrong. The
command line (``qemu-mktme attach``, query, dump) against a domain ``virsh`` started:
test_libvirt.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest
from helpers import patience
from reference import user_payload, xts_lines

from qemu_mktme.errors import AttachError, SnapshotError
from qemu_mktme.host.host import Host
from qemu_mktme.live.encrypted import EncryptedMachine, shim_hint
from qemu_mktme.live.snapshot import save_snapshot
from qemu_mktme.qemu.binary import find_qemu
from qemu_mktme.qemu.machine import Machine

SECRET = "ATTACHED-SECRET-" + os.urandom(4).hex()


def libvirt_argv(image, rundir, *, shared=True, memory_mib=64):
    """What ``virsh start`` runs for such a domain (trimmed of what a TCG guest does not use)."""
    boot = image.boot(commands=[f"write 0x200000 {SECRET}", "ticks 0 2000000"])
    if shared:
        memory = ["-object", json.dumps({"qom-type": "memory-backend-memfd", "id": "pc.ram", "share": True,
                                         "x-use-canonical-path-for-ramblock-id": False,
                                         "size": memory_mib << 20}),
                  "-machine", "q35,usb=off,dump-guest-core=off,memory-backend=pc.ram"]
    else:
        memory = ["-machine", "q35,usb=off,dump-guest-core=off"]
    return [str(find_qemu().path), "-name", "guest=attached-test,debug-threads=on", "-S",
            *memory, "-accel", "tcg", "-m", f"size={memory_mib << 10}k", "-overcommit", "mem-lock=off",
            "-smp", "1,sockets=1,cores=1,threads=1", "-no-user-config", "-nodefaults", "-display", "none",
            "-chardev", f"socket,id=charmonitor,path={rundir}/monitor.sock,server=on,wait=off",
            "-mon", "chardev=charmonitor,id=monitor,mode=control",
            "-chardev", f"socket,id=charserial0,path={rundir}/serial.sock,server=on,wait=off",
            "-serial", "chardev:charserial0", "-kernel", str(boot.kernel), "-append", boot.append]


class Foreign:
    """A QEMU this test starts itself, as libvirt would: not a Machine of ours."""

    def __init__(self, argv, rundir):
        self.rundir = rundir
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        # The socket file appears at QEMU's bind(), before its listen(): wait until a connection is
        # accepted (QEMU's monitor takes the next client once this one hangs up).
        deadline = time.monotonic() + patience(20)
        while not self._monitor_listens():
            assert self.proc.poll() is None, self.proc.stdout.read()
            assert time.monotonic() < deadline, "QEMU did not open its monitor"
            time.sleep(0.02)

    def _monitor_listens(self):
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(self.rundir / "monitor.sock"))
            except (FileNotFoundError, ConnectionRefusedError):
                return False
        return True

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(patience(10))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def foreign(tmp_path, baremetal_image):
    started = []

    def start(**kw):
        q = Foreign(libvirt_argv(baremetal_image, tmp_path, **kw), tmp_path)
        started.append(q)
        return q
    yield start
    for q in started:
        q.stop()


async def test_attach_binds_a_libvirt_style_qemu_to_the_host_model(foreign, tmp_path):
    q = foreign()
    host = Host(keyid_bits=6)
    key, tweak = os.urandom(16), os.urandom(16)
    serial = host.keys.add("vm", user_payload(key, tweak), tenant="acme")
    vm = await EncryptedMachine.attach(host, q.rundir / "monitor.sock", key_serial=serial, tenant="acme",
                                       console_socket=q.rundir / "serial.sock", name="lv")
    try:
        assert vm.pid == q.proc.pid and vm.ram.backend_id == "pc.ram" and not vm.owned
        await vm.resume()                                    # libvirt starts with -S, then 'cont'
        await vm.console.wait_for(r"tick 2\n", patience(30))
        line = vm.ram.read(0x200000, 64)
        assert line.startswith(SECRET.encode())
        hpa = vm.guest.hpa_of(0x200000)
        assert vm.guest.translate(0x200000) == (hpa, vm.keyid)
        assert vm.guest.dram(0x200000, 64) == xts_lines(key, tweak, hpa, line)
        q_state = vm.query()
        assert q_state["keyid"] == vm.keyid and q_state["key-type"] == "user" and q_state["consistent"]
        with pytest.raises(SnapshotError, match="an attached VM cannot be saved"):
            await save_snapshot(vm, tmp_path / "never.snap", os.urandom(32))
        assert not (tmp_path / "never.snap").exists()
    finally:
        await vm.close()
    assert q.proc.poll() is None, "closing an attached machine must not stop QEMU"
    assert host.guests == {}
    hint = shim_hint(find_qemu())
    assert "-plugin " in hint and "mktme_shim.so" in hint


async def test_attach_refuses_unshared_ram_and_says_how_to_fix_it(foreign):
    q = foreign(shared=False)
    with pytest.raises(AttachError, match=r"not shared: start QEMU with -object memory-backend-memfd,id=ram0,"
                                          r"size=64M,share=on -machine memory-backend=ram0"):
        await Machine.attach(q.rundir / "monitor.sock")
    assert q.proc.poll() is None


async def test_attach_refuses_a_socket_that_is_not_qmp(tmp_path):
    path = tmp_path / "not-qmp.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve():
        conn, _ = server.accept()
        with conn, contextlib.suppress(OSError):
            conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")     # a greeting, but not QMP's
    threading.Thread(target=serve, daemon=True).start()
    try:
        with pytest.raises(AttachError, match="is not a QEMU QMP socket .*SSH-2.0") as err:
            await Machine.attach(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value), err.value
    finally:
        server.close()
    with pytest.raises(AttachError, match="cannot connect to QMP socket"):
        await Machine.attach(tmp_path / "nothing.sock")
