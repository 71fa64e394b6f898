"""The command line as users meet it: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import json
import os

import pytest

from qemu_mktme import cli

from helpers import qm


def test_help_everywhere(capsys):
    out = qm("--help")                                          # as a user types it
    assert out.returncode == 0 and "usage: qemu-mktme" in out.stdout
    for args in (["run"], ["images"], ["images", "build"], ["images", "list"]):   # the same parser, in-process
        with pytest.raises(SystemExit) as exited:
            cli.main([*args, "--help"])
        assert exited.value.code == 0 and "usage: qemu-mktme" in capsys.readouterr().out, args


def test_run_baremetal_with_commands_and_stdin(baremetal_image):
    out = qm("run", "-c", "write 0x200000 hello", "-c", "crc 0x200000 5", input="echo typed\npoweroff\n")
    assert out.returncode == 0, out.stderr
    assert "ok crc32 0x200000 5 0x3610a686" in out.stdout        # zlib.crc32(b"hello")
    assert "ok echo typed" in out.stdout and "powered off" in out.stderr


def test_images_list_json(baremetal_image, linux_image):
    out = qm("images", "list", "--json")
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["baremetal"]["state"] == "ok" and rows["linux"]["state"] == "ok"


@pytest.mark.parametrize("args, env, message", [
    (["run", "--guest", "nope"], {}, "guest 'nope' is neither an image"),
    (["run", "-c", "poweroff"], {"QEMU_MKTME_QEMU": "/nonexistent/qemu"}, "not found"),
    (["images", "build", "windows"], {}, "unknown image 'windows'"),
])
def test_domain_errors_are_one_line(args, env, message, monkeypatch, capsys):
    """In-process (the subprocess path is the same main(): test_usage_errors_exit_2 runs it)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("qemu-mktme: error: ") and message in err and err.count("\n") == 1
    assert "Traceback" not in err


def test_usage_errors_exit_2():
    assert qm("run", "--memory", "lots").returncode == 2
    assert qm("frobnicate").returncode == 2
    assert qm("run", "--guest", "linux", "--memory", "128M").returncode == 2    # more in test_cli_usage.py


def test_main_is_callable_in_process(capsys, baremetal_image):
    assert cli.main(["images", "list"]) == 0
    assert "baremetal" in capsys.readouterr().out


def test_sigterm_stops_work_that_swallows_its_cancellation():
    """run_async: SIGTERM cancels, and also sets the event attend waits on, so code that loses
    the cancellation still stops; the command exits as if interrupted."""
    import asyncio
    import signal

    from qemu_mktme.attend import TERMINATED

    async def stubborn() -> str:
        asyncio.get_running_loop().call_later(0.1, os.kill, os.getpid(), signal.SIGTERM)
        terminated = TERMINATED.get()
        while True:
            try:
                await terminated.wait()
                return "stopped by the event"
            except asyncio.CancelledError:
                continue                               # the cancellation is lost here

    with pytest.raises(KeyboardInterrupt):
        cli.run_async(stubborn())


@pytest.mark.qemu  # runs qemu-system-x86_64 --version only
def test_doctor_names_the_shim_abi_and_the_xts_implementation(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "plugin API 1, phys_addr = ramaddr" in out  # Debian's QEMU 7.2
    assert "xts    compiled helper over OpenSSL libcrypto" in out
    assert "vhost  native dataplane (" in out


def test_doctor_without_qemu_says_so(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("QEMU_MKTME_QEMU", str(tmp_path / "no-such-qemu"))
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "qemu/shim  unusable:" in out and out.count("\n") == 3 and "xts    " in out
    assert "vhost  " in out
