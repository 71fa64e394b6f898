"""The libvirt route for real: the system's ``libvirtd`` when one answers, else a private one
(Debian's libvirt-daemon-system, its own socket directory and log, started here as root), ``virsh create`` of a domain with
``<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>`` and a second QMP
monitor through ``<qemu:commandline>``, then ``qemu-mktme attach`` on that monitor. Skipped, with
the reason, where libvirtd is not installed or this is not root."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import patience, qm

pytestmark = pytest.mark.qemu

DOMAIN = """<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <os><type arch='x86_64' machine='q35'>hvm</type><kernel>{kernel}</kernel>
      <cmdline>write 0x200000 LIBVIRT-SECRET;ticks 0 2000000</cmdline></os>
  <devices>
    <emulator>{qemu}</emulator>
    <serial type='unix'><source mode='bind' path='{vm}/serial.sock'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-chardev'/><qemu:arg value='socket,id=mktmeqmp,path={vm}/mktme-qmp.sock,server=on,wait=off'/>
    <qemu:arg value='-mon'/><qemu:arg value='chardev=mktmeqmp,mode=control'/>
  </qemu:commandline>
</domain>
"""


def _wait_for(path: Path, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + patience(15)
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} did not start (exit {proc.poll()}): {proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.05)


@pytest.fixture
def libvirtd(baremetal_image):
    if not (shutil.which("libvirtd") and shutil.which("virsh") and shutil.which("virtlogd")):
        pytest.skip("libvirtd/virsh not installed (Debian's libvirt-daemon-system, libvirt-clients)")
    if os.geteuid() != 0:
        pytest.skip("a system libvirtd needs root")
    top = Path(tempfile.mkdtemp(prefix="qemu-mktme-libvirt-"))
    started: list[subprocess.Popen] = []
    try:
        os.chmod(top, 0o711)                              # QEMU runs as libvirt-qemu: it must reach vm/
        vm = top / "vm"
        vm.mkdir(mode=0o777)
        os.chmod(vm, 0o777)
        shutil.copy(baremetal_image.kernel, vm / "kernel.bin")
        os.chmod(vm / "kernel.bin", 0o644)
        (top / "libvirtd.conf").write_text(
            f'unix_sock_dir = "{top}"\nunix_sock_rw_perms = "0700"\nauth_unix_rw = "none"\n'
            f'log_outputs = "3:file:{top}/libvirtd.log"\n')
        if virsh("qemu:///system", "version").returncode == 0:   # a system libvirtd runs (systemd hosts)
            yield top, "qemu:///system"
            return
        if not Path("/run/libvirt/virtlogd-sock").exists():
            logd = subprocess.Popen(["virtlogd", "-p", str(top / "virtlogd.pid")], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
            started.append(logd)
            _wait_for(Path("/run/libvirt/virtlogd-sock"), logd, "virtlogd")
        daemon = subprocess.Popen(["libvirtd", "--config", str(top / "libvirtd.conf"), "--pid-file",
                                   str(top / "libvirtd.pid")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True)
        started.append(daemon)
        _wait_for(top / "libvirt-sock", daemon, "libvirtd")
        yield top, f"qemu:///system?socket={top}/libvirt-sock"
    finally:
        for proc in reversed(started):                    # only what this fixture started
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(patience(10))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(top, ignore_errors=True)


def virsh(uri: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True, timeout=patience(30))


def test_attach_to_a_domain_virsh_started(libvirtd):
    top, uri = libvirtd
    vm = top / "vm"
    name = f"mktme-test-{os.getpid()}"
    from qemu_mktme.qemu.binary import find_qemu
    (top / "domain.xml").write_text(DOMAIN.format(name=name, kernel=vm / "kernel.bin", vm=vm, qemu=find_qemu().path))
    r = virsh(uri, "create", str(top / "domain.xml"))
    assert r.returncode == 0, r.stderr
    attach = None
    try:
        attach = subprocess.Popen([sys.executable, "-m", "qemu_mktme.cli", "attach", "--qmp", str(vm / "mktme-qmp.sock"),
                                   "--console", str(vm / "serial.sock"), "--name", "lv", "--tenant", "acme",
                                   "--no-input"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + patience(30)
        # the host's control socket answers as soon as it listens, before the VM is bound
        while (r := qm("query", "--pid", str(attach.pid), timeout=10)).returncode != 0 \
                or "lv" not in json.loads(r.stdout).get("guests", {}):
            assert attach.poll() is None, attach.stderr.read()
            assert time.monotonic() < deadline, r.stderr or r.stdout
            time.sleep(0.2)
        guest = json.loads(r.stdout)["guests"]["lv"]
        assert guest["tenant"] == "acme" and guest["key-type"] == "cpu" and guest["keyid"] >= 1
        assert Path(f"/proc/{guest['pid']}/cmdline").read_bytes().split(b"\0")[2].startswith(f"guest={name}".encode())
        r = qm("dump", str(top / "dump"), "--pid", str(attach.pid), timeout=60)
        assert r.returncode == 0 and f"lv: KeyID {guest['keyid']} (cpu)" in r.stdout, r.stderr
        assert virsh(uri, "destroy", name).returncode == 0      # libvirt stops it: attach ends by itself
        out, err = attach.communicate(timeout=patience(30))
        assert attach.returncode == 0, err
        assert "attached lv" in err and "detached (QEMU exited)" in err and "tick " in out
    finally:
        if attach is not None and attach.poll() is None:
            attach.kill()
            attach.wait()
        virsh(uri, "destroy", name)
