"""``mktme_fleet``: three namespaced machines (the tenant, hosts ``a`` and ``b``) with libvirt and
the host model on each host, for the whole module (:class:`qemu_mktme.virt.lab.FleetLab`).

    async def test_move(mktme_fleet):
        mktme_fleet.define("a", "vm1")
        await mktme_fleet.start("a", "vm1")
        await mktme_fleet.migrate("vm1", "a", "b")
        await mktme_fleet.stop("b", "vm1")

The hosts are enrolled for the Linux guest (``counter`` workload by default: override the module's
``mktme_fleet_boot`` fixture). Skipped, with the reason, without root, libvirtd or libvirt-python.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from ..qemu.boot import BootSpec


@pytest.fixture(scope="module")
def mktme_fleet_boot() -> BootSpec:
    from .. import images
    return images.build("linux").boot(workload="counter", params={"period": "0.2"})


@pytest.fixture(scope="module")
def mktme_fleet(mktme_fleet_boot: BootSpec, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    if os.geteuid() != 0:
        pytest.skip("namespaced machines with their own libvirtd need root")
    missing = [t for t in ("libvirtd", "virsh", "nsenter", "unshare", "ip", "iptables") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (scripts/setup-host.sh)")
    pytest.importorskip("libvirt", reason="libvirt-python (pip install 'qemu-mktme[libvirt]')")
    from ..virt.lab import FleetLab
    with FleetLab(tmp_path_factory.mktemp("fleet"), mktme_fleet_boot) as lab:
        yield lab
