"""An attested launch: measure the host, attest to the tenant's broker, get the VM's memory key
(and disk key) released to the host's TPM, and run the VM with them.

    async with attested_session(TenantLaunch(url, ca), config, tenant="alice") as session:
        ...

QEMU starts at once, paused (``-S``: no vCPU runs), beside the host's measured launch (PCR 8 is
the binary that very QEMU process executes; the boot files it loads are sealed memfd copies of
the hashed bytes, :func:`.measure.sealed_boot`), the broker's nonce, the image check, the quote
and the key release. QEMU holds nothing secret meanwhile. Once the keys are unwrapped, the memory
key goes from the TPM unwrap straight into the ``mktme`` key service as a ``type=user`` payload
object (never text, never a file) and QEMU binds to it; the LUKS disk is plugged in over QMP,
its passphrase encrypted under a per-launch master secret (:mod:`qemu_mktme.qemu.hotplug`); only
then do the vCPUs run. A refusal kills the paused QEMU, removes its files and says why.
Nothing here writes key bytes anywhere.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..arch.msr import Algorithm
from ..errors import AttestationError, TenantError, logged
from ..host.payload import KeyType, Payload
from ..keymaterial import KeyMaterialError, check_pair
from ..host.sanitizer import Sanitizer
from ..live.encrypted import EncryptedMachine
from ..live.session import HostSession, OwnedPayload, VmSpec
from ..qemu.devices import DiskSpec
from ..qemu.hotplug import MasterSecret, add_luks_disk, hotplug_argv
from ..qemu.machine import Machine, MachineConfig
from . import image as image_mod
from .client import BrokerClient
from .hostid import AttestedHost, host_credentials, host_dir
from .digests import Measured
from .eventlog import Event
from .measure import check_running, measure_binary, measured_set, sealed_boot

DEFAULT_KEY = "vm"


@dataclass(frozen=True)
class TenantLaunch:
    """Where the keys come from: the broker URL, the tenant CA that authenticates it, the key
    names, and the host that asks (its state directory; ``credentials``: the directory with its
    client certificate, by default ``HOSTDIR/tls``, written when the tenant enrolled it)."""

    url: str
    ca: Path
    key: str = DEFAULT_KEY
    image: Path | None = None
    host: str = "host0"
    host_dir: Path | None = None
    timings: dict[str, float] = field(default_factory=dict, compare=False)
    credentials: Path | None = None

    def client(self) -> BrokerClient:
        """A client of the broker presenting this host's own certificate."""
        directory = self.credentials or host_credentials(self.host_dir or host_dir(self.host))
        cert, key = directory / "client-cert.pem", directory / "client-key.pem"     # as tenant.pki writes them
        if not cert.is_file() or not key.is_file():
            raise AttestationError(f"host {self.host} was never enrolled by the tenant: no client certificate in "
                                   f"{directory} (the tenant runs 'qemu-mktme tenant policy --host {self.host}')")
        return BrokerClient(self.url, self.ca, cert=(cert, key))


def memory_payload(key: bytes) -> Payload:
    """A 32-byte tenant key as MKTME's AES-XTS-128 data key and tweak key (checked as every key is)."""
    if len(key) != 32:
        raise TenantError("the released memory key is not a usable AES-XTS-128 key pair: "
                          f"32 bytes expected, got {len(key)}")
    try:
        check_pair(key[:16], key[16:], Algorithm.AES_XTS_128)
    except KeyMaterialError as err:
        raise TenantError(f"the released memory key is not a usable AES-XTS-128 key pair: {err}") from None
    return Payload(KeyType.USER, Algorithm.AES_XTS_128, key[:16], key[16:])


@dataclass
class _Released:
    """What the attestation brought: the memory key, the verified image and its passphrase."""

    payload: Payload
    attestation: dict[str, Any]
    binary: Measured
    tenant: str = "default"
    image: image_mod.VerifiedImage | None = None
    passphrase: str | None = None


@contextlib.asynccontextmanager
async def attested_session(launch: TenantLaunch, config: MachineConfig, *, tenant: str | None = None,
                           keyid_bits: int = 6, packages: int = 1, trace: bool = False,
                           control: bool = True, integrity: str | None = None,
                           sanitizer: Sanitizer | None = None) -> AsyncIterator[HostSession]:
    """A :class:`HostSession` running ``config`` with keys the broker released to this host.

    The host's boot and attestation (blocking: TPM, HTTPS, hashing) run in a worker thread while
    QEMU starts paused; the TPM stays up for as long as the session runs. ``tenant``: the VM's
    tenant in the key service; by default the tenant the broker speaks for (its certificate's CN).
    """
    if config.boot is None:
        raise TenantError("an attested launch needs a guest to boot")
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        host = AttestedHost(launch.host, launch.host_dir)
        stack.callback(host.close)
        sealed = stack.enter_context(sealed_boot(config.boot))
        master = stack.enter_context(MasterSecret.for_launch()) if launch.image is not None else None
        run_config = dataclasses.replace(
            config, boot=sealed.boot, start_paused=True,
            pass_fds=(*config.pass_fds, *sealed.fds, *([master.fd] if master and master.fd is not None else [])),
            extra_args=(*(master.argv() + hotplug_argv(config.machine) if master else ()), *config.extra_args))
        loop = asyncio.get_running_loop()
        pid: asyncio.Future[int] = loop.create_future()     # QEMU's, once exec'd

        def spawned(n: int) -> None:
            if not pid.done():
                pid.set_result(n)
        # submitted now (not at the loop's next turn: QEMU's fork comes first)
        work = loop.run_in_executor(None, functools.partial(
            _attest, launch, config, host, sealed.digests, keyid_bits=keyid_bits, packages=packages,
            integrity=integrity, t0=t0))

        async def payload() -> OwnedPayload:
            released = await asyncio.shield(work)
            # the QEMU that waits for this key runs the binary measured for PCR 8, unchanged (the
            # attestation may end before QEMU is exec'd: a slow start, or its version probe)
            await asyncio.to_thread(check_running, await pid, released.binary)
            return OwnedPayload(released.payload, tenant or released.tenant)

        async def disk(vm: Machine) -> None:
            released = work.result()
            if released.image is None or master is None or released.passphrase is None:
                return
            t1 = time.monotonic()
            await add_luks_disk(vm, released.image.fd, released.passphrase, master, node=f"disk{len(config.disks)}")
            released.passphrase = None
            launch.timings["disk"] = time.monotonic() - t1
        spec = VmSpec(run_config, tenant or "(attesting)", payload(), trace=trace, spawned=spawned, prepare=disk)
        running = False
        try:
            async with HostSession([spec], keyid_bits=keyid_bits, packages=packages, control=control,
                                   integrity=integrity, sanitizer=sanitizer, name=launch.host) as session:
                sealed.close()                 # loaded by QEMU at its start
                released = work.result()
                vm = session.machines[config.name]
                disks = tuple(config.disks)
                if released.image is not None:
                    disks += (DiskSpec(released.image.path, "qcow2", dma="qemu", readonly=True),)
                # what the VM runs: the files it booted (not their memfd copies) and its disks
                vm.config = dataclasses.replace(config, disks=disks)
                if isinstance(vm, EncryptedMachine):
                    vm.key_name = launch.key           # travels with a migration (attest/migrate.py)
                session.attestation = released.attestation
                session.identity = host        # its TPM runs on: an incoming migration attests with it
                if not config.start_paused:
                    await vm.resume()
                launch.timings["launch"] = time.monotonic() - t0 - launch.timings["released"]
                running = True
                yield session
        except Exception as err:
            refusal = None if running else await _refusal(work)
            if refusal is not None and refusal is not err:
                raise refusal from err        # QEMU failed first, but the host was refused: that is why
            raise
        finally:
            with logged(__name__, "waiting for the attestation worker", BaseException):
                done = await work              # the worker uses the TPM: it ends before the TPM does
                if done.image is not None:
                    os.close(done.image.fd)


async def _refusal(work: asyncio.Future[_Released]) -> AttestationError | None:
    """The broker's refusal, once the attestation (still running when QEMU failed) has ended."""
    with logged(__name__, "waiting for the attestation", BaseException):
        await asyncio.wait([work])
    if work.done() and not work.cancelled() and isinstance(work.exception(), AttestationError):
        return work.exception()  # type: ignore[return-value]
    return None


def _attest(launch: TenantLaunch, config: MachineConfig, host: AttestedHost, boot_digests: dict[Path, bytes], *,
            keyid_bits: int, packages: int, integrity: str | None, t0: float) -> _Released:
    """Boot the host (measured launch: QEMU's binary, the sealed boot files), attest, unwrap.
    Timings count from ``t0``, the launch's start."""
    assert config.boot is not None
    timings = launch.timings
    client = launch.client()
    verified = None
    try:
        # The TPM's start and the hashing run beside the broker's nonce and the image check: none
        # needs another, and the quote waits for all.
        def measure_all() -> tuple[Measured, list[Event]]:
            binary = measure_binary(config.qemu)
            return binary, measured_set(config.boot, keyid_bits=keyid_bits, packages=packages,  # type: ignore[arg-type]
                                        qemu=config.qemu, binary_file=binary, boot_digests=boot_digests,
                                        integrity=integrity)
        with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="measure") as pool:
            powered = pool.submit(host.power_on)
            events = pool.submit(measure_all)
            try:
                hint = image_mod.disk_key_hint(launch.image) if launch.image is not None else None
                nonce = client.nonce([launch.key] + ([hint] if hint else []))
                if launch.image is not None:
                    t1 = time.monotonic()
                    verified = image_mod.verify(launch.image, client.manifest_key())
                    timings["image-verify"] = time.monotonic() - t1
            finally:
                started: list[concurrent.futures.Future[Any]] = [powered, events]
                concurrent.futures.wait(started)
            powered.result()
            binary, measured = events.result()
            host.boot(measured)
        timings["measure"] = time.monotonic() - t0
        names = [launch.key] + ([verified.disk_key] if verified else [])
        keys = host.fetch(client, names, nonce)
        timings["released"] = time.monotonic() - t0
        seconds = host.result["seconds"]
        timings["attest"] = seconds["attest"]
        timings["release"] = seconds["broker"] + seconds["unwrap"]
        released = _Released(memory_payload(keys.pop(launch.key)), {}, binary, client.tenant or "default")
        if verified is not None:
            released.image = verified
            released.passphrase = image_mod.passphrase(keys.pop(verified.disk_key))
        keys.clear()
    except BaseException:
        if verified is not None:
            os.close(verified.fd)
        raise
    finally:
        client.close()
    origin = {"memory": f"tenant key {launch.key!r} released by {launch.url} to host {launch.host}'s TPM"}
    if verified is not None:
        origin["disk"] = (f"{verified.path} (LUKS, manifest verified, sha256 {verified.sha256[:16]}...): "
                          f"tenant key {verified.disk_key!r} released to the TPM")
    released.attestation = {**host.describe(), "key_origin": origin}
    return released
