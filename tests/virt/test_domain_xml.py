"""The domain XML that opts into MKTME, its checks, and the hook's install/remove: no libvirtd
needed (the hook script runs against a socket of this test)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from helpers import qm
from qemu_mktme.qemu.boot import BootSpec
from qemu_mktme.virt import domain as dom
from qemu_mktme.virt import hooks

OPT = dom.Opt("acme", "vm", "https://10.0.0.1:8443")
USER_XML = """<domain type='qemu'><name>mine</name><memory unit='MiB'>128</memory>
  <os><type arch='x86_64'>hvm</type><kernel>/boot/k</kernel><cmdline>console=ttyS0</cmdline></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator><disk type='file' device='disk'/></devices></domain>"""


def test_opt_in_keeps_the_users_domain_and_adds_what_the_host_model_needs():
    xml = dom.opt_in(USER_XML, OPT)
    d = dom.check(xml)
    assert d.opt == OPT and d.memfd_shared and d.qmp == str(dom.qmp_path("mine"))
    assert d.boot == BootSpec(Path("/boot/k"), None, "console=ttyS0") and d.memory == 128 << 20
    assert "<disk" in xml and dom.opt_in(xml, OPT).count("id=mktmeqmp,") == xml.count("id=mktmeqmp,") == 1


def test_check_lists_every_problem():
    found = dom.problems(dom.parse(USER_XML.replace("<kernel>/boot/k</kernel>", "")))
    assert [p.split(": ", 1)[-1].split(" ")[0] for p in found] and len(found) == 4
    assert any("no <mktme:mktme>" in p for p in found) and any("shared memfd" in p for p in found)
    assert any("direct kernel boot" in p for p in found) and any("QMP monitor" in p for p in found)
    with pytest.raises(dom.DomainError, match="not XML"):
        dom.parse("<domain")
    with pytest.raises(dom.DomainError, match="root element is <network>"):
        dom.parse("<network/>")
    bad = dom.opt_in(USER_XML, dom.Opt("acme", "vm", "http://x", "mine"))
    assert {"<mktme:broker>", "policy"} <= {w for p in dom.problems(dom.parse(bad)) for w in ("<mktme:broker>", "policy")
                                            if w in p}


def test_the_cli_writes_and_checks_domains(tmp_path):
    (tmp_path / "empty.xml").write_text("")
    r = qm("libvirt", "domain-xml", "--opt-in", str(tmp_path / "empty.xml"), "--tenant", "t", "--key", "k",
           "--broker", "https://h:1")
    assert r.returncode == 1 and "not XML" in r.stderr
    (tmp_path / "mine.xml").write_text(USER_XML)
    r = qm("libvirt", "domain-xml", "--check", str(tmp_path / "mine.xml"))
    assert r.returncode == 1 and r.stderr.count("qemu-mktme: domain mine") == 3, r.stderr
    r = qm("libvirt", "domain-xml", "--opt-in", str(tmp_path / "mine.xml"), "--tenant", "t", "--key", "k",
           "--broker", "https://h:1")
    assert r.returncode == 0, r.stderr
    (tmp_path / "in.xml").write_text(r.stdout)
    r = qm("libvirt", "domain-xml", "--check", str(tmp_path / "in.xml"))
    assert r.returncode == 0 and "mine: opts into MKTME (tenant t, key k" in r.stdout
    r = qm("libvirt", "domain-xml", "--guest", "baremetal")
    assert r.returncode == 2 and "--tenant, --key and --broker" in r.stderr


def test_domain_xml_memory_has_the_bounds_of_run():
    for bad, why in (("99999999T", "at most 1024 GiB"), ("2T", "at most 1024 GiB"), ("0", "size must be positive"),
                     ("１G", "not a size"), ("1000K", "whole number of MiB")):
        r = qm("libvirt", "domain-xml", "--guest", "baremetal", "--plain", "-m", bad, "--emulator", "/bin/true")
        assert r.returncode == 2 and why in r.stderr.strip().splitlines()[-1] and not r.stdout, (bad, r.stderr)
    r = qm("libvirt", "domain-xml", "--guest", "baremetal", "--plain", "-m", "1T", "--emulator", "/bin/true")
    assert r.returncode == 0 and "<memory unit='MiB'>1048576</memory>" in r.stdout, r.stderr


def test_domain_xml_files_that_are_no_domain_are_one_line_each(tmp_path):
    """A FIFO or /dev/zero (also behind a symlink) hung the command (or filled memory)."""
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "zero").symlink_to("/dev/zero")
    (tmp_path / "bin.xml").write_bytes(b"\xff\xfe<domain/>")
    for name, why in (("fifo", "not a regular file"), ("zero", "not a regular file"), (".", "not a regular file"),
                      ("bin.xml", "not UTF-8"), ("none.xml", "No such file")):
        r = qm("libvirt", "domain-xml", "--check", str(tmp_path / name), timeout=20)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and why in r.stderr, (name, r.stderr)
    for broker in ("notaurl", "https://h:99999", "https://"):       # written, then refused by --check, before
        r = qm("libvirt", "domain-xml", "--guest", "baremetal", "--tenant", "t", "--key", "k", "--broker", broker,
               "--emulator", "/usr/bin/qemu-system-x86_64")
        assert r.returncode == 2 and "must be the tenant's broker URL" in r.stderr and not r.stdout, broker
    r = qm("libvirt", "domain-xml", "--guest", "baremetal", "--plain", "--param", "counter")
    assert r.returncode == 2 and "--param wants NAME=VALUE, got 'counter'" in r.stderr
    r = qm("host", "--libvirt", "qemu:///system", "--host-name", "a", "--tenant-ca", str(tmp_path / "fifo"))
    assert r.returncode == 2 and "--tenant-ca" in r.stderr and "not a regular file" in r.stderr
    r = qm("query", "--libvirt", "bogus")              # libvirt's own stderr line too, before
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "cannot connect to libvirt at bogus" in r.stderr


def test_hook_install_and_remove_only_touch_our_file(tmp_path):
    etc = tmp_path / "etc"
    (etc / "hooks").mkdir(parents=True)
    (etc / "hooks" / "qemu").write_text("#!/bin/sh\n# the user's own\n")
    r = qm("libvirt", "hook", "install", "--etc", str(etc))
    assert r.returncode == 0 and "restart libvirtd" in r.stdout
    path = hooks.hook_path(etc)
    assert path.stat().st_mode & 0o777 == 0o755 and hooks.hookscript.MARKER in path.read_text()
    path.write_text("#!/bin/sh\n# someone else's\n")
    assert qm("libvirt", "hook", "remove", "--etc", str(etc)).returncode == 1 and path.exists()
    hooks.install(etc)
    r = qm("libvirt", "hook", "remove", "--etc", str(etc))
    assert r.returncode == 0 and not path.exists() and (etc / "hooks" / "qemu").exists()


def _serve(path: Path, answer: dict, seen: list) -> socket.socket:
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen()

    def one() -> None:
        conn, _ = srv.accept()
        with conn, conn.makefile("rwb") as f:
            seen.append(json.loads(f.readline()))
            f.write(json.dumps(answer).encode() + b"\n")
            f.flush()
    threading.Thread(target=one, daemon=True).start()
    return srv


def _hook(tmp_path: Path, sock: Path, op: str, xml: str) -> subprocess.CompletedProcess:
    script = tmp_path / "hook"
    script.write_text(hooks.hook_text().replace(hooks.hookscript.SOCKET, str(sock)))
    script.chmod(0o755)
    return subprocess.run([str(script), "vm1", op, "begin", "-"], input=xml, capture_output=True, text=True, timeout=30)


def test_the_hook_passes_other_domains_and_hands_ours_to_the_host_model(tmp_path):
    sock = tmp_path / "host.sock"
    xml = dom.opt_in(USER_XML, OPT)
    r = _hook(tmp_path, sock, "prepare", USER_XML)            # not ours: untouched, no socket needed
    assert r.returncode == 0 and r.stdout == ""
    mentions = USER_XML.replace("<name>", f"<description>see {dom.NS}</description><name>")
    r = _hook(tmp_path, sock, "prepare", mentions)            # our URL in its description: still not ours
    assert r.returncode == 0 and r.stderr == ""
    r = _hook(tmp_path, sock, "prepare", xml)                 # ours, no host model running
    assert r.returncode == 1 and "no host model runs on this machine" in r.stderr
    assert _hook(tmp_path, sock, "release", xml).returncode == 0      # nothing to release
    seen: list = []
    with _serve(sock, {"ok": False, "error": "domain vm1: host a: the key broker refused this host: why"}, seen):
        r = _hook(tmp_path, sock, "prepare", xml)
    assert r.returncode == 1 and r.stderr.strip() == "qemu-mktme: domain vm1: host a: the key broker refused this host: why"
    assert seen[0]["cmd"] == "hook" and seen[0]["op"] == "prepare" and seen[0]["xml"] == xml
    sock.unlink()
    with _serve(sock, {"ok": True, "result": {}}, []):
        r = _hook(tmp_path, sock, "migrate", xml)
    assert r.returncode == 0 and r.stdout == ""               # libvirt keeps the XML it has
    assert sys.executable in hooks.hook_text().splitlines()[0]
