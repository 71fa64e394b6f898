"""``qemu-mktme libvirt ...`` and ``host --libvirt``: parse, call :mod:`qemu_mktme.virt`, print.

    qemu-mktme host --libvirt qemu:///system --host-name a --tenant-ca ca-cert.pem
    qemu-mktme libvirt domain-xml --guest linux --tenant acme --key vm --broker https://... > vm1.xml
    qemu-mktme libvirt domain-xml --check vm1.xml            # or --opt-in: a user's own XML
    qemu-mktme libvirt hook install|remove                   # /etc/libvirt/hooks/qemu.d/qemu-mktme
    qemu-mktme libvirt start vm1                             # start paused; the host model resumes it
    qemu-mktme query --libvirt qemu:///system
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .. import images
from ..qemu.binary import find_qemu
from ..virt import domain as dom
from ..virt import hooks
from ..virt.fleet import domain_bindings, start_domain
from .options import PROG, UsageError, size


def add_host_options(p: argparse.ArgumentParser) -> None:
    """``host --libvirt URI``: the options of the host model that follows a libvirtd."""
    g = p.add_argument_group("following libvirt (host --libvirt URI)")
    g.add_argument("--libvirt", metavar="URI", help="follow this libvirtd's domains (e.g. qemu:///system): the host "
                                                    "model of this machine, serving the libvirt hook")
    g.add_argument("--host-name", metavar="NAME", help="this host's name, as enrolled in the tenant's policy")
    g.add_argument("--tenant-ca", metavar="PATH", help="the tenant's CA certificate (authenticates the broker)")
    g.add_argument("--host-dir", metavar="DIR", help="this host's state directory (its TPM); default: by name")
    add_socket_option(g)


HOOK_SOCKET = str(dom.RUN_DIR / "host.sock")


def add_socket_option(p: Any, default: str = argparse.SUPPRESS) -> None:
    """``--socket PATH``: the host model's socket (``host --libvirt``, and its verbs that reach it)."""
    p.add_argument("--socket", metavar="PATH", default=default,
                   help=f"the host model's socket, with --libvirt (default: {HOOK_SOCKET})")


async def host_libvirt(args: argparse.Namespace) -> int:
    from ..virt.follow import LibvirtHost
    if not args.host_name or not args.tenant_ca:
        raise UsageError("host --libvirt needs --host-name NAME and --tenant-ca PATH")
    if not Path(args.tenant_ca).is_file():             # (a FIFO would hang the first attestation)
        raise UsageError(f"--tenant-ca {args.tenant_ca}: not a regular file (the tenant's CA certificate, PEM)")

    def note(message: str) -> None:
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    async with LibvirtHost(args.libvirt, host_name=args.host_name, tenant_ca=args.tenant_ca, host_dir=args.host_dir,
                           keyid_bits=getattr(args, "keyid_bits", 6), socket_path=getattr(args, "socket", HOOK_SOCKET),
                           log_event=note) as host:
        await host.serve()
    return 0


def without_libvirt(args: argparse.Namespace) -> None:
    """``--socket`` (the host model's) given to a verb without ``--libvirt``: refused, not ignored."""
    if getattr(args, "socket", None) and not getattr(args, "libvirt", None):
        raise UsageError("--socket is the host model's, with --libvirt URI")


def query_libvirt(uri: str, socket: str | None = None) -> int:
    rows = domain_bindings(uri, socket=Path(socket) if socket else None)
    print(json.dumps({n: r.to_json() for n, r in rows.items()}, indent=2, sort_keys=True))
    return 0


def register(sub: Any) -> None:
    lv = sub.add_parser("libvirt", help="libvirt domains under the MKTME host model: XML, hook, start",
                        description="Domains that libvirt runs, under the MKTME host model of each machine "
                                    "('qemu-mktme host --libvirt URI').")
    lv_sub = lv.add_subparsers(dest="libvirt_command", metavar="ACTION", required=True)
    dx = lv_sub.add_parser("domain-xml", help="write a domain that opts in, or check / opt in your own XML",
                           description="Write a libvirt domain for a guest we ship (--guest), opted into MKTME, or "
                                       "check (--check FILE) or opt in (--opt-in FILE) a domain of yours: shared memfd "
                                       "RAM, a direct kernel boot, the host model's QMP monitor, our metadata.")
    dx.add_argument("--guest", metavar="baremetal|linux", help="the guest we ship to write a domain for")
    dx.add_argument("--check", metavar="FILE", help="check a domain's XML; exit 1 with every problem")
    dx.add_argument("--opt-in", metavar="FILE", help="print FILE made to opt in (needs --tenant --key --broker)")
    dx.add_argument("--name", default=None, help="domain name (default: the guest's)")
    dx.add_argument("--memory", "-m", type=size, default=None, metavar="SIZE",
                    help="guest RAM, whole MiB, at most 1 TiB as for 'run -m' (default: the guest's)")
    dx.add_argument("--workload", metavar="NAME", help="Linux guest: workload (e.g. counter)")
    dx.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="workload parameter")
    dx.add_argument("--command", "-c", action="append", default=[], metavar="CMD", help="bare-metal command")
    dx.add_argument("--append", default="", metavar="ARGS", help="extra kernel command line")
    dx.add_argument("--tenant", help="the tenant owning the key")
    dx.add_argument("--key", help="the tenant's key name (in its KMIP server)")
    dx.add_argument("--broker", metavar="URL", help="the tenant's key broker (https://HOST:PORT)")
    dx.add_argument("--keyid-policy", choices=dom.POLICIES, default="shared", help="default: shared")
    dx.add_argument("--plain", action="store_true", help="do not opt in (a plain domain, for comparison)")
    dx.add_argument("--serial-log", metavar="PATH", help="the serial console into this file (default: a pty)")
    dx.add_argument("--emulator", metavar="PATH", help="QEMU binary (default: the one in PATH)")
    dx.set_defaults(func=domain_xml)
    hk = lv_sub.add_parser("hook", help="install or remove the libvirt hook (writes into /etc/libvirt)")
    hk.add_argument("action", choices=("install", "remove", "show"))
    hk.add_argument("--etc", default=str(hooks.DEFAULT_ETC), metavar="DIR", help="libvirt's configuration directory")
    hk.set_defaults(func=hook_cmd)
    st = lv_sub.add_parser("start", help="start a domain paused; the host model binds it and resumes it",
                           description="virsh start --paused DOMAIN, then wait until the host model of this machine "
                                       "bound it and resumed it (a plain 'virsh start' of a domain that opts in is "
                                       "refused: its vCPUs would run before its KeyID is bound).")
    st.add_argument("domain")
    st.add_argument("--connect", "-c", default="qemu:///system", metavar="URI")
    st.set_defaults(func=_start)


def _start(args: argparse.Namespace) -> int:
    result = start_domain(args.connect, args.domain)
    print(f"{result.domain}: running on {result.host} with KeyID {result.keyid} (key handle {result.handle}), "
          f"{result.seconds:.2f} s")
    return 0


def hook_cmd(args: argparse.Namespace) -> int:
    etc = Path(args.etc)
    if args.action == "show":
        print(hooks.hook_text(), end="")
        return 0
    if args.action == "install":
        path = hooks.install(etc)
        print(f"wrote {path} (the qemu hook of qemu-mktme: hands domains that opt in to 'qemu-mktme host --libvirt'); "
              "restart libvirtd so that it finds it; 'qemu-mktme libvirt hook remove' removes it")
        return 0
    removed = hooks.remove(etc)
    print(f"removed {removed}" if removed else f"no hook of qemu-mktme in {hooks.hook_path(etc)}")
    return 0


def domain_xml(args: argparse.Namespace) -> int:
    opt = None
    if args.tenant or args.key or args.broker:
        if not (args.tenant and args.key and args.broker):
            raise UsageError("opting in needs --tenant, --key and --broker")
        opt = dom.Opt(args.tenant, args.key, args.broker, args.keyid_policy)
    if args.check:
        d = dom.parse(dom.read_xml(args.check))
        found = dom.problems(d)
        for line in found:
            print(f"{PROG}: {line}", file=sys.stderr)
        if not found:
            print(f"{d.name}: opts into MKTME (tenant {d.opt.tenant if d.opt else '?'}, key "
                  f"{d.opt.key if d.opt else '?'}, broker {d.opt.broker if d.opt else '?'})")
        return 1 if found else 0
    if args.opt_in:
        if opt is None:
            raise UsageError("--opt-in needs --tenant, --key and --broker")
        print(dom.opt_in(dom.read_xml(args.opt_in), opt))
        return 0
    if not args.guest:
        raise UsageError("give --guest NAME, --check FILE or --opt-in FILE")
    if opt is None and not args.plain:
        raise UsageError("give --tenant, --key and --broker (or --plain for a domain that does not opt in)")
    image = images.load(args.guest) if args.guest in images.RECIPES else None
    if image is None:
        raise UsageError(f"unknown guest {args.guest!r} (known: {', '.join(images.RECIPES)})")
    if any("=" not in p for p in args.param):
        raise UsageError(f"--param wants NAME=VALUE, got {next(p for p in args.param if '=' not in p)!r}")
    boot = images.guest_boot(args.guest, workload=args.workload, commands=args.command,
                             params=dict(p.split("=", 1) for p in args.param), append=args.append, initrd=None)
    memory = args.memory or images.default_memory(args.guest)
    if memory % (1 << 20):
        raise UsageError(f"--memory must be a whole number of MiB (libvirt's <memory unit='MiB'>), got {memory} bytes")
    xml = dom.guest_domain(args.name or args.guest, boot, memory=memory, opt=None if args.plain else opt,
                           emulator=args.emulator or str(find_qemu().path), serial_log=args.serial_log)
    found = [] if args.plain else dom.problems(dom.parse(xml))   # what --check would say of it
    if found:
        raise UsageError("; ".join(line.split(": ", 1)[-1] for line in found))
    print(xml)
    return 0
