"""Sizes and addresses as people write them: ``4096``, ``0x200000``, ``4K``, ``512M``, ``1GiB``.

The one parser of the command line, the pytest plugin, machine configurations and the inspection
tools. ASCII digits only (``int`` would take a full-width ``１``); the binary suffixes K, M, G, T
(any case, optionally followed by ``iB`` or ``B``) multiply by 2**10 .. 2**40.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"\s*(0[xX][0-9a-fA-F_]+|[0-9][0-9_]*)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", re.ASCII)
_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}


def parse_number(text: str) -> int:
    """A byte count or address, 0 allowed; ``ValueError`` saying what is expected."""
    m = _NUMBER.fullmatch(text) if isinstance(text, str) else None
    try:
        if m is None:
            raise ValueError
        digits = m[1]
        value = int(digits[2:], 16) if digits[:2].lower() == "0x" else int(digits, 10)
    except ValueError:
        raise ValueError(f"not a number: {text!r} (examples: 4096, 0x200000, 4K, 1M)") from None
    return value << _SHIFT[m[2].lower()]


def parse_size(value: int | str) -> int:
    """A positive size in bytes from ``536870912``, ``"512M"``, ``"1G"``, ``"4096K"``."""
    if isinstance(value, int):
        size = value
    else:
        try:
            size = parse_number(value)
        except ValueError:
            raise ValueError(f"not a size: {value!r} (examples: 512M, 1G)") from None
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return size
