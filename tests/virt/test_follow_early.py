"""The host model's incoming path, without libvirt: an incoming domain's attestation begins at its
``migrate`` hook and ``prepare`` awaits it (its refusal raised there, before QEMU exists); one that
does not fit the ``prepare`` (another key, no ``migrate`` before it, released, expired) is dropped
and ``prepare`` attests anew. The attestation itself (TPM quote, broker, KMIP) is the real one in
tests/virt/test_fleet*.py; here it is counted."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import os

from qemu_mktme.attest.launch import memory_payload
from qemu_mktme.qemu.boot import BootSpec
from qemu_mktme.virt import domain as dom
from qemu_mktme.virt import follow
from qemu_mktme.virt.domain import Domain, DomainError


def _xml(name: str = "vm1", key: str = "vm") -> str:
    return dom.guest_domain(name, BootSpec(Path("/boot/k"), None, "console=ttyS0"), memory=64 << 20,
                            opt=dom.Opt("acme", key, "https://10.0.0.1:8443"), emulator="/usr/bin/qemu-system-x86_64")


class Counted(follow.LibvirtHost):
    """The host model with each attestation recorded (and refused when told to)."""

    def __init__(self, tmp: Path) -> None:
        super().__init__("qemu:///system", host_name="b", tenant_ca=tmp / "ca.pem", socket_path=tmp / "host.sock")
        self.attested: list[tuple[str, str]] = []
        self.refuse = False
        self.gate = asyncio.Event()

    async def _attest(self, d: Domain) -> follow.Released:
        assert d.opt is not None
        self.attested.append((d.name, d.opt.key))
        await self.gate.wait()
        if self.refuse:
            raise DomainError(f"domain {d.name}: host b: the key broker refused this host: revoked")
        return follow.Released(memory_payload(os.urandom(32)), {"key": d.opt.key})


async def test_prepare_awaits_the_attestation_begun_at_migrate(tmp_path):
    host = Counted(tmp_path)
    await host.on_hook("vm1", "migrate", _xml())
    await asyncio.sleep(0)
    assert host.attested == [("vm1", "vm")]                  # begun before prepare
    prepare = asyncio.create_task(host.on_hook("vm1", "prepare", _xml()))
    await asyncio.sleep(0.05)
    assert not prepare.done()                                # prepare waits for the key
    host.gate.set()
    await prepare
    assert host.attested == [("vm1", "vm")]                  # no second attestation
    assert host._released["vm1"].incoming and host._released["vm1"].attestation == {"key": "vm"}
    assert not host._early


async def test_a_refusal_begun_at_migrate_is_raised_at_prepare(tmp_path):
    host = Counted(tmp_path)
    host.refuse = True
    host.gate.set()
    await host.on_hook("vm1", "migrate", _xml())
    await asyncio.sleep(0.01)                                # refused before prepare asks: kept for it
    with pytest.raises(DomainError, match="revoked"):
        await host.on_hook("vm1", "prepare", _xml())
    assert "vm1" not in host._released and not host._early


@pytest.mark.parametrize("between", ["other key", "released", "expired", "no migrate"])
async def test_an_attestation_that_does_not_fit_prepare_is_not_used(tmp_path, monkeypatch, between):
    host = Counted(tmp_path)
    host.gate.set()
    monkeypatch.setattr(follow, "EARLY_TTL", 0.01)
    if between != "no migrate":
        await host.on_hook("vm1", "migrate", _xml())
        await asyncio.sleep(0.001)                           # (the hook's answer crosses a socket)
    if between == "released":
        await host.on_hook("vm1", "release", _xml())
    elif between == "expired":
        await asyncio.sleep(0.05)
    if between == "expired" or between == "released":
        assert not host._early
    await host.on_hook("vm1", "prepare", _xml(key="vm2" if between == "other key" else "vm"))
    attested = [("vm1", "vm")] if between != "no migrate" else []
    assert host.attested == attested + [("vm1", "vm2" if between == "other key" else "vm")]
    assert host._released["vm1"].incoming == (between in ("other key", "expired"))
