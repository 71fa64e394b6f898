"""``qemu-mktme attack replay|badram|batteringram|wiretap|cipherleak|matrix``: the attacks as
commands (argparse glue only: the library is :mod:`qemu_mktme.attack`).

Each attack runs on real guests, once per platform mode asked for (``--mitigation``, default: all
six), and prints what happened to the victim, then a verdict per mode. ``attack matrix`` runs every
attack against every mode and writes the table as text, JSON and PNG.

Each action's ``func`` returns a coroutine, which the CLI runs (``cli.run_async``)."""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

from ..attack.cipherleak import cipherleak, random_secret
from ..attack.matrix import ATTACKS, CONTROLS, Matrix, run_matrix
from ..attack.replay import DEFAULT_ALIAS_BIT, random_pin
from ..attack.victims import GUESTS
from ..engine.platform import MITIGATIONS
from .options import UsageError, alias_bit, print_json


def _pin(text: str) -> str:
    if not re.fullmatch(r"\d{4}", text):
        raise argparse.ArgumentTypeError(f"a PIN is 4 digits, got {text!r}")
    return text


def _bits(text: str) -> str:
    if not re.fullmatch(r"[01]{1,1024}", text):
        raise argparse.ArgumentTypeError(f"expected 1 to 1024 bits as 0 and 1, got {text!r}")
    return text


def _positive(text: str) -> int:
    if not re.fullmatch(r"\d+", text) or not 0 < int(text) <= 1024:
        raise argparse.ArgumentTypeError(f"expected a whole number in 1..1024, got {text!r}")
    return int(text)


def _period(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.001 <= value <= 10:
        raise argparse.ArgumentTypeError(f"expected seconds in 0.001..10, got {text!r}")
    return value


def _modes(text: str) -> list[str]:
    """``all`` or a comma-separated list of platform modes."""
    if text == "all":
        return list(MITIGATIONS)
    modes = [m for m in text.split(",") if m]
    wrong = [m for m in modes if m not in MITIGATIONS]
    if not modes or wrong:
        raise argparse.ArgumentTypeError(f"expected 'all' or modes from {', '.join(MITIGATIONS)}, got {text!r}")
    return modes


def _attacks(text: str) -> list[str]:
    names = [a for a in text.split(",") if a]
    wrong = [a for a in names if a not in ATTACKS]
    if not names or wrong:
        raise argparse.ArgumentTypeError(f"expected attacks from {', '.join(ATTACKS)}, got {text!r}")
    return names


def _out_file(text: str) -> str:
    if text != "-" and Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory")
    return text


def _png_file(text: str) -> str:
    if text == "-" or Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"the PNG goes to a file, not {text!r}")
    return text


def _print_cells(m: Matrix, as_json: bool) -> None:
    if as_json:
        print_json(m.to_json())
        return
    print("== verdicts")
    for c in m.cells:
        mark = "" if c.as_expected else f" (expected {c.expected})"
        print(f"   {c.mitigation:<18} {c.verdict}{mark}: {c.evidence}")


async def _one(args: argparse.Namespace) -> int:
    """One attack against the modes asked for."""
    attack = args.attack_name
    if attack == "cipherleak" and args.counter is not None:
        return await _cipherleak_counter(args)
    modes = args.mitigation
    if attack == "replay" and args.integrity is not None:
        modes = {"none": ["none"], "mac": ["mac"], "both": ["none", "mac"]}[args.integrity]
    name = "replay-meta" if attack == "replay" and args.variant == "data+meta" else (
        "replay-data" if attack == "replay" else attack)
    pin = getattr(args, "pin", None) or random_pin()
    secret = getattr(args, "secret", None)
    if name in ("wiretap", "cipherleak"):
        secret = secret or random_secret(args.bits)
        if len(secret) % args.width:
            raise UsageError(f"the secret's {len(secret)} bits are not whole {args.width}-bit windows")
    what = f"PIN {pin}, {args.wrong} wrong PINs then the right one" if name not in ("wiretap", "cipherleak") else \
        f"a {len(secret or '')}-bit secret in {args.width}-bit windows"
    print(f"== {name} on the {args.guest} guest ({what}), modes: {', '.join(modes)}")

    def detail(line: str) -> None:
        print(f"   {line}", flush=True)

    def header(line: str) -> None:
        if not args.json:
            print(f"-- {line}", flush=True)

    m = await run_matrix(guest=args.guest, attacks=[name], mitigations=modes, pin=pin,
                         wrong=getattr(args, "wrong", 4), secret=secret, width=getattr(args, "width", 2),
                         period=getattr(args, "period", 0.05), out=header, detail=None if args.json else detail,
                         alias_bit=getattr(args, "alias_bit", DEFAULT_ALIAS_BIT))
    _print_cells(m, args.json)
    return 0


async def _cipherleak_counter(args: argparse.Namespace) -> int:
    """Today's demonstration: the ``bits`` workload, without and with the guest's per-write counter."""
    secret = args.secret or random_secret(args.bits)
    passes = {"off": [False], "on": [True], "both": [False, True]}[args.counter]
    results = await cipherleak(secret=secret, passes=passes, period=args.period, mitigation=args.mitigation[0])
    if args.json:
        print_json([{"mitigated": r.mitigated, "secret": r.secret, "recovered": r.recovered,
                     "correct": r.correct, "total": len(r.secret), "seconds": round(r.seconds, 3),
                     "distinct_ciphertexts": r.distinct_ciphertexts} for r in results])
    return 0


async def _matrix(args: argparse.Namespace) -> int:
    def line(text: str) -> None:
        print(text, file=sys.stderr if args.json == "-" else sys.stdout, flush=True)

    m = await run_matrix(guest=args.guest, attacks=args.attacks, mitigations=args.mitigation, out=line,
                         alias_bit=args.alias_bit)
    table = m.table()
    print(table, file=sys.stderr if args.json == "-" else sys.stdout)
    print(f"{len(m.cells)} cells in {m.seconds:.0f} s (load {m.load}); {len(m.unexpected)} not as expected",
          file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json == "-":
        print_json(m.to_json())
    elif args.json:
        m.save_json(args.json)
    if args.png:
        m.png(args.png)
    return 1 if args.check and m.unexpected else 0


def _common(p: argparse.ArgumentParser, *, pin: bool) -> None:
    p.add_argument("--mitigation", type=_modes, default=list(MITIGATIONS), metavar="MODES",
                   help=f"platform modes, comma-separated, or 'all' (default): {', '.join(MITIGATIONS)}")
    p.add_argument("--guest", choices=GUESTS, default="linux",
                   help="the victim's guest: linux (default; stock kernel and busybox) or baremetal (fast)")
    if pin:
        p.add_argument("--pin", type=_pin, help="the guest's PIN (default: random)")
        p.add_argument("--wrong", type=_positive, default=6, metavar="N", help="wrong PINs before the right one (default 6)")
    else:
        p.add_argument("--bits", type=_positive, default=64, metavar="N", help="random secret of N bits (default 64)")
        p.add_argument("--secret", type=_bits, help="the secret bits instead of a random one")
        p.add_argument("--width", type=int, choices=(1, 2, 3, 4), default=2, help="bits per table window (default 2)")
        p.add_argument("--period", type=_period, default=0.05, metavar="S",
                       help="seconds between the victim's stores (default 0.05)")
    p.add_argument("--json", action="store_true", help="the verdicts as JSON instead of the log")


def _paragraphs(*texts: str) -> str:
    """Paragraphs wrapped for a raw ``--help`` description."""
    return "\n\n".join(textwrap.fill(p, 100) for t in texts for p in t.split("\n\n"))


def register(sub: Any) -> None:
    """``attack NAME`` for each attack, and ``attack matrix``."""
    at = sub.add_parser("attack", help="attacks on memory encryption on a running guest, against each mitigation",
                        description="What MKTME does not protect, and what each mitigation changes, shown on "
                                    "unmodified guests (docs/attacks.md).")
    asub = at.add_subparsers(dest="attack", required=True, metavar="ATTACK")
    raw = argparse.RawDescriptionHelpFormatter
    specs = {
        "replay": ("roll a guest's wrong-PIN counter back from the bus",
                   "Record the DRAM line of the pin workload's retry counter, then write it back whenever one "
                   "try is left (--variant data: the data bits; data+meta: data and ECC/MAC bits).",
                   CONTROLS["replay-data"] + "\n\nWith --variant data+meta: " + CONTROLS["replay-meta"].split(": ", 1)[1]),
        "badram": ("BadRAM: a DIMM alias from boot; host software captures and replays a line through it",
                   "The host boots with a DIMM that decodes one address bit less than declared; it loads the "
                   "victim's counter line through the ghost address and stores it back later.", CONTROLS["badram"]),
        "batteringram": ("Battering RAM: the same alias, switched on after boot by an interposer",
                         "As badram, with the alias switched on only for the capture and the write-back (after "
                         "the boot-time alias check).", CONTROLS["batteringram"]),
        "wiretap": ("WireTap: a passive bus dictionary of (address, ciphertext) -> value",
                    "Watch the table workload's stores, sample the DRAM ciphertext of the variable at each, "
                    "build a dictionary from the public table's stores and decode the secret's.", CONTROLS["wiretap"]),
        "cipherleak": ("CipherLeaks: host software reads the ciphertext and decodes by equality",
                       "As wiretap, through a no-encrypt KeyID load instead of the bus. --counter runs today's "
                       "bits workload without and with the guest's per-write counter.", CONTROLS["cipherleak"]),
    }
    for name, (help_text, what, controls) in specs.items():
        p = asub.add_parser(name, help=help_text, formatter_class=raw, description=_paragraphs(what, controls))
        _common(p, pin=name in ("replay", "badram", "batteringram"))
        if name == "replay":
            p.add_argument("--variant", choices=("data", "data+meta"), default="data",
                           help="replay the data bits only (default) or data and metadata bits together")
            p.add_argument("--integrity", choices=("none", "mac", "both"), default=None,
                           help="the older spelling of --mitigation none / mac / none,mac")
        if name in ("badram", "batteringram"):
            p.add_argument("--alias-bit", type=alias_bit, default=DEFAULT_ALIAS_BIT, metavar="BIT",
                           help=f"the DIMM address bit that aliases (default {DEFAULT_ALIAS_BIT}: 64 GiB)")
        if name == "cipherleak":
            p.add_argument("--counter", choices=("off", "on", "both"), default=None,
                           help="today's demonstration on the bits workload, without/with the guest's per-write "
                                "counter (the first --mitigation mode is the platform's)")
        p.set_defaults(func=_one, attack_name=name)
    mx = asub.add_parser("matrix", help="every attack against every mitigation, as a table, JSON and PNG",
                         formatter_class=raw,
                         description=_paragraphs("Run each attack against each platform mode on real guests (one host "
                                     "boot per cell) and print the verdicts: succeeded, detected (#MC on "
                                     "consumption), blocked; with attempts and time. * marks a cell that "
                                     "depends on a model decision (docs/attacks.md).",
                                     *(f"{a}: {c}" for a, c in CONTROLS.items())))
    mx.add_argument("--guest", choices=GUESTS, default="baremetal",
                    help="the victims' guest: baremetal (default, ~30 s) or linux (minutes)")
    mx.add_argument("--attacks", type=_attacks, default=list(ATTACKS), metavar="LIST",
                    help=f"comma-separated subset of: {', '.join(ATTACKS)}")
    mx.add_argument("--mitigation", type=_modes, default=list(MITIGATIONS), metavar="MODES",
                    help="comma-separated platform modes, or 'all' (default)")
    mx.add_argument("--alias-bit", type=alias_bit, default=DEFAULT_ALIAS_BIT, metavar="BIT", help=argparse.SUPPRESS)
    mx.add_argument("--json", type=_out_file, metavar="FILE", help="write the matrix as JSON (- for standard output)")
    mx.add_argument("--png", type=_png_file, metavar="FILE", help="draw the matrix into a PNG file")
    mx.add_argument("--check", action="store_true", help="exit 1 when a cell is not the expected verdict")
    mx.set_defaults(func=_matrix)


__all__ = ["register"]
