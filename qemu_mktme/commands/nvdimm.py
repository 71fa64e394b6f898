"""``qemu-mktme nvdimm show|rekey``: an NVDIMM media image offline (where and how it was written;
re-encrypted for another host physical address or key). ``run --nvdimm`` attaches one."""

from __future__ import annotations

import argparse
import re
from typing import Any

from ..live import nvdimm as media
from .options import PROG, keyid_bits, print_json


def nvdimm_option(text: str) -> media.NvdimmMedia:
    """``run --nvdimm PATH[,size=SIZE][,hpa=ADDR]``."""
    try:
        return media.NvdimmMedia.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def address(text: str) -> int:
    if not re.fullmatch(r"0[xX][0-9a-fA-F]+|\d+", text):
        raise argparse.ArgumentTypeError(f"not an address (0x hex or decimal): {text!r}")
    return int(text, 0)


def show(args: argparse.Namespace) -> int:
    info = media.describe(args.path)
    if args.json:
        print_json(info)
        return 0
    for key in ("path", "format", "size", "hpa", "tweak", "algorithm", "keyid", "reason", "written", "image-id",
                "digests", "plaintext"):
        print(f"{key + ':':11} {info[key]}")
    return 0


def rekey(args: argparse.Namespace) -> int:
    old, new = media.rekey(args.path, args.key, to_hpa=args.to_hpa, to_key_spec=args.to_key, keyid_bits=args.keyid_bits)
    what = [f"HPA {old.hpa:#x} -> {new.hpa:#x}"] if old.hpa != new.hpa else []
    what += ["new key"] if args.to_key else []
    print(f"{PROG}: {args.path}: re-encrypted ({', '.join(what) or 'same HPA and key'}), "
          f"{new.size >> 20} MiB, image {new.image_id.hex()}")
    return 0


def register(sub: Any) -> None:
    nv = sub.add_parser("nvdimm", help="NVDIMM media images: where they were written, re-encrypt them offline")
    nv_sub = nv.add_subparsers(dest="nvdimm_command", metavar="ACTION", required=True)
    sh = nv_sub.add_parser("show", help="where and how an image was written (its digests checked)")
    sh.add_argument("path", metavar="PATH")
    sh.add_argument("--json", action="store_true", help="machine-readable output")
    sh.set_defaults(func=show)
    rk = nv_sub.add_parser("rekey", help="re-encrypt an image for another host physical address and/or key",
                           description="Decrypt each line with --key at the HPA the image was written at and "
                                       "encrypt it with --to-key (default: the same key) at --to-hpa (default: "
                                       "the same HPA). The image is replaced atomically; it must not be in use. "
                                       "A wrong --key is not detected: the result is garbage, as on hardware.")
    rk.add_argument("path", metavar="PATH")
    rk.add_argument("--key", required=True, metavar="SPEC", help="the key it was written under: user:KEYHEX:TWEAKHEX[:ALG] or user:@FILE")
    rk.add_argument("--to-hpa", type=address, metavar="ADDR", help="the host physical address it will sit at (2 MiB aligned)")
    rk.add_argument("--to-key", metavar="SPEC", help="the key it will be read with (same forms as --key)")
    rk.add_argument("--keyid-bits", type=keyid_bits, default=6, metavar="N",
                    help="the KeyID bits of the host it will run on (default 6): the HPA must lie below "
                         "MAXPHYADDR minus them")
    rk.set_defaults(func=rekey)
