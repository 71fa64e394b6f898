"""``qemu-mktme doctor``: which QEMU, shim plugin API, AES-XTS implementation and vhost-user-blk
dataplane are in use."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import MktmeError


def doctor(args: argparse.Namespace) -> int:
    """Which QEMU, shim ABI, XTS implementation and disk dataplane this machine uses; 1 when one is
    unusable (the dataplane falls back to Python, which is usable)."""
    from ..engine import native
    from ..vhost import native as vhost_native
    from ..qemu.binary import find_qemu
    from ..trace.shim import abi_for, build_shim, phys_mode_for

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
    from ..vhost.blk import POLL_MAX_NS
    polling = f"; polls an empty ring up to {POLL_MAX_NS // 1000} us (--disk ...,poll-max-ns=N)"
    print(f"vhost  {vhost_native.status()}" + (polling if vhost_native.library() is not None else ""))
    return 0 if ok else 1


def register(sub: Any) -> None:
    d = sub.add_parser("doctor", help="which QEMU, shim plugin API, AES-XTS implementation and disk dataplane are in use")
    d.set_defaults(func=doctor)
