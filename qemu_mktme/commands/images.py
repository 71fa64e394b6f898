"""``qemu-mktme images build|list``: guest images in the cache."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import images
from ..images import backports
from ..trace.shim import build_shim
from .options import print_json


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
        print_json([{"name": r.name, "state": r.state, "directory": str(r.directory), "detail": r.detail,
                     "manifest": r.manifest} for r in rows])
        return 0
    for r in rows:
        print(f"{r.name:10} {r.state:8} {r.directory}")
        print(f"{'':10} {r.description}")
        if r.detail:
            print(f"{'':10} {r.detail if r.state in ('ok', 'stale') else r.detail.splitlines()[0]}")
    return 0


def register(sub: Any) -> None:
    img = sub.add_parser("images", help="build and list guest images")
    img_sub = img.add_subparsers(dest="images_command", metavar="ACTION", required=True)
    b = img_sub.add_parser("build", help="build guest images into the cache (skips current ones)")
    b.add_argument("names", nargs="*", metavar="NAME",
                   help=f"images to build (default: all of {', '.join(images.RECIPES)}, the shim, and "
                        f"{', '.join(backports.RELEASES)}: QEMU 10, from bookworm-backports unpacked in the cache on "
                        "Debian 12, the system's on Debian 13)")
    b.add_argument("--force", action="store_true", help="rebuild even when current")
    b.set_defaults(func=images_build)
    ls = img_sub.add_parser("list", help="show the images and their state")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=images_list)
