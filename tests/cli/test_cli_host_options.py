"""``host``'s own options work before or after each verb (``host --libvirt URI query`` lost the
URI: the verb's default overwrote it), and one a verb cannot use is refused, in both orders."""

from __future__ import annotations

import json

import pytest

from helpers import qm
from qemu_mktme import cli

pytest.importorskip("libvirt", reason="libvirt-python (pip install 'qemu-mktme[libvirt]')")
URI = "test:///default"                    # libvirt's own test driver: one running domain, 'test', no daemon


def _orders(verb: list[str], options: list[str]) -> dict[str, list[str]]:
    return {"before": ["host", *options, *verb], "after": ["host", *verb, *options]}


@pytest.mark.parametrize("order", ["before", "after"])
def test_host_query_with_libvirt_in_either_order(order, tmp_path):
    argv = _orders(["query"], ["--libvirt", URI, "--socket", str(tmp_path / "none.sock")])[order]
    r = qm(*argv)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["test"]["state"] == "running"      # libvirt's domains, no host model bound them


@pytest.mark.parametrize("order", ["before", "after"])
def test_host_dump_with_libvirt_in_either_order(order, tmp_path):
    sock = tmp_path / "none.sock"
    r = qm(*_orders(["dump", str(tmp_path / "d")], ["--libvirt", URI, "--socket", str(sock)])[order])
    assert r.returncode == 1 and f"the host model at {sock} is not reachable" in r.stderr, r.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("verb", [["start", "h", "--tenant-server", "https://127.0.0.1:1"], ["migrate", "vm", "--to", "b"]])
def test_libvirt_is_refused_where_a_verb_cannot_use_it(order, verb):
    r = qm(*_orders(verb, ["--libvirt", URI])[order])
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "--libvirt" in last and not r.stdout, r.stderr


@pytest.mark.parametrize("order", ["before", "after"])
def test_host_start_options_in_either_order(order):
    argv = _orders(["start", "h", "--tenant-server", "https://127.0.0.1:1"],
                   ["--keyid-bits", "4", "--tenant-ca", "/x/ca.pem"])[order]
    args = cli.build_parser().parse_args(argv)
    assert (args.keyid_bits, args.tenant_ca) == (4, "/x/ca.pem")
    args = cli.build_parser().parse_args(["host", "start", "h", "--tenant-server", "https://127.0.0.1:1"])
    assert "keyid_bits" not in vars(args) and args.tenant_ca is None          # host_start's own default: 6


@pytest.mark.parametrize("verb", [["query"], ["dump", "d"], ["migrate", "vm", "--to", "b"],
                                  ["start", "h", "--tenant-server", "https://127.0.0.1:1"]])
def test_options_of_the_libvirt_host_model_alone_are_refused_with_a_verb(verb):
    r = qm("host", "--host-name", "a", *verb)
    assert r.returncode == 2 and "--host-name does not go with 'host " + verb[0] + "'" in r.stderr, r.stderr


def test_the_old_top_level_query_still_takes_libvirt(tmp_path):
    r = qm("query", "--libvirt", URI, "--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 0 and "test" in json.loads(r.stdout), r.stderr


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("verb", [["query"], ["dump", "d"]])
def test_socket_without_libvirt_is_refused(order, verb, tmp_path):
    r = qm(*_orders(verb, ["--socket", str(tmp_path / "s")])[order])
    assert r.returncode == 2 and "--socket is the host model's, with --libvirt URI" in r.stderr, r.stderr


@pytest.mark.parametrize("verb", [["query"], ["dump", "d"], ["migrate", "vm", "--to", "b"]])
def test_keyid_bits_before_a_verb_that_cannot_use_it_is_refused(verb):
    r = qm("host", "--keyid-bits", "4", *verb)
    assert r.returncode == 2 and f"--keyid-bits does not go with 'host {verb[0]}'" in r.stderr, r.stderr
