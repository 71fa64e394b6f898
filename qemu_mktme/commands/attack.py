"""``qemu-mktme attack replay|cipherleak``: the attacks as commands (argparse glue only).

Each action's ``func`` returns a coroutine, which the CLI runs (``cli.run_async``)."""

from __future__ import annotations

import argparse

import re
from typing import Any

from ..attack.cipherleak import cipherleak, random_secret
from ..attack.replay import default_guesses, pin_replay, random_pin
from .options import print_json


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


async def _replay(args: argparse.Namespace) -> int:
    pin = args.pin or random_pin()
    guesses = default_guesses(pin, args.wrong)
    modes = {"none": [False], "mac": [True], "both": [False, True]}[args.integrity]
    results = []
    for integrity in modes:
        title = "with --integrity mac" if integrity else "MKTME as shipped (no integrity)"
        print(f"== replay, {title}: PIN {pin}, {args.wrong} wrong PINs then the right one")
        results.append(await pin_replay(integrity=integrity, pin=pin, guesses=guesses,
                                        out=lambda line: print(f"   {line}")))
    if args.json:
        print_json([{"integrity": r.integrity, "line_gpa": r.line_gpa, "line_hpa": r.line_hpa,
                     "attempts": r.attempts, "replays": r.replays, "unlocked": r.unlocked,
                     "machine_check": str(r.machine_check) if r.machine_check else None,
                     "guest_output": r.guest_output, "seconds": round(r.seconds, 2)} for r in results])
    else:
        print("== side by side")
        for r in results:
            mode = "integrity mac" if r.integrity else "no integrity "
            print(f"   {mode}: line GPA {r.line_gpa:#x}, {r.replays} replay{'s' * (r.replays != 1)}: {r.outcome}")
    return 0


async def _cipherleak(args: argparse.Namespace) -> int:
    secret = args.secret or random_secret(args.bits)
    passes = {"off": [False], "on": [True], "both": [False, True]}[args.mitigation]
    results = await cipherleak(secret=secret, passes=passes, period=args.period)
    if args.json:
        print_json([{"mitigated": r.mitigated, "secret": r.secret, "recovered": r.recovered,
                     "correct": r.correct, "total": len(r.secret), "seconds": round(r.seconds, 3),
                     "distinct_ciphertexts": r.distinct_ciphertexts} for r in results])
    return 0


def register(sub: Any) -> None:
    """``attack replay`` and ``attack cipherleak``."""
    at = sub.add_parser("attack", help="attacks on memory encryption without integrity, on a running guest",
                        description="What MKTME does not protect, shown on an unmodified Linux guest.")
    asub = at.add_subparsers(dest="attack", required=True, metavar="ATTACK")
    rp = asub.add_parser("replay", help="roll a guest's wrong-PIN counter back from the bus",
                         description="Record the DRAM ciphertext of the pin workload's retry counter, then write "
                                     "it back whenever one try is left: unlimited tries under MKTME, a machine "
                                     "check with --integrity mac.")
    rp.add_argument("--integrity", choices=("none", "mac", "both"), default="both",
                    help="run without the MAC, with it, or both side by side (default)")
    rp.add_argument("--pin", type=_pin, help="the guest's PIN (default: random)")
    rp.add_argument("--wrong", type=_positive, default=6, metavar="N", help="wrong PINs before the right one (default 6)")
    rp.add_argument("--json", action="store_true", help="machine-readable results at the end")
    rp.set_defaults(func=_replay)
    cl = asub.add_parser("cipherleak", help="recover a secret from ciphertext equality alone",
                         description="Watch the guest's stores to a variable it writes once per secret bit and "
                                     "decode the bits from the DRAM ciphertext, without the key; then again with "
                                     "the guest's per-write counter (the published mitigation).")
    cl.add_argument("--bits", type=_positive, default=64, metavar="N", help="random secret of N bits (default 64)")
    cl.add_argument("--secret", type=_bits, help="the secret bits instead of a random one")
    cl.add_argument("--mitigation", choices=("off", "on", "both"), default="both",
                    help="without the per-write counter, with it, or both (default)")
    cl.add_argument("--period", type=_period, default=0.05, metavar="S", help="seconds per bit in the guest (default 0.05)")
    cl.add_argument("--json", action="store_true", help="machine-readable results at the end")
    cl.set_defaults(func=_cipherleak)


__all__ = ["register"]

