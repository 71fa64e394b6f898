"""``qemu-mktme inspect DUMP ACTION``: the inspection tools on the command line.

Thin, like the rest of the CLI: parse, call the library, print text (or ``--json`` for
scripts). Domain errors are raised as ``MktmeError``/``ValueError`` for the CLI to print as one
line; warnings (a key that decrypts nothing meaningful) go to stderr. Key material is read from
the spec inside the action, never through argparse (whose errors would echo it).

    qemu-mktme inspect DUMP map [--png FILE]
    qemu-mktme inspect DUMP entropy [--png FILE] [--threshold BITS]
    qemu-mktme inspect DUMP search PATTERN [--regex | --hex] [--key SPEC]
    qemu-mktme inspect DUMP decrypt (--key SPEC | --raw) (--gpa ADDR | --hpa ADDR) --length N -o FILE
    qemu-mktme inspect DUMP diff DUMP2 [--png FILE]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..arch.addresses import PAGE_SIZE
from ..arch.sizes import parse_number
from ..inspect.decrypt import extract
from ..inspect.diff import BLOCKS_PER_LINE, diff_dumps
from ..files.dumpfile import Dump
from ..inspect.entropy import DEFAULT_THRESHOLD, HISTOGRAM_EDGES, dump_entropy
from ..keymaterial import xts_key
from ..files.atomic import check_target
from ..inspect.layout import UNTAGGED, keyid_map
from ..inspect.plot import diff_png, entropy_png, map_png
from ..inspect.search import DEFAULT_MAX_MATCHES, DEFAULT_WINDOW, Pattern, search
from .options import print_json

PROG = "qemu-mktme"
KEY_HELP = ("KEYHEX:TWEAKHEX[:aes-xts-128|aes-xts-256], or @FILE holding 'KEYHEX TWEAKHEX' (keeps the key "
            "out of ps); never printed")


def _number(text: str) -> int:
    """An address or size: 4096, 0x1000, 4K, 2M, 1G."""
    try:
        return parse_number(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive(text: str) -> int:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def _bits(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 8:
        raise argparse.ArgumentTypeError(f"entropy is 0..8 bits per byte; the threshold must be in (0, 8], got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _warn(text: str) -> None:
    print(f"{PROG}: warning: {text}", file=sys.stderr)


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"


def _hexn(value: int | None) -> str:
    return "-" if value is None else f"{value:#x}"


def _limit(n: int) -> int | None:
    return None if n == 0 else n


# ------------------------------------------------------------------------------- actions


def _png_first(args: argparse.Namespace) -> None:
    if args.png:
        check_target(args.png, force=args.force)     # before the work, not after


def do_map(args: argparse.Namespace) -> int:
    dump = Dump(args.dump)
    _png_first(args)
    kmap = keyid_map(dump, args.vm)
    if args.png:
        size = map_png(args.png, kmap, dump_entropy(dump, args.vm, regions=kmap.regions), force=args.force)
        if not args.json:
            print(f"wrote {args.png} ({size[0]}x{size[1]})")
    if args.json:
        print_json(kmap.to_json())
        return 0
    print(f"{dump.path}: {len(kmap.regions)} VM(s), {kmap.npages} pages ({_mib(kmap.npages * PAGE_SIZE)})")
    print(f"{'KeyID':>6} {'pages':>10} {'size':>11}  VMs")
    for k, row in kmap.by_keyid().items():
        name = "none" if k == UNTAGGED else str(k)
        extra = " (pages the EPT does not map)" if k == UNTAGGED else ""
        print(f"{name:>6} {row['pages']:>10} {_mib(row['pages'] * PAGE_SIZE):>11}  {', '.join(row['vms'])}{extra}")
    runs = kmap.runs()
    for i, r in enumerate(kmap.regions):
        mismatched = kmap.mismatched_pages(i)
        print(f"\n{r.vm} (tenant {r.tenant}): KeyID {r.keyid}, {r.key_type} {r.algorithm or ''}".rstrip()
              + f", HPA {r.hpa:#x}-{r.end - 1:#x}")
        if mismatched:
            print(f"  {mismatched} page(s) tagged with a KeyID other than the VM's {r.keyid}: the guest reads "
                  "garbage there")
        for run in (x for x in runs if x.vm == r.vm):
            tag = "no EPT entry" if run.keyid == UNTAGGED else f"KeyID {run.keyid}"
            end = run.hpa + run.npages * PAGE_SIZE - 1
            print(f"  HPA {run.hpa:#x}-{end:#x} {run.npages:>8} pages  {tag:<12} GPA {_hexn(run.gpa)}")
    return 0


def do_entropy(args: argparse.Namespace) -> int:
    dump = Dump(args.dump)
    _png_first(args)
    emap = dump_entropy(dump, args.vm, threshold=args.threshold)
    if args.png:
        size = entropy_png(args.png, emap, force=args.force)
        if not args.json:
            print(f"wrote {args.png} ({size[0]}x{size[1]})")
    if args.json:
        print_json(emap.to_json(_limit(args.limit)))
        return 0
    total = emap.summary()
    if not total["pages"]:
        print(f"{dump.path}: no pages")
        return 0
    print(f"{dump.path}: {total['pages']} pages, mean {total['mean_bits']} bits/byte, {total['low_pages']} below "
          f"{emap.threshold:g} ({total['constant_pages']} constant); ciphertext looks like ~7.955")
    for r in emap.regions:
        s = emap.summary(r)
        print(f"  {r.vm} (KeyID {r.keyid}, {r.key_type}): {s['pages']} pages, mean {s['mean_bits']}, "
              f"min {s['min_bits']}, {s['low_pages']} low")
    hist = total["histogram"]
    peak = max(hist) or 1
    print("histogram (bits/byte: pages)")
    for i, n in enumerate(hist):
        if n:
            print(f"  {HISTOGRAM_EDGES[i]:4.2f}-{HISTOGRAM_EDGES[i + 1]:4.2f} {n:>10} {'#' * max(1, 40 * n // peak)}")
    low = emap.low_runs()
    shown = low if args.limit == 0 else low[:args.limit]
    if low:
        print(f"low-entropy pages (below {emap.threshold:g} bits/byte: not what ciphertext looks like)")
    for run in shown:
        tag = "no EPT entry" if run.keyid == UNTAGGED else f"KeyID {run.keyid}"
        print(f"  {run.vm} HPA {run.hpa:#x} GPA {_hexn(run.gpa)} {run.npages:>7} pages  {tag}  "
              f"min {run.min_bits:.2f} mean {run.mean_bits:.2f}")
    if len(shown) < len(low):
        print(f"  ... {len(low) - len(shown)} more runs (--limit 0 shows all)")
    return 0


def do_search(args: argparse.Namespace) -> int:
    dump = Dump(args.dump)
    pattern = Pattern(args.pattern, regex=args.regex, hex=args.hex, window=args.window)
    key = xts_key(args.key) if args.key is not None else None
    result = search(dump, pattern, key=key, vm=args.vm, max_matches=_limit(args.max_matches))
    for info in result.regions:
        if info.reason:
            _warn(f"{info.vm} not searched: {info.reason}")
        if info.looks_random:
            _warn(f"{info.vm}: the key decrypts nothing meaningful: all {info.sampled_pages} sampled pages still "
                  f"look random (mean {info.mean_bits:.3f} bits/byte); wrong key?")
    if args.json:
        print_json(result.to_json())
        return 0
    for m in result.matches:
        tag = "no EPT entry" if m.keyid == UNTAGGED else f"KeyID {m.keyid}"
        print(f"{m.vm} HPA {m.hpa:#x} GPA {_hexn(m.gpa)} {tag}: {m.data[:48]!r}"
              + (f" ({m.nbytes} bytes)" if m.nbytes > 48 else ""))
    view = "decrypted" if result.decrypted else "raw (ciphertext)"
    searched = ", ".join(i.vm for i in result.regions if i.searched) or "none"
    more = " or more (--max-matches 0 finds all)" if result.truncated else ""
    print(f"{len(result.matches)} match(es){more} in the {view} DRAM of {searched}")
    return 0


def do_decrypt(args: argparse.Namespace) -> int:
    dump = Dump(args.dump)
    if args.raw == (args.key is not None):
        raise ValueError("give exactly one of --key and --raw")
    key = xts_key(args.key) if args.key is not None else None
    out = extract(dump, args.output, key=key, nbytes=args.length, gpa=args.gpa, hpa=args.hpa, vm=args.vm,
                  force=args.force)
    if out.looks_random:
        _warn(f"the decrypted pages look random ({out.pages} page(s), mean {out.mean_bits:.3f} bits/byte): wrong key? "
              "(without integrity a wrong key decrypts without error)")
    if args.json:
        print_json(out.to_json())
        return 0
    what = "plaintext" if out.decrypted else "raw DRAM"
    print(f"wrote {out.nbytes} bytes of {what} of {out.vm} HPA {out.hpa:#x} (GPA {_hexn(out.gpa)}) to {out.path}")
    return 0


def do_diff(args: argparse.Namespace) -> int:
    a, b = Dump(args.dump), Dump(args.dump2)
    _png_first(args)
    result = diff_dumps(a, b, args.vm, limit=_limit(args.limit))
    if args.png:
        size = diff_png(args.png, result, force=args.force)
        if not args.json:
            print(f"wrote {args.png} ({size[0]}x{size[1]})")
    if args.json:
        print_json(result.to_json(_limit(args.limit)))
        return 0
    for d in result.regions:
        print(f"{d.vm}: {d.changed_blocks} of {d.total_blocks} 16-byte blocks changed, in {d.changed_lines} "
              f"64-byte lines, {d.changed_pages} pages")
        for note in d.notes:
            print(f"  note: {note}")
        runs = d.line_runs()
        shown = runs if args.limit == 0 else runs[:args.limit]
        for run in shown:
            if run.gpa is not None:
                where = f"GPA {run.gpa:#x}-{run.gpa + run.nlines * 64 - 1:#x}"
            else:
                where = f"HPA {run.hpa:#x}-{run.hpa + run.nlines * 64 - 1:#x}"
            text = f"  {where}  {run.nlines} line(s), {run.nblocks} block(s)"
            partial = [f"{(h - run.hpa + run.gpa) if run.gpa is not None else h:#x} "
                       f"[{','.join(str(j) for j in range(BLOCKS_PER_LINE) if m >> j & 1)}]"
                       for h, m in run.partial[:8]]
            if partial:
                text += "; partly changed lines (blocks): " + " ".join(partial) + (" ..." if len(run.partial) > 8 else "")
            print(text)
        if d.truncated or len(shown) < len(runs):
            print("  ... more ranges (--limit 0 shows all)")
    return 0


# ------------------------------------------------------------------------------- parser


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``inspect`` to a CLI's subparsers; each action sets ``func(args) -> int``."""
    p = subparsers.add_parser(
        "inspect", help="study a DRAM dump: KeyID map, entropy, search, decrypt, diff",
        description="Study a DRAM dump made by 'qemu-mktme dump': what a physical attacker holds. Every action "
                    "takes --json for scripts.")
    p.add_argument("dump", metavar="DUMP", help="dump directory")
    actions = p.add_subparsers(dest="inspect_action", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    common.add_argument("--vm", metavar="NAME", help="only this VM")
    png = argparse.ArgumentParser(add_help=False)
    png.add_argument("--png", metavar="FILE", help="also draw a PNG picture")
    png.add_argument("--force", action="store_true", help="overwrite an existing output file")

    m = actions.add_parser("map", parents=[common, png], help="pages and bytes per KeyID, HPA runs per VM",
                           description="The KeyID of every dumped page as the VMs' EPTs tag it: pages per KeyID, "
                                       "HPA runs with their GPAs. --png draws it next to the per-page entropy.")
    m.set_defaults(func=do_map)

    e = actions.add_parser("entropy", parents=[common, png], help="per-page Shannon entropy (bits/byte)",
                           description="Entropy of every 4 KiB page. Ciphertext looks random (~7.955 bits/byte); "
                                       "pages below the threshold look like plaintext.")
    e.add_argument("--threshold", type=_bits, default=DEFAULT_THRESHOLD, metavar="BITS",
                   help=f"pages below this are low-entropy (default {DEFAULT_THRESHOLD})")
    e.add_argument("--limit", type=_count, default=50, metavar="N",
                   help="show at most N runs of low-entropy pages (0: all; default 50)")
    e.set_defaults(func=do_entropy)

    s = actions.add_parser("search", parents=[common], help="find bytes or a regex, raw or decrypted with a key",
                           description="Search the raw DRAM (ciphertext: a secret should not be there) or, with "
                                       "--key, the DRAM decrypted with that key. Reports VM, HPA, GPA and KeyID.")
    s.add_argument("pattern", metavar="PATTERN", help="bytes to find (text, or hex with --hex, or a regex)")
    kind = s.add_mutually_exclusive_group()
    kind.add_argument("--regex", action="store_true", help="PATTERN is a Python bytes regular expression")
    kind.add_argument("--hex", action="store_true", help="PATTERN is hex, e.g. deadbeef")
    s.add_argument("--key", metavar="SPEC", help=f"search the plaintext under this key: {KEY_HELP}")
    s.add_argument("--max-matches", type=_count, default=DEFAULT_MAX_MATCHES, metavar="N",
                   help=f"stop after N matches (0: no limit; default {DEFAULT_MAX_MATCHES})")
    s.add_argument("--window", type=_positive, default=DEFAULT_WINDOW, metavar="N",
                   help=f"longest regex match found across chunk boundaries (default {DEFAULT_WINDOW})")
    s.set_defaults(func=do_search)

    d = actions.add_parser("decrypt", parents=[common], help="write the plaintext of a range to a file",
                           description="Decrypt a range of one VM's DRAM with a key and write it to a new file "
                                       "(mode 0600; an existing file is kept unless --force).")
    how = d.add_mutually_exclusive_group(required=True)
    how.add_argument("--key", metavar="SPEC", help=KEY_HELP)
    how.add_argument("--raw", action="store_true", help="write the DRAM bytes as they are (no key)")
    where = d.add_mutually_exclusive_group(required=True)
    where.add_argument("--gpa", type=_number, metavar="ADDR", help="guest-physical start (of --vm)")
    where.add_argument("--hpa", type=_number, metavar="ADDR", help="host-physical start")
    d.add_argument("--length", "-n", type=_positive, required=True, metavar="N", help="bytes (e.g. 64, 4K, 1M)")
    d.add_argument("--output", "-o", required=True, metavar="FILE", help="file to create")
    d.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    d.set_defaults(func=do_decrypt)

    f = actions.add_parser("diff", parents=[common, png], help="which 16-byte blocks changed between two dumps",
                           description="Compare two dumps of the same VM(s) block by block: what deterministic "
                                       "XTS shows a bus observer (a changed plaintext block changes exactly its "
                                       "ciphertext block). Lists the changed ranges with their GPAs and lines.")
    f.add_argument("dump2", metavar="DUMP2", help="the later dump")
    f.add_argument("--limit", type=_count, default=100, metavar="N",
                   help="list at most N changed ranges per VM (0: all; default 100); the counts are always exact")
    f.set_defaults(func=do_diff)
    return p




__all__ = ["register"]
