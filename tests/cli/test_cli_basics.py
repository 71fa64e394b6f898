"""The command line as users meet it: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import json

import pytest

from qemu_mktme import cli

from helpers import qm


def test_help_everywhere():
    for args in ([], ["run"], ["images"], ["images", "build"], ["images", "list"]):
        out = qm(*args, "--help")
        assert out.returncode == 0 and "usage: qemu-mktme" in out.stdout, args


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
def test_domain_errors_are_one_line(args, env, message):
    out = qm(*args, env=env)
    assert out.returncode == 1
    assert out.stderr.startswith("qemu-mktme: error: ") and message in out.stderr
    assert "Traceback" not in out.stderr


def test_usage_errors_exit_2():
    assert qm("run", "--memory", "lots").returncode == 2
    assert qm("frobnicate").returncode == 2
    assert qm("run", "--guest", "linux", "--memory", "128M").returncode == 2    # more in test_cli_usage.py


def test_main_is_callable_in_process(capsys, baremetal_image):
    assert cli.main(["images", "list"]) == 0
    assert "baremetal" in capsys.readouterr().out
