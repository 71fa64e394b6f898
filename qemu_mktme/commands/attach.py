"""``qemu-mktme attach``: put a QEMU someone else started under the MKTME host model."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from ..attend import attend
from ..errors import MktmeError
from ..keymaterial import key_payload
from ..live.encrypted import shim_hint
from ..live.session import HostSession
from ..qemu.binary import find_qemu
from .options import PROG, UsageError, keyid_bits, vm_name


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
        return await attend(session, no_input=args.no_input or args.console is None)


def register(sub: Any) -> None:
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
    at.add_argument("--name", type=vm_name, default="attached", help="VM name (default: attached)")
    at.add_argument("--key", default="cpu", metavar="SPEC", help="the VM's key, as for run (default: cpu)")
    at.add_argument("--tenant", default="default", help="tenant owning the key (default: default)")
    at.add_argument("--keyid-bits", type=keyid_bits, default=6, metavar="N", help="MK_TME_KEYID_BITS (default 6)")
    at.add_argument("--no-input", action="store_true", help="do not forward standard input to the guest")
    at.set_defaults(func=attach_qemu)
