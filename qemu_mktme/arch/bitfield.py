"""Declarative 64-bit register and table-entry layouts.

A layout is written once as a table of ``(name, high, low)`` rows copied from the manual, checked
when it is built to cover bits 63..0 exactly once, and then used both ways: ``decode`` gives a
read-only view that keeps ``.raw``, ``encode`` builds a value from named fields. Rows named
``reserved*`` are reserved (must be zero, checked by callers with :meth:`BitLayout.reserved_bits`);
rows named ``ignored*`` are free for software and never checked. Layouts whose bit positions
depend on MAXPHYADDR or KEYID_BITS are built by a function of those numbers; rows whose width
comes out as zero (``high == low - 1``) are dropped, so a KeyID field vanishes when KEYID_BITS = 0.

>>> lay = BitLayout("DEMO", [("enable", 0, 0), ("reserved", 7, 1), ("count", 63, 8)])
>>> v = lay.decode(0x301)
>>> v.enable, v.count, hex(v.raw)
(1, 3, '0x301')
>>> hex(lay.encode(enable=1, count=3))
'0x301'
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

WIDTH = 64
_ALL = (1 << WIDTH) - 1


@dataclass(frozen=True)
class Field:
    """Bits ``high..low`` (inclusive) of a 64-bit value."""

    name: str
    high: int
    low: int

    @property
    def width(self) -> int:
        return self.high - self.low + 1

    @property
    def mask(self) -> int:
        """The field's bits, in place."""
        return ((1 << self.width) - 1) << self.low

    @property
    def reserved(self) -> bool:
        return self.name.startswith("reserved")


class BitLayout:
    """A named 64-bit layout; see the module docstring."""

    def __init__(self, name: str, rows: Sequence[tuple[str, int, int]]) -> None:
        fields = []
        for n, hi, lo in rows:
            if hi == lo - 1:
                continue  # zero-width: the field does not exist for this configuration
            if not 0 <= lo <= hi < WIDTH:
                raise ValueError(f"{name}.{n}: bits {hi}..{lo} are not a range within 63..0")
            fields.append(Field(n, hi, lo))
        covered = 0
        names: set[str] = set()
        for f in fields:
            if f.mask & covered:
                raise ValueError(f"{name}.{f.name}: bits {f.high}..{f.low} overlap another field")
            if f.name in names:
                raise ValueError(f"{name}: field {f.name!r} named twice")
            covered |= f.mask
            names.add(f.name)
        if covered != _ALL:
            raise ValueError(f"{name}: fields leave bits {_ALL & ~covered:#x} uncovered")
        self.name = name
        self.fields: tuple[Field, ...] = tuple(sorted(fields, key=lambda f: f.low))
        self._by_name = {f.name: f for f in self.fields}
        self.reserved_mask = sum(f.mask for f in self.fields if f.reserved)

    def __repr__(self) -> str:
        return f"BitLayout({self.name!r})"

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def field(self, name: str) -> Field:
        try:
            return self._by_name[name]
        except KeyError:
            raise ValueError(f"{self.name} has no field {name!r}") from None

    def get(self, raw: int, name: str) -> int:
        f = self.field(name)
        return (raw >> f.low) & ((1 << f.width) - 1)

    def reserved_bits(self, raw: int) -> int:
        """The reserved bits set in ``raw`` (0 when the value is well-formed)."""
        return raw & self.reserved_mask

    def decode(self, raw: int) -> Bits:
        if not 0 <= raw <= _ALL:
            raise ValueError(f"{self.name}: value {raw:#x} is not a 64-bit unsigned integer")
        return Bits(self, raw)

    def encode(self, **values: int) -> int:
        """The raw value with the named fields set and every other bit zero.

        Raises ``ValueError`` for an unknown field or a value wider than its field.
        """
        raw = 0
        for name, value in values.items():
            f = self.field(name)
            value = int(value)
            if not 0 <= value < (1 << f.width):
                raise ValueError(f"{self.name}.{name}: {value:#x} does not fit in {f.width} bits")
            raw |= value << f.low
        return raw

    def replace(self, raw: int, **values: int) -> int:
        """``raw`` with the named fields changed."""
        for name in values:
            raw &= ~self.field(name).mask
        return raw | self.encode(**values)


class Bits(Mapping[str, int]):
    """A decoded value: fields by attribute or key, ``.raw`` for the whole."""

    __slots__ = ("layout", "raw")

    def __init__(self, layout: BitLayout, raw: int) -> None:
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "raw", raw)

    layout: BitLayout
    raw: int

    def __getattr__(self, name: str) -> int:
        if name.startswith("__") or name not in self.layout:
            raise AttributeError(name)
        return self.layout.get(self.raw, name)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{self.layout.name} values are read-only")

    def __getitem__(self, name: str) -> int:
        if name not in self.layout:
            raise KeyError(name)
        return self.layout.get(self.raw, name)

    def __iter__(self) -> Iterator[str]:
        return (f.name for f in self.layout.fields)

    def __len__(self) -> int:
        return len(self.layout.fields)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Bits):
            return self.layout is other.layout and self.raw == other.raw
        return NotImplemented

    def __hash__(self) -> int:
        return hash((id(self.layout), self.raw))

    @property
    def reserved(self) -> int:
        """Reserved bits that are set (0 when well-formed)."""
        return self.layout.reserved_bits(self.raw)

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={self.layout.get(self.raw, f.name):#x}"
            for f in self.layout.fields
            if not f.name.startswith(("reserved", "ignored")) and self.layout.get(self.raw, f.name)
        )
        return f"{self.layout.name}({self.raw:#018x}{': ' if shown else ''}{shown})"
