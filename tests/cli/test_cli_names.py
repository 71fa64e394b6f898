"""The command names: one noun per thing in ``--help``, each listed once; the old spellings
(``migrate``, ``query``, ``dump``, ``verify``, ``image``) unlisted but parsed to the same command
and failing with the same words."""

from __future__ import annotations

import inspect
import re

import pytest

from qemu_mktme import cli
from qemu_mktme.commands import compare, disk, dump, migrate, query

from helpers import qm


def listed(help_text: str) -> list[str]:
    """The subcommands a ``--help`` lists: the indented rows under its COMMAND/ACTION heading."""
    return re.findall(r"^    (\S+)(?:  |\n)", help_text, re.MULTILINE)


def test_help_lists_each_noun_once_and_no_old_name():
    out = qm("--help")
    assert out.returncode == 0, out.stderr
    names = listed(out.stdout)
    assert len(names) == len(set(names)), names
    assert names == [m.__name__.rsplit(".", 1)[-1] for m in cli.COMMANDS]
    assert not set(names) & set(cli.ALIASES)
    assert {"host", "disk", "images", "compare"} <= set(names)


def test_host_groups_its_verbs(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["host", "--help"])
    assert exited.value.code == 0
    assert listed(capsys.readouterr().out) == ["start", "migrate", "query", "dump"]


def test_aliases_map_to_the_modules_that_register_the_new_names():
    assert {"migrate": migrate, "query": query, "dump": dump, "verify": compare, "image": disk} == cli.ALIASES


OLD_AND_NEW = [
    (["migrate", "vm1", "--to", "h2", "--from", "h1", "--tls", "/t"], ["host", "migrate", "vm1", "--to", "h2",
                                                                        "--from", "h1", "--tls", "/t"]),
    (["migrate", "vm1", "--to", "h2", "--pid", "7", "--insecure"], ["host", "migrate", "vm1", "--to", "h2", "--pid", "7",
                                                                     "--insecure"]),
    (["query"], ["host", "query"]),
    (["query", "b", "--pid", "12"], ["host", "query", "b", "--pid", "12"]),
    (["query", "--libvirt", "qemu:///system"], ["host", "query", "--libvirt", "qemu:///system"]),
    (["dump", "/d", "--vm", "a", "--vm", "b", "--pid", "3"], ["host", "dump", "/d", "--vm", "a", "--vm", "b", "--pid", "3"]),
    (["verify"], ["compare"]),
    (["verify", "--workloads", "baremetal", "linux-boot", "--inject", "foreign-write", "--no-shim", "--json"],
     ["compare", "--workloads", "baremetal", "linux-boot", "--inject", "foreign-write", "--no-shim", "--json"]),
    (["image", "encrypt", "a.raw", "b.qcow2", "--key-name", "k", "--tenant-dir", "/t"],
     ["disk", "encrypt", "a.raw", "b.qcow2", "--key-name", "k", "--tenant-dir", "/t"]),
    (["image", "verify", "b.qcow2"], ["disk", "verify", "b.qcow2"]),
]


@pytest.mark.parametrize("old, new", OLD_AND_NEW, ids=[" ".join(new) for _, new in OLD_AND_NEW])
def test_an_old_spelling_parses_to_the_same_command(old, new):
    parser = cli.build_parser()
    before, after = vars(parser.parse_args(old)), vars(parser.parse_args(new))
    assert inspect.unwrap(before.pop("func")) is inspect.unwrap(after.pop("func"))   # (host's verbs: wrapped)
    # host's own options (--libvirt, --host-name, ...) come along under host; all the command's agree
    assert before["command"] == old[0] and after["command"] == new[0]
    same = {k for k in before if k not in ("command", "action")}
    assert {k: before[k] for k in same} == {k: after[k] for k in same}


@pytest.mark.parametrize("old, new", [
    (["query", "--pid", "999999"], ["host", "query", "--pid", "999999"]),
    (["migrate", "vm", "--to", "b", "--pid", "999999"], ["host", "migrate", "vm", "--to", "b", "--pid", "999999"]),
    (["dump", "/nonexistent/d", "--pid", "999999"], ["host", "dump", "/nonexistent/d", "--pid", "999999"]),
    (["dump", "/nonexistent/d", "--vm", "a", "--vm", "a"], ["host", "dump", "/nonexistent/d", "--vm", "a", "--vm", "a"]),
    (["image", "verify", "/nonexistent.qcow2"], ["disk", "verify", "/nonexistent.qcow2"]),
], ids=lambda a: " ".join(a))
def test_an_old_spelling_fails_with_the_same_words(old, new, tmp_path):
    """As a user meets them (subprocesses): same exit status, same error line."""
    env = {"QEMU_MKTME_TENANT_DIR": str(tmp_path / "no-tenant")}
    before, after = qm(*old, env=env), qm(*new, env=env)
    assert before.returncode == after.returncode != 0
    assert before.stderr == after.stderr and before.stderr.startswith("qemu-mktme: error: ")
    assert before.stdout == after.stdout == ""


@pytest.mark.parametrize("old, new", [(["verify"], ["compare"]), (["image"], ["disk"]), (["migrate"], ["host", "migrate"]),
                                      (["query"], ["host", "query"]), (["dump"], ["host", "dump"])])
def test_an_old_spelling_answers_help_under_its_own_name(old, new, capsys):
    """Its help is the new command's (the description names the old spelling once, on the new one)."""
    for args in (old, new):
        with pytest.raises(SystemExit) as exited:
            cli.main([*args, "--help"])
        assert exited.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: qemu-mktme {' '.join(args)} ")


def test_an_unknown_command_is_offered_only_the_listed_names():
    out = qm("frobnicate")
    assert out.returncode == 2
    offered = re.findall(r"'([a-z]+)'", out.stderr.split("choose from", 1)[1])
    assert offered == [m.__name__.rsplit(".", 1)[-1] for m in cli.COMMANDS]
