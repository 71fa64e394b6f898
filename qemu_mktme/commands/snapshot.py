"""``qemu-mktme snapshot save|restore|verify``: encrypted snapshots."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..attend import ProgressBar, attend
from ..errors import AttachError, MktmeError
from ..keymaterial import read_kek_file
from ..live import control
from ..live.session import HostSession
from ..live.snapshot import snapshot_summary
from ..files.atomic import check_target
from .options import KEK_HELP, PROG, UsageError, keyid_bits, pid, print_json, vm_name


def read_kek(path: str) -> bytes:
    """The KEK, read here by the client (a running host never opens the user's key files)."""
    try:
        return read_kek_file(path)
    except ValueError as err:
        raise UsageError(str(err)) from None


async def snapshot_save(args: argparse.Namespace) -> int:
    kek = read_kek(args.kek_file)
    path = os.path.abspath(args.path)
    check_target(path, force=True)          # a FIFO, device or symlink there: refused before the host pauses the VM
    before = _file_identity(path)
    bar = ProgressBar("saving")
    try:
        r = await control.request("snapshot-save", pid=args.pid, progress=bar, path=path,
                                  vm=args.vm_name, kek=kek.hex())
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


async def snapshot_restore(args: argparse.Namespace) -> int:
    kek = read_kek(args.kek_file)
    async with HostSession([], keyid_bits=args.keyid_bits) as session:
        vm = await session.restore(args.path, kek, name=args.name)
        print(f"{PROG}: restored {vm.name} from {args.path}", file=sys.stderr)
        return await attend(session, no_input=args.no_input)


def snapshot_verify(args: argparse.Namespace) -> int:
    print_json(snapshot_summary(args.path, read_kek(args.kek_file)))
    return 0


def register(sub: Any) -> None:
    sn = sub.add_parser("snapshot", help="save, restore and verify encrypted snapshots")
    sn_sub = sn.add_subparsers(dest="snapshot_command", metavar="ACTION", required=True)
    sv = sn_sub.add_parser("save", help="save a VM of a running host (atomically replaces PATH)",
                           description="Save a VM of a running 'qemu-mktme run': device state through QEMU "
                                       "migration (x-ignore-shared), RAM as its DRAM image under the VM key, "
                                       "everything authenticated under the key-encryption key.")
    sv.add_argument("path")
    sv.add_argument("--kek-file", required=True, help=KEK_HELP)
    sv.add_argument("--vm", dest="vm_name", metavar="NAME", help="the VM (needed when the host runs several)")
    sv.add_argument("--pid", type=pid, help="the 'qemu-mktme run' process, when several run")
    sv.set_defaults(func=snapshot_save)
    rs = sn_sub.add_parser("restore", help="restore a snapshot and run it in the foreground",
                           description="Verify every byte of a snapshot, start a fresh QEMU with -incoming "
                                       "defer, rebuild RAM, load the device state and continue the guest.")
    rs.add_argument("path")
    rs.add_argument("--kek-file", required=True, help=KEK_HELP)
    rs.add_argument("--name", type=vm_name, help="name of the restored VM (default: as saved)")
    rs.add_argument("--keyid-bits", type=keyid_bits, default=6, metavar="N", help="MK_TME_KEYID_BITS (default 6)")
    rs.add_argument("--no-input", action="store_true", help="do not forward standard input to the guest")
    rs.set_defaults(func=snapshot_restore)
    vf = sn_sub.add_parser("verify", help="authenticate a snapshot completely, print its summary (JSON)")
    vf.add_argument("path")
    vf.add_argument("--kek-file", required=True, help=KEK_HELP)
    vf.set_defaults(func=snapshot_verify)
