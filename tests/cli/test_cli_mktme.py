"""``run`` with keys and several VMs, and ``host query`` (old name ``query``) reaching it from another process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from qemu_mktme import cli

from helpers import patience, qm


def start_run(*args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "qemu_mktme.cli", "run", "--no-input", *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + patience(15)
    err = ""
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        err += line
        if "reaches this host" in line:
            return proc
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"run did not come up: {err}")


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=patience(10))
    return out + err


def test_run_several_vms_and_query(baremetal_image, tmp_path):
    keyfile = tmp_path / "tenant.key"
    keyfile.write_text(f"{os.urandom(16).hex()} {os.urandom(16).hex()}\n")
    proc = start_run("-c", "write 0x200000 hi", "--keyid-bits", "4",
                     "--vm", f"name=a,tenant=acme,key=user:@{keyfile}",
                     "--vm", f"name=b,tenant=acme,key=user:@{keyfile}",
                     "--vm", "name=c,tenant=globex,key=cpu:aes-xts-256",
                     "--vm", "name=d,key=none")
    try:
        out = qm("query", "--pid", str(proc.pid))
        assert out.returncode == 0, out.stderr
        q = json.loads(out.stdout)
        assert q["platform"]["keyid-bits"] == 4 and q["platform"]["keyids-usable"] == 15
        assert "x86/mktme: 15 KeyIDs available" in q["platform"]["boot-log"]
        g = q["guests"]
        assert g["a"]["keyid"] == g["b"]["keyid"] != g["c"]["keyid"]
        assert g["c"]["algorithm"] == "aes-xts-256" and g["c"]["key-type"] == "cpu"
        assert g["d"]["enabled"] is False and "keyid" not in g["d"]
        assert all(g[n]["consistent"] for n in "abc")
        one = json.loads(qm("query", "--pid", str(proc.pid), "b").stdout)
        assert one["name"] == "b" and one["eptp"].startswith("0x")
        bad = qm("query", "--pid", str(proc.pid), "zz")
        assert bad.returncode == 1 and "no VM named 'zz'" in bad.stderr
        new = json.loads(qm("host", "query", "--pid", str(proc.pid)).stdout)       # the new name of 'query'
        assert new["platform"]["keyid-bits"] == 4 and new["guests"].keys() == g.keys()
        assert {n: v.get("keyid") for n, v in new["guests"].items()} == {n: v.get("keyid") for n, v in g.items()}
        assert json.loads(qm("host", "query", "--pid", str(proc.pid), "b").stdout)["eptp"] == one["eptp"]
    finally:
        text = stop(proc)
    assert "[a] ok write 0x200000 2" in text and "[d] ok write 0x200000 2" in text
    assert qm("query", "--pid", str(proc.pid)).returncode == 1          # gone with its socket


@pytest.mark.parametrize("spec, message", [
    ("user:00:11", "must be 16 bytes"),
    ("user:@/nonexistent/key", "key file /nonexistent/key"),
    ("gpu", "key spec must be"),
])
def test_bad_key_specs(spec, message, capsys):
    assert cli.main(["run", "--key", spec, "-c", "poweroff"]) == 2       # in-process: refused before QEMU
    err = capsys.readouterr().err
    assert message in err
    assert "@" not in spec or "00112233" not in err


def test_keyid_exhaustion_is_a_clear_error(baremetal_image):
    args = ["run", "--keyid-bits", "1", "--no-input", "-c", "poweroff"]
    for n in "ab":
        args += ["--vm", f"name={n},key=cpu"]
    out = qm(*args)
    assert out.returncode == 1 and "ENOKEY" in out.stderr and "all 1 KeyIDs are in use" in out.stderr
    assert "VM 'b' needs one more" in out.stderr and "--keyid-bits" in out.stderr
