"""Two running hosts for a test, with control sockets, between which VMs migrate as they do
between ``qemu-mktme`` processes (:mod:`qemu_mktme.live.p2p`: the source host drives, each host
owns its half)::

    async def test_move(mktme_host_pair, mktme_images, tmp_path):
        a, b = mktme_host_pair
        vm = await a.start_vm(MachineConfig(boot=mktme_images["baremetal"].boot(), name="vm1"), "t", "type=cpu")
        result = await migrate_between("vm1", source=a.name, to=b.name, tls=create_pki(tmp_path).directory)
        assert "vm1" in b.machines and a.host.keys.keyids.in_use == []

A VM's key reaches the destination as a tenant's broker would hand it over: the same tenant key
(a CPU-generated key never leaves its CPU: the destination's CPU makes a new one).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from ..errors import MigrationError
from ..host.payload import Payload
from ..live.encrypted import EncryptedMachine
from ..live.session import HostSession, VmSpec
from ..qemu.machine import MachineConfig
from .options import Settings

try:
    import pytest_asyncio
except ImportError:  # the async fixtures need pytest-asyncio: the extra qemu-mktme[pytest]
    pytest_asyncio = None  # type: ignore[assignment]


class HarnessHost(HostSession):
    """A :class:`HostSession` with a control socket, that also starts VMs after it runs."""

    async def start_vm(self, config: MachineConfig, tenant: str, payload: str | Payload) -> EncryptedMachine:
        await self._start(VmSpec(config, tenant, payload))
        vm = self.machines[config.name]
        assert isinstance(vm, EncryptedMachine)
        return vm


def _pair(settings: Settings) -> tuple[HarnessHost, HarnessHost]:
    hosts: list[HarnessHost] = []

    async def handed_over(config: MachineConfig, tenant: str, key_name: str | None) -> Payload:
        """The VM's own key, from the host of the pair that runs it (the broker's role)."""
        for host in hosts:
            vm = host.machines.get(config.name)
            if isinstance(vm, EncryptedMachine):
                return host.host.keys.payload(vm.key_serial, tenant)
        raise MigrationError(f"{config.name}: no host of the pair runs it")
    tag = f"pytest-{os.getpid()}-{id(hosts):x}"
    hosts += [HarnessHost([], keyid_bits=settings.keyid_bits, name=f"{tag}-{n}", key_source=handed_over)
              for n in ("a", "b")]
    return hosts[0], hosts[1]


if pytest_asyncio is not None:
    @pytest_asyncio.fixture
    async def mktme_host_pair(mktme_settings: Settings) -> AsyncIterator[tuple[HarnessHost, HarnessHost]]:
        """Two running emulated hosts (named, with control sockets); torn down after the test."""
        a, b = _pair(mktme_settings)
        async with a, b:
            yield a, b
else:
    @pytest.fixture
    def mktme_host_pair() -> None:
        pytest.fail("qemu-mktme's mktme_host_pair fixture needs pytest-asyncio: pip install 'qemu-mktme[pytest]'",
                    pytrace=False)
