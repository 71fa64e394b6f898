"""``qemu-mktme``: the command line. Thin: parse, call the library, print, map errors to exit codes.

Exit status: 0 success, 1 a domain error (one line ``qemu-mktme: error: ...``; ``--traceback``
for the rest), 2 a usage error (argparse, or a command line found unworkable before anything
starts: an unknown workload, a bad key file, too little memory), 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from . import demo, verifier
from .attend import TERMINATED, ProgressBar, attend
from .errors import AttachError, MktmeError
from .inspect.command import add_inspect_parser
from .attack.command import add_attack_parser
from .live import control
from . import images
from .images import backports
from .files import snapfile
from .files.keyfile import key_payload, read_key_file
from .qemu.binary import find_qemu
from .qemu.devices import DiskSpec, NetSpec
from .qemu.passthrough import check_passthrough, refusal_table
from .qemu.machine import MachineConfig, parse_size
from .host.sanitizer import Sanitizer
from .live.encrypted import shim_hint
from .live.session import HostSession, VmSpec
from .trace.shim import build_shim
from .live.snapshot import snapshot_summary
from .tenant import command as tenant_command
from .tenant import story as tenant_story

PROG = "qemu-mktme"
VM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


class UsageError(Exception):
    """A command line that cannot work, found before anything starts: exit 2, as argparse does."""


# ---------------------------------------------------------------------------------- helpers


def _param(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return key, value


def _vm_name(text: str) -> str:
    if not VM_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"invalid VM name {text!r}: use up to 64 letters, digits, '_', '.' and '-', not starting with '.' or '-'")
    return text


def _command(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("empty bare-metal command")
    return text


def _keyid_bits(text: str) -> int:
    try:
        bits = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= bits <= 15:
        raise argparse.ArgumentTypeError(f"KeyID bits must be 1..15, got {bits}")
    return bits


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _disk(text: str) -> DiskSpec:
    try:
        return DiskSpec.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _net(text: str) -> NetSpec:
    try:
        return NetSpec.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def add_guest_options(p: argparse.ArgumentParser) -> None:
    """Options that choose and boot a guest (shared by run and the commands that boot one)."""
    g = p.add_argument_group("guest")
    g.add_argument("--guest", default="baremetal", metavar="baremetal|linux|debian|PATH",
                   help="image to boot, or a kernel file (default: baremetal)")
    g.add_argument("--memory", "-m", type=_size, default=None, metavar="SIZE",
                   help=f"guest RAM, e.g. 512M or 5G (default: {images.default_memory_help()})")
    g.add_argument("--cpus", type=int, default=1, metavar="N", help="vCPUs (default: 1)")
    g.add_argument("--workload", metavar="NAME", help="Linux guest: workload to run (default: hello)")
    g.add_argument("--param", type=_param, action="append", default=[], metavar="NAME=VALUE",
                   help="Linux guest: workload parameter (repeatable), e.g. --param secret=abc")
    g.add_argument("--command", "-c", type=_command, action="append", default=[], metavar="CMD",
                   help="bare-metal guest: command to run at boot (repeatable), e.g. -c 'crc 0x200000 4096'")
    g.add_argument("--append", default="", metavar="ARGS", help="extra kernel command line")
    g.add_argument("--initrd", metavar="PATH", help="initrd for a kernel given as --guest PATH")
    g.add_argument("--disk", type=_disk, action="append", default=[], metavar="PATH[,format=raw|qcow2][,dma=vhost|qemu][,readonly=on]",
                   help="attach a file as a virtio disk (repeatable); dma=qemu is QEMU's own virtio-blk. "
                        "The debian guest boots from the first disk, or from a throwaway overlay on its image")
    g.add_argument("--net", type=_net, action="append", default=[], metavar="user[,hostfwd=tcp:ADDR:PORT-:PORT]",
                   help="a virtio NIC on QEMU's user networking (repeatable), e.g. "
                        "--net user,hostfwd=tcp:127.0.0.1:2222-:22")
    g.add_argument("--qemu", metavar="PATH|qemu10", default=None,
                   help="the qemu-system-x86_64 binary, or qemu10 for the one 'images build qemu10' unpacked "
                        "(default: $QEMU_MKTME_QEMU, else the one in PATH)")
    g.add_argument("--accel", choices=("tcg", "kvm", "auto"), default="tcg",
                   help="accelerator (default: tcg; auto uses KVM only when it works)")


def add_mktme_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("MKTME")
    g.add_argument("--key", default="cpu", metavar="SPEC",
                   help="the VM's key: cpu[:ALG], user:KEYHEX:TWEAKHEX[:ALG], user:@FILE[:ALG] (keeps the "
                        "key out of ps), clear, no-encrypt, or none for plain QEMU (default: cpu)")
    g.add_argument("--tenant", default=None,
                   help="tenant owning the key (default: default; with --tenant-server: the tenant's certificate CN)")
    g.add_argument("--iommu-keyid", type=int, default=None, metavar="N",
                   help="fault injection: program the VM's IOMMU domain with KeyID N (device DMA then "
                        "reads and writes garbage; the DMA sanitizer reports each transfer)")
    g.add_argument("--keyid-bits", type=_keyid_bits, default=6, metavar="N",
                   help="MK_TME_KEYID_BITS the BIOS activates (default 6: 63 KeyIDs)")
    g.add_argument("--packages", type=int, default=1, metavar="N", help="CPU packages (key tables), default 1")


def _vm_entry(text: str) -> dict[str, str]:
    entry = {}
    for part in text.split(","):
        k, sep, v = part.partition("=")
        if not sep or k not in ("name", "tenant", "key") or not v:
            raise argparse.ArgumentTypeError(f"expected name=N[,tenant=T][,key=SPEC], got {text!r}")
        entry[k] = v
    if "name" not in entry:
        raise argparse.ArgumentTypeError(f"--vm needs name=, got {text!r}")
    _vm_name(entry["name"])
    return entry


def guest_config(args: argparse.Namespace, **overrides: Any) -> MachineConfig:
    """The machine configuration the guest options describe (``ValueError`` if they cannot work)."""
    if args.initrd is not None and args.guest in images.RECIPES:
        raise ValueError(f"--initrd is for a kernel given as --guest PATH; the {args.guest} image brings its own")
    boot = images.guest_boot(args.guest, workload=args.workload, commands=args.command,
                             params=dict(args.param), append=args.append, initrd=args.initrd)
    memory = args.memory or images.default_memory(args.guest)
    disks = tuple(getattr(args, "disk", ()))
    if not disks and args.guest in images.RECIPES and images.load(args.guest).disk is not None:
        directory = getattr(args, "overlay_dir", None)
        if directory is None:
            raise ValueError(f"the {args.guest} guest needs a root disk: give --disk FILE")
        disks = (images.overlay_disk(images.load(args.guest), directory, name=overrides.get("name", args.guest)),)
    qemu = getattr(args, "qemu", None)
    if qemu in backports.RELEASES:
        qemu = str(backports.qemu_path(qemu))
    extra = tuple(getattr(args, "qemu_args", ()))
    if extra:
        extra = check_passthrough(extra, str(find_qemu(qemu).path))
    fields: dict[str, Any] = dict(boot=boot, memory=memory, cpus=args.cpus, accel=args.accel, disks=disks,
                                  nets=tuple(getattr(args, "net", ())), qemu=qemu,
                                  extra_args=extra)
    fields.update(overrides)
    for disk in fields["disks"]:
        disk.check()
    return MachineConfig(**fields)


# ---------------------------------------------------------------------------------- run


def _vm_specs(args: argparse.Namespace) -> list[VmSpec]:
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
            iommu_keyid = getattr(args, "iommu_keyid", None)
            if iommu_keyid is not None and payload is None:
                raise ValueError("--iommu-keyid needs the MKTME host model: not with --key none")
            if iommu_keyid is not None and not 0 <= iommu_keyid < 1 << args.keyid_bits:
                raise ValueError(f"--iommu-keyid {iommu_keyid} is outside 0..{(1 << args.keyid_bits) - 1} "
                                 f"(with {args.keyid_bits} KeyID bits)")
            # guest instructions (--sanitize) and consumed poison (--integrity) need the shim
            trace = args.trace or getattr(args, "sanitize", False) or bool(getattr(args, "integrity", None))
            specs.append(VmSpec(config, entry.get("tenant", args.tenant or "default"), payload, trace=trace,
                                iommu_keyid=iommu_keyid))
    except ValueError as err:
        raise UsageError(str(err)) from None
    return specs


async def run_guest(args: argparse.Namespace) -> int:
    try:
        launch = tenant_command.launch_from_args(args)
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


async def _run_session(args: argparse.Namespace, launch: Any, sanitizer: Sanitizer | None) -> int:
    """The host session ``run`` asked for: attested through the tenant's broker, or local keys."""
    if launch is not None:
        from .tenant.launch import attested_session
        spec = _vm_specs(args)[0]
        async with attested_session(launch, spec.config, tenant=args.tenant, keyid_bits=args.keyid_bits,
                                    packages=args.packages, trace=spec.trace, integrity=args.integrity,
                                    sanitizer=sanitizer) as session:
            print(f"{PROG}: host {launch.host} attested: {session.attestation['verdict']}", file=sys.stderr)
            from .tenant.migrate import broker_key_source
            broker_key_source(session, launch)        # VMs may migrate here too (keys from the broker)
            return await attend(session, args)
    async with HostSession(_vm_specs(args), keyid_bits=args.keyid_bits, packages=args.packages,
                           integrity=args.integrity, sanitizer=sanitizer, name=args.host_name) as session:
        return await attend(session, args)


async def attach_qemu(args: argparse.Namespace) -> int:
    try:
        payload = key_payload(args.key)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if payload is None:
        raise UsageError("--key none attaches nothing: give the VM a key (cpu, user:..., clear, no-encrypt)")
    async with HostSession([], keyid_bits=args.keyid_bits) as session:
        vm = await session.attach(args.qmp, name=args.name, tenant=args.tenant, payload=payload,
                                  ram_path=args.ram_path, console_socket=args.console)
        print(f"{PROG}: attached {vm.name}: {len(vm.ram.ranges)} RAM range(s), {vm.ram.size >> 20} MiB, "
              f"backend {vm.ram.backend_path}", file=sys.stderr)
        with contextlib.suppress(MktmeError):
            print(f"{PROG}: {shim_hint(find_qemu(f'/proc/{vm.pid}/exe') if vm.pid else find_qemu())}", file=sys.stderr)
        args.no_input = args.no_input or args.console is None
        return await attend(session, args)


def _read_kek(path: str) -> bytes:
    """The KEK, read here by the client (a running host never opens the user's key files)."""
    what = "key-encryption key file"
    try:
        return snapfile.load_kek(read_key_file(path, what=what), f"{what} {path}")
    except ValueError as err:
        raise UsageError(str(err)) from None


def snapshot_save(args: argparse.Namespace) -> int:
    kek = _read_kek(args.kek_file)
    path = os.path.abspath(args.path)
    before = _file_identity(path)
    bar = ProgressBar("saving")
    try:
        r = run_async(control.request("snapshot-save", pid=args.pid, progress=bar, path=path,
                                      vm=args.vm_name, kek=kek.hex()))
    except AttachError:
        # The host may have died after its rename put the new snapshot in place: say what is true.
        if _file_identity(path) not in (before, None) and _verifies(path, kek):
            print(f"saved {path} (verified; the host exited before it could confirm)")
            return 0
        raise
    finally:
        bar.close()
    print(f"saved {r['path']}: {r['stored_nbytes'] >> 20} MiB of RAM in {r['chunks']} chunks "
          f"({r['skipped_nbytes'] >> 20} MiB zero, not stored), device state {r['device_state_nbytes'] >> 10} KiB, "
          f"{r['seconds']:.2f} s")
    return 0


def _file_identity(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _verifies(path: str, kek: bytes) -> bool:
    try:
        snapshot_summary(path, kek)
    except MktmeError:
        return False
    return True


async def _restore(args: argparse.Namespace) -> int:
    kek = _read_kek(args.kek_file)
    async with HostSession([], keyid_bits=args.keyid_bits) as session:
        vm = await session.restore(args.path, kek, name=args.name)
        print(f"{PROG}: restored {vm.name} from {args.path}", file=sys.stderr)
        return await attend(session, args)


def snapshot_verify(args: argparse.Namespace) -> int:
    _print_json(snapshot_summary(args.path, _read_kek(args.kek_file)))
    return 0


def dump(args: argparse.Namespace) -> int:
    twice = sorted({n for n in args.vm_names if args.vm_names.count(n) > 1})
    if twice:
        raise UsageError(f"--vm {twice[0]} given twice")
    bar = ProgressBar("dumping DRAM")
    try:
        result = run_async(control.request("dump", pid=args.pid, progress=bar, path=os.path.abspath(args.path),
                                           vms=args.vm_names))
    finally:
        bar.close()
    for r in result["regions"]:
        print(f"{r['vm']}: KeyID {r['keyid']} ({r['key_type']}), HPA {r['hpa']}+{r['nbytes'] >> 20} MiB")
    print(f"dump written to {result['path']}")
    return 0


def verify_cmd(args: argparse.Namespace) -> int:
    outcomes, stock = run_async(verifier.verify(args.workloads or None, inject=args.inject, shim=not args.no_shim,
                                                progress=lambda m: print(f"{PROG}: {m}", file=sys.stderr)))
    if args.json:
        _print_json({"stock": stock, "workloads": [o.to_json() for o in outcomes],
                     "identical": all(o.identical for o in outcomes)})
    else:
        for line in stock:
            print(f"stock   {line}")
        for o in outcomes:
            verdict = "identical" if o.identical else "DIFFERENT"
            print(f"{o.workload:16} {verdict:9}  plain {o.plain.seconds:6.2f} s  emulated {o.emulated.seconds:6.2f} s"
                  f"  ratio {o.time_ratio:4.2f}")
            if o.first_difference:
                print(f"{'':16} first difference: {o.first_difference}")
            for note in o.emulated.notes:
                print(f"{'':16} emulation: {note}")
    return 0 if all(o.identical for o in outcomes) else 1


def query(args: argparse.Namespace) -> int:
    if args.libvirt:
        from .virt.command import query_libvirt
        return query_libvirt(args.libvirt)
    result = run_async(control.request("query", pid=args.pid, **({"name": args.vm_name} if args.vm_name else {})))
    _print_json(result)
    return 0


# ---------------------------------------------------------------------------------- images


def images_build(args: argparse.Namespace) -> int:
    known = [*images.RECIPES, "shim", *backports.RELEASES]
    unknown = [n for n in args.names if n not in known]
    if unknown:
        raise ValueError(f"unknown image {unknown[0]!r} (known: {', '.join(known)})")
    for name in args.names or known:
        if name == "shim":
            print(f"shim: {build_shim()}")        # the TCG plugin, for the installed QEMU's plugin ABI
            continue
        if name in backports.RELEASES:
            print(f"{name}: {backports.fetch(name, force=args.force, progress=lambda m: print(f'  {m}', file=sys.stderr))}")
            continue
        image = images.build(name, force=args.force, progress=lambda m: print(f"  {m}", file=sys.stderr))
        print(f"{name}: {image.directory}")
    return 0


def images_list(args: argparse.Namespace) -> int:
    rows = images.status()
    if args.json:
        _print_json([{"name": r.name, "state": r.state, "directory": str(r.directory), "detail": r.detail,
                      "manifest": r.manifest} for r in rows])
        return 0
    for r in rows:
        print(f"{r.name:10} {r.state:8} {r.directory}")
        print(f"{'':10} {r.description}")
        if r.detail:
            print(f"{'':10} {r.detail if r.state in ('ok', 'stale') else r.detail.splitlines()[0]}")
    return 0


def doctor(args: argparse.Namespace) -> int:
    """Which QEMU, shim ABI and XTS implementation this machine uses; 1 when one is unusable."""
    from .engine import native
    from .qemu.binary import find_qemu
    from .trace.shim import abi_for, phys_mode_for

    ok = True
    try:
        qemu = find_qemu()
        print(f"qemu   {qemu.path} {qemu.version_str}")
        abi = abi_for(qemu.version)
        print(f"shim   plugin API {abi}, phys_addr = {phys_mode_for(qemu.version)}, {build_shim(qemu)}")
    except MktmeError as err:
        print(f"qemu/shim  unusable: {str(err).splitlines()[0]}")
        ok = False
    print(f"xts    {native.status()}")
    return 0 if ok else 1


# ---------------------------------------------------------------------------------- parser


def _add_run(sub: Any) -> None:
    """``run``: boot guests in the foreground, with their consoles."""
    run = sub.add_parser("run", help="boot a guest in the foreground with its console",
                         usage="%(prog)s [options] [-- QEMU-OPTIONS...]",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Boot a guest under QEMU and attach this terminal to its serial "
                                     "console. Ctrl-] quits.\n\nOptions after -- go to QEMU unchanged "
                                     "(checked against its -help), except these, which would break the "
                                     "emulation:\n" + refusal_table())
    add_guest_options(run)
    add_mktme_options(run)
    run.add_argument("--name", type=_vm_name, help="VM name (default: the image name)")
    run.add_argument("--vm", type=_vm_entry, action="append", metavar="name=N[,tenant=T][,key=SPEC]",
                     help="run several VMs of this guest in one host (repeatable); VMs of one tenant "
                          "with the same user key share a KeyID")
    run.add_argument("--trace", action="store_true", help="print per-KeyID memory traffic every few seconds")
    run.add_argument("--trace-interval", type=float, default=3.0, metavar="S", help=argparse.SUPPRESS)
    run.add_argument("--paused", action="store_true", help="start with the vCPUs stopped")
    run.add_argument("--sanitize", action="store_true",
                     help="KeyID-aliasing sanitizer: report rules (a)-(d) as they happen, a summary at exit")
    run.add_argument("--integrity", choices=("mac",), default=None,
                     help="per-line MAC (TDX-like, not MKTME): tampered lines poison, consuming them stops the VM")
    run.add_argument("--no-input", action="store_true", help="do not forward standard input to the guest")
    tenant_command.add_run_options(run)
    run.set_defaults(func=lambda a: run_async(run_guest(a)), qemu_passthrough=True)


def _add_attach(sub: Any) -> None:
    """``attach``: put a QEMU someone else started under the MKTME host model."""
    at = sub.add_parser("attach", help="bind a running QEMU (libvirt, a script) to an MKTME host",
                        description="Bind a QEMU that someone else started to an emulated MKTME host: its "
                                    "guest RAM (a shared memfd or file backend) gets a KeyID in the EPT, QEMU's "
                                    "page table and an IOMMU domain; 'qemu-mktme query' and dump reach it. QEMU "
                                    "keeps running when this exits. Not possible on an attached VM: snapshots "
                                    "(a restore cannot rebuild a foreign command line) and the TCG shim (loaded "
                                    "only at QEMU's start; it says what to start QEMU with instead).")
    at.add_argument("--qmp", required=True, metavar="SOCKET", help="QEMU's QMP unix socket")
    at.add_argument("--console", metavar="SOCKET", help="the guest's serial console socket, to show and type into")
    at.add_argument("--ram-path", metavar="PATH", help="guest RAM file when it cannot be found through QMP and /proc")
    at.add_argument("--name", type=_vm_name, default="attached", help="VM name (default: attached)")
    at.add_argument("--key", default="cpu", metavar="SPEC", help="the VM's key, as for run (default: cpu)")
    at.add_argument("--tenant", default="default", help="tenant owning the key (default: default)")
    at.add_argument("--keyid-bits", type=_keyid_bits, default=6, metavar="N", help="MK_TME_KEYID_BITS (default 6)")
    at.add_argument("--no-input", action="store_true", help="do not forward standard input to the guest")
    at.set_defaults(func=lambda a: run_async(attach_qemu(a)))


# ---------------------------------------------------------------------------------- hosts and migration


async def host_start(args: argparse.Namespace) -> int:
    """A host with no VM yet, named, taking incoming migrations with keys from the tenant's broker."""
    from .tenant.launch import TenantLaunch
    from .tenant.migrate import broker_key_source
    from .tenant.store import TenantDir
    ca = Path(args.tenant_ca) if args.tenant_ca else TenantDir().pki.ca
    if not ca.is_file():
        raise UsageError(f"tenant CA certificate {ca} does not exist (give --tenant-ca)")
    async with HostSession([], keyid_bits=args.keyid_bits, packages=args.packages, name=args.name) as session:
        broker_key_source(session, TenantLaunch(args.tenant_server, ca, key=args.tenant_key, host=args.name))
        print(f"{PROG}: host {args.name} ready (pid {os.getpid()}); migrate VMs here with "
              f"'{PROG} migrate VM --to {args.name}'; Ctrl-C stops it and its VMs", file=sys.stderr, flush=True)
        await asyncio.Event().wait()
    return 0


async def migrate_vm(args: argparse.Namespace) -> int:
    """Drive two running hosts: the destination attests and listens, the source streams over TLS."""
    from .tenant.store import TenantDir
    tls = Path(args.tls).absolute() if args.tls else None if args.insecure else TenantDir().pki.directory
    src: dict[str, Any] = {"pid": args.pid, "host": args.source}
    common = {"vm": args.vm_name, "tls": str(tls) if tls else None, "insecure": args.insecure}
    d = await control.request("migrate-describe", **src, **common)
    inc = await control.request("migrate-incoming", host=args.to, config=d["config"], tenant=d["tenant"],
                                tls=common["tls"])
    bar = ProgressBar(f"migrating {args.vm_name} to {args.to}")
    try:
        r = await control.request("migrate-send", progress=bar, port=inc["port"], dest_keyid=inc["keyid"],
                                  **src, **common)
        bar.close()
        q = await control.request("migrate-finish", host=args.to, vm=args.vm_name, resume=d["running"])
    except BaseException:
        bar.close()
        with contextlib.suppress(Exception):
            await control.request("migrate-abort", host=args.to, vm=args.vm_name)
        with contextlib.suppress(Exception):
            await control.request("migrate-release", **src, vm=args.vm_name, done=False, resume=d["running"])
        raise
    await control.request("migrate-release", **src, vm=args.vm_name, done=True)
    print(f"{args.vm_name}: on {args.to} with KeyID {q['keyid']} (was KeyID {d['keyid']}, now free); "
          f"{r['transferred'] >> 20} MiB {'over TLS' if r['tls'] else 'IN THE CLEAR (--insecure)'} in "
          f"{r['total_ms'] / 1000:.2f} s, downtime {r['downtime_ms']} ms, {r['mbps']:.0f} Mb/s")
    return 0


def _add_hosts(sub: Any) -> None:
    """``host start NAME`` and ``migrate VM --to NAME``."""
    h = sub.add_parser("host", help="an emulated host that takes incoming migrations")
    h_sub = h.add_subparsers(dest="action", metavar="ACTION")
    from .virt import command as virt_command
    virt_command.add_host_options(h)
    h.add_argument("--keyid-bits", type=_keyid_bits, default=6, metavar="N", help=argparse.SUPPRESS)
    h.set_defaults(func=lambda a: run_async(virt_command.host_libvirt(a)) if a.libvirt
                   else h.error("give an ACTION (start) or --libvirt URI"))
    st = h_sub.add_parser("start", help="run host NAME in the foreground (no VM yet) until Ctrl-C",
                          description="Start an emulated MKTME host that VMs migrate to: each incoming VM's key is "
                                      "released by the tenant's broker after this host attests.")
    st.add_argument("name", type=_vm_name, help="the host's name (its TPM state and the 'migrate --to' address)")
    st.add_argument("--tenant-server", required=True, metavar="URL", help="the tenant's key broker")
    st.add_argument("--tenant-ca", metavar="PATH", help="the tenant's CA certificate (default: the tenant directory's)")
    st.add_argument("--tenant-key", default="vm", metavar="NAME", help="the memory key's name (default: vm)")
    st.add_argument("--keyid-bits", type=_keyid_bits, default=6, metavar="N")
    st.add_argument("--packages", type=int, default=1, metavar="N", help=argparse.SUPPRESS)
    st.set_defaults(func=lambda a: run_async(host_start(a)))
    m = sub.add_parser("migrate", help="live-migrate a VM to another running host over TLS",
                       description="Move a running VM to host NAME: the destination attests to the tenant's broker "
                                   "and gets the key, picks its own KeyID, and QEMU's migration stream goes over TLS "
                                   "(tls-creds-x509, both ends verified). On any failure the VM runs on here.")
    m.add_argument("vm_name", metavar="VM")
    m.add_argument("--to", required=True, metavar="NAME", help="the destination host ('host start NAME')")
    m.add_argument("--from", dest="source", metavar="NAME", help="the source host's name (default: the only one / --pid)")
    m.add_argument("--pid", type=int, help="the source host's process")
    m.add_argument("--tls", metavar="DIR", help="QEMU TLS credentials directory (default: the tenant's PKI)")
    m.add_argument("--insecure", action="store_true", help="migrate without TLS: guest RAM crosses in the clear")
    m.set_defaults(func=lambda a: run_async(migrate_vm(a)))


def _add_query(sub: Any) -> None:
    """``query``: ask a running host for its encryption state."""
    q = sub.add_parser("query", help="the encryption state of a running host and its VMs (JSON)",
                       description="Ask a running 'qemu-mktme run' for its host's KeyID table and every "
                                   "VM's encryption state (like QEMU's query-sev).")
    q.add_argument("vm_name", nargs="?", metavar="VM", help="only this VM")
    q.add_argument("--pid", type=int, help="the 'qemu-mktme run' process, when several run")
    q.add_argument("--libvirt", metavar="URI", help="libvirt's domains at URI with their KeyID, key handle and "
                                                    "tagging state from this machine's host model")
    q.set_defaults(func=query)


def _add_dump(sub: Any) -> None:
    """``dump``: capture a running host's DRAM image."""
    d = sub.add_parser("dump", help="write the DRAM image of a running host's VMs (what a bus probe reads)",
                       description="Capture the host-physical DRAM image (ciphertext per KeyID) of the VMs "
                                   "of a running 'qemu-mktme run', with a manifest. The VMs are paused for "
                                   "the capture and resumed. Never writes key material.")
    d.add_argument("path", help="dump directory to create")
    d.add_argument("--vm", dest="vm_names", action="append", default=[], metavar="NAME",
                   help="only this VM (repeatable; default: all)")
    d.add_argument("--pid", type=int, help="the 'qemu-mktme run' process, when several run")
    d.set_defaults(func=dump)


def _add_snapshot(sub: Any) -> None:
    """``snapshot save|restore|verify``."""
    sn = sub.add_parser("snapshot", help="save, restore and verify encrypted snapshots")
    sn_sub = sn.add_subparsers(dest="snapshot_command", metavar="ACTION", required=True)
    kek_help = ("file holding the 32-byte key-encryption key as 64 hex digits (a regular file, or <(...)); "
                "never stored")
    sv = sn_sub.add_parser("save", help="save a VM of a running host (atomically replaces PATH)",
                           description="Save a VM of a running 'qemu-mktme run': device state through QEMU "
                                       "migration (x-ignore-shared), RAM as its DRAM image under the VM key, "
                                       "everything authenticated under the key-encryption key.")
    sv.add_argument("path")
    sv.add_argument("--kek-file", required=True, help=kek_help)
    sv.add_argument("--vm", dest="vm_name", metavar="NAME", help="the VM (needed when the host runs several)")
    sv.add_argument("--pid", type=int, help="the 'qemu-mktme run' process, when several run")
    sv.set_defaults(func=snapshot_save)
    rs = sn_sub.add_parser("restore", help="restore a snapshot and run it in the foreground",
                           description="Verify every byte of a snapshot, start a fresh QEMU with -incoming "
                                       "defer, rebuild RAM, load the device state and continue the guest.")
    rs.add_argument("path")
    rs.add_argument("--kek-file", required=True, help=kek_help)
    rs.add_argument("--name", type=_vm_name, help="name of the restored VM (default: as saved)")
    rs.add_argument("--keyid-bits", type=_keyid_bits, default=6, metavar="N", help="MK_TME_KEYID_BITS (default 6)")
    rs.add_argument("--no-input", action="store_true", help="do not forward standard input to the guest")
    rs.set_defaults(func=lambda a: run_async(_restore(a)))
    vf = sn_sub.add_parser("verify", help="authenticate a snapshot completely, print its summary (JSON)")
    vf.add_argument("path")
    vf.add_argument("--kek-file", required=True, help=kek_help)
    vf.set_defaults(func=snapshot_verify)


def _add_demo(sub: Any) -> None:
    """``demo``: the story in under a minute."""
    dm = sub.add_parser("demo", help="the story in under a minute (what 'make demo' runs)",
                        description="Boot the stock Debian guest with a tenant key, show the KeyID assignment, "
                                    "a secret in the CPU view and not in DRAM, an encrypted snapshot restored "
                                    "with the guest continuing, a transparency check, and a PNG DRAM map.")
    dm.add_argument("--png", default="mktme-demo.png", help="where to write the KeyID/entropy map (default: %(default)s)")
    dm.add_argument("--tenant", action="store_true",
                    help="the tenant's story instead: key server, attested host, encrypted image, tampered host refused")
    dm.set_defaults(func=lambda a: tenant_story.main() if a.tenant else demo.main(a.png))


def _add_verify(sub: Any) -> None:
    """``verify``: plain vs emulated runs, compared."""
    v = sub.add_parser("verify", help="prove guests run unmodified: plain vs emulated, compared",
                       description="Run each workload on plain QEMU and under the full emulation (tenant key, "
                                   "KeyID-tagged EPT/VMM/IOMMU, shim, DRAM view, encrypted snapshots) and compare "
                                   "console transcripts, in-guest checksums and exit status. Exit 1 on any "
                                   "difference. Normalised nondeterminism: "
                                   + "; ".join(why for _, _, why in verifier.NORMALISE[:2]) + ".")
    v.add_argument("--workloads", nargs="+", choices=list(verifier.WORKLOADS), metavar="NAME",
                   help=f"workloads (default: all of {', '.join(verifier.WORKLOADS)})")
    v.add_argument("--inject", choices=verifier.INJECT, help="inject a fault into the emulated run (must be reported)")
    v.add_argument("--no-shim", action="store_true", help="do not attach the TCG plugin shim")
    v.add_argument("--json", action="store_true", help="machine-readable report")
    v.set_defaults(func=verify_cmd)


def _add_images(sub: Any) -> None:
    """``images build|list``."""
    img = sub.add_parser("images", help="build and list guest images")
    img_sub = img.add_subparsers(dest="images_command", metavar="ACTION", required=True)
    b = img_sub.add_parser("build", help="build guest images into the cache (skips current ones)")
    b.add_argument("names", nargs="*", metavar="NAME",
                   help=f"images to build (default: all of {', '.join(images.RECIPES)}, the shim, and "
                        f"{', '.join(backports.RELEASES)}: QEMU from bookworm-backports, unpacked in the cache)")
    b.add_argument("--force", action="store_true", help="rebuild even when current")
    b.set_defaults(func=images_build)
    ls = img_sub.add_parser("list", help="show the images and their state")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=images_list)


def _add_doctor(sub: Any) -> None:
    d = sub.add_parser("doctor", help="which QEMU, shim plugin API and AES-XTS implementation are in use")
    d.set_defaults(func=doctor)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Intel MKTME emulation around unmodified QEMU.")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_run(sub)
    _add_attach(sub)
    _add_query(sub)
    _add_hosts(sub)
    _add_dump(sub)
    _add_snapshot(sub)
    _add_demo(sub)
    add_attack_parser(sub, run_async)
    _add_verify(sub)
    add_inspect_parser(sub)
    _add_images(sub)
    _add_doctor(sub)
    from .virt.command import add_libvirt_parser
    add_libvirt_parser(sub, run_async)
    tenant_command.add_tenant_parsers(sub)
    return parser


def run_async(coro: Any) -> Any:
    """``asyncio.run`` where SIGTERM, like Ctrl-C, cancels the work so that teardown runs.

    The handler is a plain Python signal handler, as asyncio's own Ctrl-C handling is, not
    ``loop.add_signal_handler``: that one only learns of a signal through its wakeup byte, and
    a host then ignored its first SIGTERM now and then (about 1 stop in 20-40 in
    ``scripts/probe_kill.py``). The Python handler runs on the main thread as soon as it runs
    bytecode, which a 0.5 s heartbeat guarantees. SIGTERM also sets
    :data:`~qemu_mktme.attend.TERMINATED`'s event, which :func:`attend` waits on: a cancellation
    can be swallowed, an event cannot.
    """
    async def guarded() -> Any:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        terminated = asyncio.Event()
        TERMINATED.set(terminated)

        def on_sigterm() -> None:
            logging.getLogger(__name__).info("SIGTERM: stopping")
            terminated.set()
            task.cancel()

        def heartbeat() -> None:
            nonlocal beat
            beat = loop.call_later(0.5, heartbeat)
        beat = loop.call_later(0.5, heartbeat)
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: loop.call_soon_threadsafe(on_sigterm))
        try:
            result = await coro
        except asyncio.CancelledError:
            raise KeyboardInterrupt from None
        finally:
            signal.signal(signal.SIGTERM, previous)
            beat.cancel()
        if terminated.is_set():
            raise KeyboardInterrupt
        return result
    return asyncio.run(guarded())


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format=f"{PROG}: %(name)s: %(message)s")
    # qemu.qmp reports expected disconnects at ERROR level; they are ours to report.
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL if verbose < 2 else logging.DEBUG)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    qemu_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, qemu_args = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    if qemu_args and not getattr(args, "qemu_passthrough", False):
        parser.error("-- QEMU-OPTIONS is only for 'run'")
    args.qemu_args = qemu_args
    _configure_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (MktmeError, ValueError, OSError) as err:
        if args.traceback:
            raise
        first, *rest = str(err).splitlines() or [type(err).__name__]
        print(f"{PROG}: error: {first}", file=sys.stderr)
        for line in rest:
            print(f"  {line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
