"""An attested migration: the destination host attests to the tenant's broker and receives the
VM's memory key before a single byte of guest RAM moves (issue 15).

    result = await attested_migration(src, "vm1", dst, TenantLaunch(url, ca, host="h2"), tls=pki)

The destination's measured launch (its QEMU, shim, platform configuration and the VM's boot files)
is quoted by its own TPM; the broker releases the key wrapped to that TPM; the unwrapped key goes
straight into the destination's ``mktme`` key service, which picks its own KeyID. A destination the
broker refuses gets no key and no QEMU is started there: the source never notices.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import MigrationError, TenantError
from ..host.payload import Payload
from ..live.migrate import MigrateProgress, MigrationResult
from ..live.session import HostSession
from ..qemu.machine import MachineConfig
from .broker import BrokerClient
from .hostid import AttestedHost
from .launch import TenantLaunch, memory_payload
from .measure import measured_set


async def attested_migration(source: HostSession, name: str, dest: HostSession, launch: TenantLaunch, *,
                             tls: Path | None, insecure: bool = False, dest_tls: Path | None = None,
                             progress: MigrateProgress | None = None,
                             via: Callable[[int], int] | None = None) -> MigrationResult:
    """Attest ``launch.host`` (the destination), get key ``launch.key`` released to it, then migrate
    VM ``name`` from ``source`` to ``dest`` with that key. Raises ``AttestationError`` (nothing
    started, the source untouched) or ``MigrationError``."""
    vm = source.machines.get(name)
    if vm is None:
        raise MigrationError(f"no VM named {name!r} (have: {', '.join(source.machines) or 'none'})")
    if tls is None and not insecure:     # refuse before the broker releases anything
        raise MigrationError(f"{name}: refusing to migrate an encrypted VM without TLS: QEMU's migration "
                             "stream carries guest RAM in the clear (give TLS credentials, or --insecure)")
    layout = dest.host.platform.layout
    payload, attestation = await asyncio.to_thread(_attest, launch, vm.config, keyid_bits=layout.keyid_bits,
                                                   packages=dest.host.platform.packages)
    dest.attestation = attestation
    return await source.migrate(name, dest, payload, tls=tls, insecure=insecure, dest_tls=dest_tls,
                                progress=progress, via=via)


def broker_key_source(session: HostSession, launch: TenantLaunch) -> None:
    """Let ``session`` (a host started with ``host start NAME --tenant-server URL``) take incoming
    VMs: each one's key is released by the broker after this host attests for that VM's boot."""
    layout = session.host.platform.layout

    async def source(config: MachineConfig, tenant: str) -> Payload:
        payload, attestation = await asyncio.to_thread(_attest, launch, config, keyid_bits=layout.keyid_bits,
                                                       packages=session.host.platform.packages)
        session.attestation = attestation
        return payload
    session.key_source = source


def _attest(launch: TenantLaunch, config: MachineConfig, *, keyid_bits: int,
            packages: int) -> tuple[Payload, dict[str, Any]]:
    """The destination's measured launch and attestation; its memory key and what query shows."""
    if config.boot is None:
        raise TenantError("the VM has no boot record to measure on the destination")
    t0 = time.monotonic()
    host = AttestedHost(launch.host, launch.host_dir)
    client = BrokerClient(launch.url, launch.ca)
    try:
        host.boot(measured_set(config.boot, keyid_bits=keyid_bits, packages=packages, qemu=config.qemu))
        keys = host.fetch(client, [launch.key])
        payload = memory_payload(keys.pop(launch.key))
        keys.clear()
        launch.timings["released"] = time.monotonic() - t0
        attestation: dict[str, Any] = {**host.describe(), "key_origin": {
            "memory": f"tenant key {launch.key!r} released by {launch.url} to host {launch.host}'s TPM "
                      "for an incoming migration"}}
        return payload, attestation
    finally:
        client.close()
        host.close()
