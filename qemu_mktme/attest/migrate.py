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

from ..errors import AttestationError, MigrationError, TenantError
from ..host.payload import Payload
from ..live.migrate import MigrateProgress, MigrationResult
from ..live.session import HostSession
from ..qemu.machine import MachineConfig
from .hostid import AttestedHost
from .launch import TenantLaunch, memory_payload
from .measure import measured_set


async def attested_migration(source: HostSession, name: str, dest: HostSession, launch: TenantLaunch, *,
                             tls: Path | None, insecure: bool = False, dest_tls: Path | None = None,
                             progress: MigrateProgress | None = None,
                             via: Callable[[int], int] | None = None) -> MigrationResult:
    """Attest ``launch.host`` (the destination), get the VM's own key released to it (the name its
    key came under, else ``launch.key``), then migrate VM ``name`` from ``source`` to ``dest`` with
    that key. Raises ``AttestationError`` (nothing started, the source untouched: also when the
    broker is another tenant's or the key is not for that host) or ``MigrationError``."""
    vm = source.machines.get(name)
    if vm is None:
        raise MigrationError(f"no VM named {name!r} (have: {', '.join(source.machines) or 'none'})")
    key_name = getattr(vm, "key_name", None) or launch.key
    tenant = getattr(vm, "tenant", None)
    if tls is None and not insecure:     # refuse before the broker releases anything
        raise MigrationError(f"{name}: refusing to migrate an encrypted VM without TLS: QEMU's migration "
                             "stream carries guest RAM in the clear (give TLS credentials, or --insecure)")
    # the destination attests while its QEMU starts; it binds (and the stream starts) only once
    # the broker released the key
    key = asyncio.ensure_future(_key_for(dest, launch, vm.config, key_name=key_name, tenant=tenant))
    try:
        return await source.migrate(name, dest, key, tls=tls, insecure=insecure, dest_tls=dest_tls,
                                    progress=progress, via=via)
    finally:
        if not key.done():
            key.cancel()
        elif not key.cancelled() and key.exception() is not None:
            key.exception()                      # retrieved: raised above through the launch


def broker_key_source(session: HostSession, launch: TenantLaunch) -> None:
    """Let ``session`` (a host started with ``host start NAME --tenant-server URL``) take incoming
    VMs: each one's key is released by the broker after this host attests for that VM's boot.

    The key is the VM's own (its tenant and key name travel with the migration), never the key
    this host was configured with (``launch.key``, its own VMs' key): a VM of another tenant than
    the broker's, or one whose key did not come from a broker, is refused before any RAM moves."""
    async def source(config: MachineConfig, tenant: str, key_name: str | None) -> Payload:
        if key_name is None:
            raise MigrationError(f"{config.name}: its key did not come from a tenant's broker (a local key), so "
                                 f"host {launch.host} cannot get it; only VMs launched with --tenant-server migrate here")
        return await _key_for(session, launch, config, key_name=key_name, tenant=tenant)
    session.key_source = source


async def _key_for(dest: HostSession, launch: TenantLaunch, config: MachineConfig, *, key_name: str,
                   tenant: str | None) -> Payload:
    """The destination's key ``key_name`` of ``tenant``: its running TPM attests again (fresh
    nonce), or its measured launch happens now, and the TPM stays up for as long as the host runs."""
    own = dest.identity if isinstance(dest.identity, AttestedHost) and dest.identity.name == launch.host else None
    host = own or AttestedHost(launch.host, launch.host_dir)
    layout = dest.host.platform.layout
    try:
        payload, attestation = await asyncio.to_thread(_attest, host, launch, config, key_name, tenant,
                                                       boot=own is None,
                                                       keyid_bits=layout.keyid_bits,
                                                       packages=dest.host.platform.packages,
                                                       integrity=dest.host.platform.integrity)
    except BaseException:
        if own is None:
            host.close()
        raise
    if own is None:
        dest.identity = host
        dest.on_close(host.close)
    dest.attestation = attestation
    return payload


def _attest(host: AttestedHost, launch: TenantLaunch, config: MachineConfig, key_name: str, tenant: str | None, *,
            boot: bool, keyid_bits: int, packages: int, integrity: str | None = None) -> tuple[Payload, dict[str, Any]]:
    """The destination's measured launch and attestation; the VM's memory key and what query shows.
    The broker speaks for one tenant (its certificate's CN, in its nonce answer): a VM of another
    tenant is refused before the release."""
    if config.boot is None:
        raise TenantError("the VM has no boot record to measure on the destination")
    t0 = time.monotonic()
    client = launch.client()
    try:
        nonce = client.nonce([key_name])
        if tenant is not None and client.tenant is not None and client.tenant != tenant:
            raise AttestationError(f"{config.name} belongs to tenant {tenant!r}; host {launch.host} gets keys from "
                                   f"tenant {client.tenant!r}'s broker ({launch.url}): refused")
        if boot:
            host.boot(measured_set(config.boot, keyid_bits=keyid_bits, packages=packages, qemu=config.qemu,
                                   integrity=integrity))
        keys = host.fetch(client, [key_name], nonce)
        payload = memory_payload(keys.pop(key_name))
        keys.clear()
        launch.timings["released"] = time.monotonic() - t0
        attestation: dict[str, Any] = {**host.describe(), "key_origin": {
            "memory": f"tenant {client.tenant}'s key {key_name!r} released by {launch.url} to host {launch.host}'s "
                      "TPM for an incoming migration"}}
        return payload, attestation
    finally:
        client.close()
