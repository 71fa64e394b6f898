"""``qemu-mktme run``: boot guests in the foreground, with their consoles."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from .. import images
from ..attend import attend
from ..engine.platform import MITIGATIONS
from ..keymaterial import key_payload
from ..host.sanitizer import Sanitizer
from ..live.session import HostSession, VmSpec
from ..qemu.machine import MachineConfig
from ..qemu.passthrough import refusal_table
from ..attest.launch import DEFAULT_KEY, TenantLaunch
from ..tenant.store import TenantDir
from .nvdimm import nvdimm_option
from .options import PROG, UsageError, add_guest_options, add_mktme_options, alias_bit, seconds, vm_name


def vm_entry(text: str) -> dict[str, str]:
    entry = {}
    for part in text.split(","):
        k, sep, v = part.partition("=")
        if not sep or k not in ("name", "tenant", "key") or not v:
            raise argparse.ArgumentTypeError(f"expected name=N[,tenant=T][,key=SPEC], got {text!r}")
        entry[k] = v
    if "name" not in entry:
        raise argparse.ArgumentTypeError(f"--vm needs name=, got {text!r}")
    vm_name(entry["name"])
    return entry


def guest_config(args: argparse.Namespace, *, name: str, start_paused: bool) -> MachineConfig:
    """The machine configuration the guest options describe (``ValueError`` if they cannot work)."""
    return images.machine_config(args.guest, memory=args.memory, cpus=args.cpus, accel=args.accel,
                                 workload=args.workload, params=dict(args.param), commands=args.command,
                                 append=args.append, initrd=args.initrd, disks=args.disk, nets=args.net,
                                 qemu=args.qemu, extra_args=args.qemu_args, overlay_dir=getattr(args, "overlay_dir", None),
                                 name=name, start_paused=start_paused)


_MAC_MODES = ("mac", "mac+owner", "freshness")


def _mitigation(args: argparse.Namespace) -> str | None:
    """The platform mode ``--mitigation`` or ``--integrity`` asked for (they must agree)."""
    integrity, mitigation = getattr(args, "integrity", None), getattr(args, "mitigation", None)
    if integrity and mitigation and integrity != mitigation:
        raise UsageError(f"--integrity {integrity} and --mitigation {mitigation} disagree: give one")
    return mitigation or integrity


def vm_specs(args: argparse.Namespace) -> list[VmSpec]:
    """The VMs ``run`` starts: the guest options once, or once per ``--vm``.

    Everything is checked here, before anything starts: ``UsageError`` says what cannot work.
    """
    base_name = args.name or (args.guest if args.guest in images.RECIPES else "guest")
    entries = args.vm or [{}]
    names = [entry.get("name") or (base_name if len(entries) == 1 else f"{base_name}{n}")
             for n, entry in enumerate(entries)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"VM name {twice[0]!r} given twice")
    specs = []
    try:
        for name, entry in zip(names, entries):
            payload = key_payload(entry.get("key", args.key))
            config = guest_config(args, name=name, start_paused=args.paused)
            if payload is None and any(d.dma == "vhost" for d in config.disks):
                raise ValueError("dma=vhost needs the MKTME host model (its IOMMU): not with --key none")
            if payload is None and any(d.poll_max_ns is not None for d in config.disks):
                raise ValueError("poll-max-ns is our vhost-user backend's (dma=vhost): with --key none QEMU "
                                 "serves the disk itself")
            iommu_keyid = getattr(args, "iommu_keyid", None)
            if iommu_keyid is not None and payload is None:
                raise ValueError("--iommu-keyid needs the MKTME host model: not with --key none")
            if iommu_keyid is not None and not 0 <= iommu_keyid < 1 << args.keyid_bits:
                raise ValueError(f"--iommu-keyid {iommu_keyid} is outside 0..{(1 << args.keyid_bits) - 1} "
                                 f"(with {args.keyid_bits} KeyID bits)")
            # guest instructions (--sanitize) and consumed poison (a MAC mode) need the shim
            trace = args.trace or getattr(args, "sanitize", False) or _mitigation(args) in _MAC_MODES
            nvdimms = tuple(getattr(args, "nvdimm", ()))
            if nvdimms and payload is None:
                raise ValueError("--nvdimm needs the MKTME host model (the module is encrypted): not with --key none")
            if nvdimms and len(entries) > 1:
                raise ValueError("--nvdimm with several --vm: one media image per VM, run them separately")
            specs.append(VmSpec(config, entry.get("tenant", args.tenant or "default"), payload, trace=trace,
                                iommu_keyid=iommu_keyid, nvdimms=nvdimms,
                                nvdimm_strict=getattr(args, "nvdimm_strict", False)))
    except ValueError as err:
        raise UsageError(str(err)) from None
    return specs


def tenant_launch(args: argparse.Namespace) -> TenantLaunch | None:
    """The attested launch ``run``'s options ask for, or None; ``ValueError`` for what cannot work."""
    if not args.tenant_server:
        if args.image:
            raise ValueError("--image needs --tenant-server (its key comes from the tenant's broker)")
        return None
    if args.key != "cpu":
        raise ValueError("--key and --tenant-server exclude each other: the key comes from the tenant server")
    if args.vm:
        raise ValueError("--tenant-server runs one VM (no --vm)")
    if getattr(args, "nvdimm", None):
        raise ValueError("--nvdimm is not supported with --tenant-server yet: run with --key user:...")
    ca = Path(args.tenant_ca) if args.tenant_ca else TenantDir().pki.ca
    if not ca.is_file():
        raise ValueError(f"tenant CA certificate {ca} does not exist (give --tenant-ca)")
    image = Path(args.image) if args.image else None
    if image is not None and not image.is_file():
        raise ValueError(f"image {image} does not exist or is not a regular file")
    return TenantLaunch(args.tenant_server, ca, key=args.tenant_key, image=image, host=args.host_name)


async def run_guest(args: argparse.Namespace) -> int:
    try:
        launch = tenant_launch(args)
    except ValueError as err:
        raise UsageError(str(err)) from None
    sanitizer = Sanitizer(lambda r: print(f"{PROG}: {r}", file=sys.stderr, flush=True)) if args.sanitize else None
    try:
        with tempfile.TemporaryDirectory(prefix="qemu-mktme-disks-") as overlays:   # 0700, removed on exit
            args.overlay_dir = overlays
            return await _run_session(args, launch, sanitizer)
    finally:
        if sanitizer is not None:
            for line in sanitizer.summary():
                print(f"{PROG}: {line}", file=sys.stderr)


async def _run_session(args: argparse.Namespace, launch: TenantLaunch | None, sanitizer: Sanitizer | None) -> int:
    """The host session ``run`` asked for: attested through the tenant's broker, or local keys."""
    trace_interval = args.trace_interval if args.trace else None
    mitigation = _mitigation(args)
    if launch is not None and (mitigation not in (None, "none", "mac") or args.dimm_alias is not None):
        raise UsageError("an attested launch measures --integrity mac only: --mitigation and --dimm-alias "
                         "are for local runs")
    if launch is not None:
        from ..attest.launch import attested_session
        spec = vm_specs(args)[0]
        async with attested_session(launch, spec.config, tenant=args.tenant, keyid_bits=args.keyid_bits,
                                    packages=args.packages, trace=spec.trace,
                                    integrity="mac" if mitigation == "mac" else None,
                                    sanitizer=sanitizer) as session:
            print(f"{PROG}: host {launch.host} attested: {(session.attestation or {}).get('verdict')}", file=sys.stderr)
            from ..attest.migrate import broker_key_source
            broker_key_source(session, launch)        # VMs may migrate here too (keys from the broker)
            return await attend(session, no_input=args.no_input, trace_interval=trace_interval)
    async with HostSession(vm_specs(args), keyid_bits=args.keyid_bits, packages=args.packages,
                           mitigation=mitigation, dimm_alias=args.dimm_alias, sanitizer=sanitizer,
                           name=args.host_name) as session:
        return await attend(session, no_input=args.no_input, trace_interval=trace_interval)


def add_tenant_options(run: argparse.ArgumentParser) -> None:
    g = run.add_argument_group("tenant (attested launch)")
    g.add_argument("--tenant-server", metavar="URL",
                   help="get the VM's key from this key broker after attesting the host (https://127.0.0.1:PORT)")
    g.add_argument("--tenant-ca", metavar="PATH",
                   help="the tenant's CA certificate (default: ca-cert.pem of the tenant directory)")
    g.add_argument("--tenant-key", default=DEFAULT_KEY, metavar="NAME", help=f"the memory key's name (default: {DEFAULT_KEY})")
    g.add_argument("--image", metavar="DISK.qcow2", help="the tenant's encrypted image (needs --tenant-server)")
    g.add_argument("--host-name", default="host0", metavar="NAME", help="this emulated host's identity (default: host0)")


def register(sub: Any) -> None:
    run = sub.add_parser("run", help="boot a guest in the foreground with its console",
                         usage="%(prog)s [options] [-- QEMU-OPTIONS...]",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Boot a guest under QEMU and attach this terminal to its serial "
                                     "console. Ctrl-] quits.\n\nOptions after -- go to QEMU unchanged "
                                     "(checked against its -help), except these, which would break the "
                                     "emulation:\n" + refusal_table())
    add_guest_options(run)
    add_mktme_options(run)
    run.add_argument("--name", type=vm_name, help="VM name (default: the image name)")
    run.add_argument("--vm", type=vm_entry, action="append", metavar="name=N[,tenant=T][,key=SPEC]",
                     help="run several VMs of this guest in one host (repeatable); VMs of one tenant "
                          "with the same user key share a KeyID")
    run.add_argument("--trace", action="store_true", help="print per-KeyID memory traffic every few seconds")
    run.add_argument("--trace-interval", type=seconds(0, 3600, "trace interval"), default=3.0, metavar="S", help=argparse.SUPPRESS)
    run.add_argument("--paused", action="store_true", help="start with the vCPUs stopped")
    run.add_argument("--sanitize", action="store_true",
                     help="KeyID-aliasing sanitizer: report rules (a)-(d) as they happen, a summary at exit")
    run.add_argument("--integrity", choices=("mac",), default=None,
                     help="per-line MAC (TDX-like, not MKTME): tampered lines poison, consuming them stops the VM")
    run.add_argument("--mitigation", choices=MITIGATIONS, default=None,
                     help="platform mode (docs/attacks.md): none (MKTME as shipped), mac (= --integrity mac), "
                          "mac+owner (TDX's TD-owner bit), alias-check (the BIOS refuses an aliased DIMM), "
                          "ciphertext-hiding (SNP's), freshness (SGX-MEE-like version counters)")
    run.add_argument("--dimm-alias", type=alias_bit, default=None, metavar="BIT",
                     help="BadRAM: the DIMMs decode one address bit less than declared, so host physical "
                          "addresses differing in BIT reach one DRAM cell (33..39)")
    run.add_argument("--no-input", action="store_true", help="do not forward standard input to the guest")
    run.add_argument("--nvdimm", type=nvdimm_option, action="append", default=[], metavar="PATH[,size=SIZE][,hpa=ADDR]",
                     help="persistent memory on media image PATH (created with size=; ciphertext under the VM's key, "
                          "HPA as tweak; repeatable): the Linux guest's /dev/pmem0. A comma in PATH is written ',,' "
                          "(QEMU's option syntax)")
    run.add_argument("--nvdimm-strict", action="store_true",
                     help="refuse a media image written at another HPA (default: attach it, warn: garbage)")
    add_tenant_options(run)
    run.set_defaults(func=run_guest, qemu_passthrough=True)
