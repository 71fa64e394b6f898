"""``qemu-mktme compare``: plain vs emulated runs, compared (``verify`` is its old name)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import verifier
from .options import PROG, print_json


async def compare_cmd(args: argparse.Namespace) -> int:
    outcomes, stock = await verifier.verify(args.workloads or None, inject=args.inject, shim=not args.no_shim,
                                            progress=lambda m: print(f"{PROG}: {m}", file=sys.stderr))
    if args.json:
        print_json({"stock": stock, "workloads": [o.to_json() for o in outcomes],
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


def register(sub: Any) -> None:
    v = sub.add_parser("compare", help="prove guests run unmodified: plain vs emulated, compared",
                       description="Run each workload on plain QEMU and under the full emulation (tenant key, "
                                   "KeyID-tagged EPT/VMM/IOMMU, shim, DRAM view, encrypted snapshots) and compare "
                                   "console transcripts, in-guest checksums and exit status. Exit 1 on any "
                                   "difference. Normalised nondeterminism: "
                                   + "; ".join(why for _, _, why in verifier.NORMALISE[:2])
                                   + ". The old name 'verify' still works.")
    v.add_argument("--workloads", nargs="+", choices=list(verifier.WORKLOADS), metavar="NAME",
                   help=f"workloads (default: all of {', '.join(verifier.WORKLOADS)})")
    v.add_argument("--inject", choices=verifier.INJECT, help="inject a fault into the emulated run (must be reported)")
    v.add_argument("--no-shim", action="store_true", help="do not attach the TCG plugin shim")
    v.add_argument("--json", action="store_true", help="machine-readable report")
    v.set_defaults(func=compare_cmd)
