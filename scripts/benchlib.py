"""What every scripts/bench_*.py shares: interleaved rounds, medians and spread, one result line.

On a shared 2-core machine any single timing is noise. Each benchmark therefore runs its
candidate and baseline alternately, round after round (the order rotating, so neither always
runs first), and reports per figure the median with the spread (min-max) of its rounds; the
ratio printed last is the ratio of medians. ``--quick`` runs few rounds on small inputs, for CI
smoke use: its figures are not worth comparing.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Awaitable, Callable, Sequence


def add_common(parser: argparse.ArgumentParser, rounds: int) -> None:
    parser.add_argument("--rounds", type=int, default=rounds, help=f"interleaved rounds (default {rounds})")
    parser.add_argument("--quick", action="store_true", help="few rounds, small inputs: a smoke test")


def order(names: Sequence[str], round_no: int) -> list[str]:
    """The names rotated by the round number: each goes first equally often."""
    k = round_no % len(names)
    return list(names[k:]) + list(names[:k])


def interleave(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Call each variant once per round, in rotating order; each returns its measured seconds."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name in order(list(variants), r):
            times[name].append(variants[name]())
    return times


async def ainterleave(variants: dict[str, Callable[[], Awaitable[float]]], rounds: int,
                      progress: bool = True) -> dict[str, list[float]]:
    """:func:`interleave` for coroutines."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name in order(list(variants), r):
            t = await variants[name]()
            times[name].append(t)
            if progress:
                print(f"  round {r + 1} {name:12} {t:8.3f} s", flush=True)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float]) -> str:
    """``median (min-max)``, in the units given."""
    return f"{median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"


def ratio_spread(num: Sequence[float], den: Sequence[float]) -> str:
    """The ratio of medians, and the spread of the per-round ratios (rounds paired in order)."""
    per_round = [a / b for a, b in zip(num, den)]
    return f"{median(num) / median(den):.3f} (rounds {min(per_round):.3f}-{max(per_round):.3f})"
