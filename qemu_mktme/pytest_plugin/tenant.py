"""Fixtures for the tenant's side: a running key server, and an emulated host that attested.

    def test_release(mktme_keyserver, mktme_attested_host):
        keys = mktme_attested_host.fetch(mktme_keyserver.client, ["vm"])

``mktme_keyserver`` (session scope) is a tenant ``pytest`` in a temporary directory with its
PyKMIP server and broker running and a memory key ``vm``; ``mktme_attested_host`` is host
``host0`` (its own TPM state directory) booted with the bare-metal guest's measured set and
enrolled in that tenant's policy.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..tenant import admin, keyserver
from ..attest.client import BrokerClient
from ..attest.hostid import AttestedHost
from ..tenant.keyserver import KeyServerInfo
from ..tenant.store import TenantDir


@dataclass
class KeyServerFixture:
    tenant: TenantDir
    info: KeyServerInfo

    @property
    def url(self) -> str:
        return self.info.url

    @property
    def ca(self) -> Path:
        return self.tenant.pki.ca

    @property
    def client(self) -> BrokerClient:
        """A fresh client of the broker (authenticated by the tenant's CA), presenting the
        tenant's own client certificate."""
        return BrokerClient(self.url, self.ca, cert=self.tenant.pki.client)

    def kmip(self):
        return keyserver.kmip_client(self.tenant, self.info)


@pytest.fixture(scope="session")
def mktme_keyserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyServerFixture]:
    """A tenant with its key server and broker running on 127.0.0.1, and a memory key ``vm``."""
    tenant = TenantDir(tmp_path_factory.mktemp("mktme-tenant") / "tenant")
    tenant.init("pytest")
    info = keyserver.start(tenant)
    try:
        admin.add_key(tenant, "vm")
        yield KeyServerFixture(tenant, info)
    finally:
        keyserver.stop(tenant)


@pytest.fixture
def mktme_attested_host(mktme_keyserver: KeyServerFixture, tmp_path_factory: pytest.TempPathFactory,
                        mktme_settings) -> Iterator[AttestedHost]:
    """Host ``host0`` booted with the bare-metal guest's measured set, enrolled in the tenant's policy."""
    from .. import images
    from ..attest.measure import measured_set
    directory = tmp_path_factory.getbasetemp() / "mktme-hosts" / "host0"
    boot = images.build("baremetal").boot()
    admin.make_policy(mktme_keyserver.tenant, boot, hosts=["host0"], keyid_bits=mktme_settings.keyid_bits,
                      host_dirs={"host0": directory})
    host = AttestedHost("host0", directory).boot(measured_set(boot, keyid_bits=mktme_settings.keyid_bits))
    try:
        yield host
    finally:
        host.close()
