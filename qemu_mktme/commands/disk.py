"""``qemu-mktme disk encrypt|verify``: a disk image encrypted at rest (LUKS in qcow2); ``image`` is its old name."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..tenant import admin
from ..attest import image as image_mod
from .tenant import add_tenant_dir_option, tenant_dir


def disk_cmd(args: argparse.Namespace) -> int:
    tenant = tenant_dir(args)
    if args.action == "encrypt":
        manifest = admin.encrypt_image(tenant, args.source, args.target, key_name=args.key_name)
        info = image_mod.info(args.target)
        enc = info.get("format-specific", {}).get("data", {}).get("encrypt", {})
        print(f"{args.target}: LUKS in qcow2 ({enc.get('cipher-alg', '?')} {enc.get('cipher-mode', '?')}), "
              f"signed manifest {manifest}")
        return 0
    verified = image_mod.verify(args.image, tenant.require().verify_key())
    os.close(verified.fd)
    print(f"{args.image}: manifest signature and digest verified (sha256 {verified.sha256}, disk key {verified.disk_key!r})")
    return 0


def register(sub: Any) -> None:
    im = sub.add_parser("disk", help="encrypt a disk image at rest (LUKS in qcow2) and verify it",
                        description="The tenant's disk images, encrypted at rest: LUKS in qcow2 under a disk key "
                                    "kept by the tenant's key server, with a signed manifest ('run --image' boots "
                                    "one). The old name 'image' still works.")
    im_sub = im.add_subparsers(dest="action", metavar="ACTION", required=True)
    enc = im_sub.add_parser("encrypt", help="SOURCE (raw or qcow2) -> TARGET (LUKS qcow2) under a new disk key")
    enc.add_argument("source")
    enc.add_argument("target")
    enc.add_argument("--key-name", help="name of the disk key in the key server (default: disk-TARGETSTEM)")
    ver = im_sub.add_parser("verify", help="check an image against its signed manifest")
    ver.add_argument("image")
    for p in (enc, ver):
        add_tenant_dir_option(p)
    im.set_defaults(func=disk_cmd)
