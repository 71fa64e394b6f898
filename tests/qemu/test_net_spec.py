"""``--net`` / :class:`NetSpec`: QEMU's user networking with hostfwd rules, checked before QEMU
sees them (one clear line each). No QEMU here."""

from __future__ import annotations

import pytest

from qemu_mktme.qemu.devices import NetSpec, net_args
from qemu_mktme.qemu.machine import MachineConfig


def test_parse_and_qemu_options():
    spec = NetSpec.parse("user,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=udp::5353-10.0.2.15:53")
    assert spec == NetSpec("user", ("tcp:127.0.0.1:2222-:22", "udp::5353-10.0.2.15:53"))
    assert NetSpec.parse("user") == NetSpec()
    assert net_args((spec, NetSpec())) == [
        "-netdev", "user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=udp::5353-10.0.2.15:53",
        "-device", "virtio-net-pci,netdev=net0,id=net0-dev,romfile=",
        "-netdev", "user,id=net1", "-device", "virtio-net-pci,netdev=net1,id=net1-dev,romfile="]


@pytest.mark.parametrize("text, words", [
    ("tap", "mode must be one of user"), ("bridge,br=virbr0", "mode must be one of user"),
    ("user,hostfwd=tcp:127.0.0.1:2222", "is not PROTO:"), ("user,hostfwd=sctp::1-:2", "is not PROTO:"),
    ("user,hostfwd=tcp::70000-:22", "port 70000 is not 1..65535"), ("user,hostfwd=tcp::0-:22", "port 0"),
    ("user,hostfwd=tcp:localhost:2222-:22", "'localhost' is not an IPv4 address"),
    ("user,net=10.0.0.0/8", "unknown network option 'net=10.0.0.0/8'"),
    ("user,hostfwd=tcp::1-:2,,", "unknown network option"),
])
def test_parse_refuses_with_one_line(text, words):
    with pytest.raises(ValueError, match=words) as err:
        NetSpec.parse(text)
    assert "\n" not in str(err.value)


def test_machine_config_takes_only_netspecs():
    assert MachineConfig(nets=[NetSpec()]).nets == (NetSpec(),)
    with pytest.raises(ValueError, match="nets must be NetSpec"):
        MachineConfig(nets=("user",))
