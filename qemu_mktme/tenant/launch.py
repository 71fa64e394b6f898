"""An attested launch: measure the host, attest to the tenant's broker, get the VM's memory key
(and disk key) released to the host's TPM, and start the VM with them.

    async with attested_session(TenantLaunch(url, ca), config, tenant="alice") as session:
        ...

The memory key goes from the TPM unwrap straight into the ``mktme`` key service as a ``type=user``
payload object (never text, never a file); the disk key reaches QEMU as a LUKS passphrase through
an inherited pipe. Nothing here writes key bytes anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..arch.msr import Algorithm
from ..errors import TenantError
from ..host.payload import KeyType, Payload
from ..host.sanitizer import Sanitizer
from ..live.session import HostSession, VmSpec
from ..qemu.devices import DiskSpec
from ..qemu.machine import MachineConfig
from . import image as image_mod
from .broker import BrokerClient
from .hostid import AttestedHost
from .measure import measured_set

DEFAULT_KEY = "vm"


@dataclass(frozen=True)
class TenantLaunch:
    """Where the keys come from: the broker URL, the tenant CA that authenticates it, the key names."""

    url: str
    ca: Path
    key: str = DEFAULT_KEY
    image: Path | None = None
    host: str = "host0"
    host_dir: Path | None = None
    timings: dict[str, float] = field(default_factory=dict, compare=False)


def memory_payload(key: bytes) -> Payload:
    """A 32-byte tenant key as MKTME's AES-XTS-128 data key and tweak key."""
    if len(key) != 32 or key[:16] == key[16:]:
        raise TenantError("the released memory key is not a usable AES-XTS-128 key pair")
    return Payload(KeyType.USER, Algorithm.AES_XTS_128, key[:16], key[16:])


@contextlib.asynccontextmanager
async def attested_session(launch: TenantLaunch, config: MachineConfig, *, tenant: str = "default",
                           keyid_bits: int = 6, packages: int = 1, trace: bool = False,
                           control: bool = True, integrity: str | None = None,
                           sanitizer: Sanitizer | None = None) -> AsyncIterator[HostSession]:
    """A :class:`HostSession` running ``config`` with keys the broker released to this host.

    The host's boot and attestation (blocking: TPM, HTTPS, hashing) run in a worker thread, so
    the event loop stays free; the TPM stays up for as long as the session runs.
    """
    if config.boot is None:
        raise TenantError("an attested launch needs a guest to boot")
    with contextlib.ExitStack() as stack:
        spec, attestation, host = await asyncio.to_thread(_prepare, launch, config, stack, tenant=tenant,
                                                          keyid_bits=keyid_bits, packages=packages, trace=trace)
        t2 = time.monotonic()
        async with HostSession([spec], keyid_bits=keyid_bits, packages=packages, control=control,
                               attestation=attestation, integrity=integrity, sanitizer=sanitizer,
                               name=launch.host) as session:
            launch.timings["launch"] = time.monotonic() - t2      # QEMU started, LUKS opened, guest running
            session.identity = host        # its TPM runs on: an incoming migration attests with it
            yield session


def _prepare(launch: TenantLaunch, config: MachineConfig, stack: contextlib.ExitStack, *, tenant: str,
             keyid_bits: int, packages: int, trace: bool) -> tuple[VmSpec, dict[str, Any], AttestedHost]:
    """Boot the host (measured launch), attest, unwrap the keys: the VM to start and what to show."""
    assert config.boot is not None
    timings = launch.timings
    t0 = time.monotonic()
    host = AttestedHost(launch.host, launch.host_dir)
    stack.callback(host.close)
    client = BrokerClient(launch.url, launch.ca)
    stack.callback(client.close)

    def boot() -> None:
        assert config.boot is not None
        host.boot(measured_set(config.boot, keyid_bits=keyid_bits, packages=packages, qemu=config.qemu))
        timings["measure"] = time.monotonic() - t0
    # The host's measured launch (hashing, swtpm, PCR extends) runs beside the broker's nonce and
    # the image check: neither needs the other, and the quote waits for both.
    with ThreadPoolExecutor(1, thread_name_prefix="measure") as pool:
        booted = pool.submit(boot)
        try:
            nonce = client.nonce()
            verified = None
            if launch.image is not None:
                t1 = time.monotonic()
                verified = image_mod.verify(launch.image, client.manifest_key())
                stack.callback(os.close, verified.fd)
                timings["image-verify"] = time.monotonic() - t1
        finally:
            booted.result()
    names = [launch.key] + ([verified.disk_key] if verified else [])
    keys = host.fetch(client, names, nonce)
    timings["released"] = time.monotonic() - t0
    seconds = host.result["seconds"]
    timings["attest"] = seconds["attest"]
    timings["release"] = seconds["broker"] + seconds["unwrap"]
    payload = memory_payload(keys.pop(launch.key))
    disks = tuple(config.disks)
    pass_fds = tuple(config.pass_fds)
    if verified is not None:
        secret = stack.enter_context(image_mod.secret_pipe(image_mod.passphrase(keys.pop(verified.disk_key))))
        disks += (DiskSpec(Path(f"/dev/fd/{verified.fd}"), "qcow2", dma="qemu", readonly=True, secret_fd=secret),)
        pass_fds += (verified.fd, secret)
    keys.clear()
    origin = {"memory": f"tenant key {launch.key!r} released by {launch.url} to host {launch.host}'s TPM"}
    if verified is not None:
        origin["disk"] = (f"{verified.path} (LUKS, manifest verified, sha256 {verified.sha256[:16]}...): "
                          f"tenant key {verified.disk_key!r} released to the TPM")
    attestation: dict[str, Any] = {**host.describe(), "key_origin": origin}
    cfg = dataclasses.replace(config, disks=disks, pass_fds=pass_fds)
    return VmSpec(cfg, tenant, payload, trace=trace), attestation, host
