"""Every attack against every mitigation, on real guests: ``qemu-mktme attack matrix``.

Rows are the attacks (:data:`ATTACKS`), columns the platform modes
(:data:`~qemu_mktme.engine.platform.MITIGATIONS`). Each cell boots a host in that mode, runs the
victim on it and attacks it; its verdict is what happened to the victim:

- **succeeded**: the concrete effect (a PIN accepted after its counter was rolled back; every
  secret bit recovered from ciphertext alone);
- **detected**: the guest consumed a poisoned line: a machine check at the instruction that
  loaded it (capstone), the VM stopped;
- **blocked**: the attack could not get what it needs (the host refused to boot an aliased DIMM,
  a capture returned no ciphertext, the ciphertext never repeats);
- **failed**: none of these (the guest locked itself, bits decoded wrongly): never expected.

:data:`EXPECTED` holds the verdicts the issue derives from the model's rules; :data:`MODEL_DECISIONS`
says which cells hold only because of a decision the model made where hardware is not public or
differs. Results go out as a table, JSON (:meth:`Matrix.to_json`) and a PNG (:meth:`Matrix.png`, pillow).
The two dictionary rows watch one run of the table victim through both channels.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.platform import MITIGATIONS
from ..files.atomic import atomic_output
from .bus import AttackError
from .replay import DEFAULT_ALIAS_BIT, ROLLBACKS, ReplayResult, default_guesses, rollback
from .victims import PIN_LIMIT, PinVictim, TableVictim
from .wiretap import ATTACK_OF_CHANNEL, DictionaryResult, table_leak

ATTACKS = (*ROLLBACKS, "wiretap", "cipherleak")
VERDICTS = ("succeeded", "detected", "blocked", "failed")

CONTROLS: dict[str, str] = {
    "replay-data": (
        "What the attacker controls: an interposer on the DIMM's data pins (a bus agent between the "
        "memory controller and DRAM). It reads and writes the data bits of any line of the victim's "
        "RAM, never the ECC/metadata bits, never a CPU instruction or a key. It records the line "
        "holding the victim's wrong-PIN counter while it is 0 and writes it back whenever one try is "
        "left; the attacker also types PINs on the victim's console, as any user could."),
    "replay-meta": (
        "What the attacker controls: an interposer on the DIMM's data and ECC pins. It records a "
        "line's data bits together with its metadata bits (where a per-line MAC and owner bit live, "
        "as on TDX) and writes both back; no CPU instruction, no key, nothing on the die (a version "
        "counter there is out of its reach). It rolls the victim's wrong-PIN counter back and types "
        "PINs on its console."),
    "badram": (
        "What the attacker controls: the host's software (ring 0: it programs a no-encrypt KeyID and "
        "maps any physical address) and, once before boot, the DIMM's SPD chip, rewritten to "
        "declare one more address bit than the module has (BadRAM's ~$5 microcontroller), so two "
        "physical addresses reach one DRAM cell. No bus probe, no key: it loads the victim's "
        "counter line through the ghost address (its ciphertext) and later stores it back there. "
        "The memory controller checks and tags the ghost address, as hardware does."),
    "batteringram": (
        "What the attacker controls: the host's software and a DIMM interposer with analog "
        "switches (Battering RAM's < $50 board) that makes a DRAM address bit alias at will, after "
        "the boot-time memory checks. It switches the alias on only to load the victim's counter "
        "line through the ghost address and to store it back later, and off in between."),
    "wiretap": (
        "What the attacker controls: a passive interposer on the DRAM bus (WireTap's < $1000 "
        "probe) that reads what the bus carries at chosen addresses: it never writes, runs no code "
        "on the host and holds no key. It knows the victim's program (public): the victim stores "
        "a public table into one variable in order, then the entry each secret window indexes. "
        "From the first stores it builds an (address, ciphertext) -> value dictionary and looks "
        "each later store up."),
    "cipherleak": (
        "What the attacker controls: the hypervisor's software. It loads the victim's memory "
        "through a KeyID it programmed no-encrypt (as SEV's hypervisor reads guest pages): it sees "
        "what DRAM holds unless the memory controller hides it, and decodes the victim's "
        "secret-indexed stores with the same dictionary as wiretap. No bus access, no key."),
}
"""The one-paragraph threat model of each attack (the CLI's ``--help`` prints it)."""

EXPECTED: dict[str, dict[str, str]] = {
    "replay-data": dict(zip(MITIGATIONS, ("succeeded", "detected", "detected", "succeeded", "succeeded", "detected"))),
    "replay-meta": dict(zip(MITIGATIONS, ("succeeded", "succeeded", "succeeded", "succeeded", "succeeded", "detected"))),
    "badram": dict(zip(MITIGATIONS, ("succeeded", "detected", "blocked", "blocked", "blocked", "detected"))),
    "batteringram": dict(zip(MITIGATIONS, ("succeeded", "detected", "blocked", "succeeded", "blocked", "detected"))),
    "wiretap": dict(zip(MITIGATIONS, ("succeeded", "succeeded", "succeeded", "succeeded", "succeeded", "blocked"))),
    "cipherleak": dict(zip(MITIGATIONS, ("succeeded", "succeeded", "blocked", "succeeded", "blocked", "blocked"))),
}
"""The verdicts issue 26 expects, from the model's rules."""

_TAGS_IN_METADATA = ("the MAC lives in the line's metadata (ECC) bits, which an interposer records and "
                     "replays with the data (as TDX keeps it); were tags out of the bus's reach, this "
                     "cell would be 'detected'")
_OWNER_IN_CELL = ("the owner travels with the DRAM cell (TDX keeps the TD-owner bit in the line's "
                  "metadata), so a ghost address sees it too")
_HIDING_IN_CELL = ("ciphertext hiding is decided by the line's owner, kept with the DRAM cell; SNP "
                   "decides by the RMP entry of the address given, so through a ghost address the "
                   "hypervisor's own page would be read and this cell would be 'succeeded'")
_ALWAYS_DIRTY = ("the engine does not see the guest's stores: every DRAM-side access of a guest line "
                 "is taken to follow a write-back (a new version); hardware would repeat a "
                 "ciphertext for a line sampled twice with no store between")
_SHARED_UNCHECKED = ("only reads through private (key-programmed) KeyIDs are MAC-checked, as TDX "
                     "checks TD private KeyIDs: a no-encrypt read returns the ciphertext, no #MC")
_RETAG = ("a write through another address and KeyID stores that access's tag (re-tags the line): "
          "the guest's next load fails the MAC")

MODEL_DECISIONS: dict[tuple[str, str], str] = {
    ("replay-meta", "mac"): _TAGS_IN_METADATA,
    ("replay-meta", "mac+owner"): _TAGS_IN_METADATA,
    ("replay-meta", "freshness"): _ALWAYS_DIRTY,
    ("replay-data", "freshness"): _ALWAYS_DIRTY,
    ("badram", "mac"): _RETAG,
    ("batteringram", "mac"): _RETAG,
    ("badram", "mac+owner"): _OWNER_IN_CELL,
    ("batteringram", "mac+owner"): _OWNER_IN_CELL,
    ("badram", "ciphertext-hiding"): _HIDING_IN_CELL,
    ("batteringram", "ciphertext-hiding"): _HIDING_IN_CELL,
    ("wiretap", "freshness"): _ALWAYS_DIRTY,
    ("cipherleak", "freshness"): _ALWAYS_DIRTY,
    ("cipherleak", "mac"): _SHARED_UNCHECKED,
}
"""Cells whose verdict depends on a decision of the model (docs/attacks.md explains each)."""


@dataclass
class Cell:
    """One attack against one mitigation."""

    attack: str
    mitigation: str
    verdict: str
    attempts: int
    seconds: float
    evidence: str
    unit: str = "PINs"
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def expected(self) -> str:
        return EXPECTED[self.attack][self.mitigation]

    @property
    def model_decision(self) -> str | None:
        return MODEL_DECISIONS.get((self.attack, self.mitigation))

    @property
    def as_expected(self) -> bool:
        return self.verdict == self.expected

    def to_json(self) -> dict[str, Any]:
        return {"attack": self.attack, "mitigation": self.mitigation, "verdict": self.verdict,
                "expected": self.expected, "as_expected": self.as_expected, "attempts": self.attempts,
                "unit": self.unit, "seconds": round(self.seconds, 2), "evidence": self.evidence,
                "model_decision": self.model_decision, **self.details}


def rollback_cell(r: ReplayResult) -> Cell:
    """A cell from a rollback run, with its evidence."""
    if r.verdict == "succeeded":
        evidence = (f"PIN accepted after its counter was rolled back {r.replays} times: unlocked with "
                    f"{r.attempts} PINs, the guest allows {PIN_LIMIT}")
    elif r.verdict == "detected":
        assert r.machine_check is not None
        evidence = str(r.machine_check)
    elif r.verdict == "blocked":
        evidence = r.blocked
    else:
        evidence = r.outcome
    details: dict[str, Any] = {"line_gpa": hex(r.line_gpa), "replays": r.replays, "log": r.log}
    if r.machine_check is not None:
        details["instruction"] = str(r.machine_check.access.instruction)
    return Cell(r.attack, r.mitigation, r.verdict, r.attempts, r.seconds, evidence, "PINs", details)


def leak_cell(r: DictionaryResult) -> Cell:
    """A cell from one channel of a table run."""
    evidence = r.summary()
    details = {"secret": r.secret, "recovered": r.recovered, "bits_correct": r.correct, "bits": len(r.secret),
               "bits_chance": r.chance, "distinct_ciphertexts": r.distinct, "runs": r.runs}
    return Cell(r.attack, r.mitigation, r.verdict, len(r.samples) * r.runs, r.seconds, evidence, "stores", details)


@dataclass
class Matrix:
    """The verdicts of one ``attack matrix`` run."""

    guest: str
    cells: list[Cell]
    seconds: float = 0.0
    load: str = ""

    def cell(self, attack: str, mitigation: str) -> Cell:
        for c in self.cells:
            if (c.attack, c.mitigation) == (attack, mitigation):
                return c
        raise KeyError((attack, mitigation))

    @property
    def unexpected(self) -> list[Cell]:
        return [c for c in self.cells if not c.as_expected]

    def to_json(self) -> dict[str, Any]:
        return {"guest": self.guest, "seconds": round(self.seconds, 1), "load": self.load,
                "mitigations": [m for m in MITIGATIONS if any(c.mitigation == m for c in self.cells)],
                "attacks": [a for a in ATTACKS if any(c.attack == a for c in self.cells)],
                "cells": [c.to_json() for c in self.cells],
                "unexpected": [[c.attack, c.mitigation] for c in self.unexpected]}

    def table(self) -> str:
        """The matrix as text: verdict, attempts and time per cell; * = depends on a model decision,
        ! = not the expected verdict."""
        modes = [m for m in MITIGATIONS if any(c.mitigation == m for c in self.cells)]
        attacks = [a for a in ATTACKS if any(c.attack == a for c in self.cells)]
        width = 29
        lines = ["attack".ljust(14) + "".join(m.ljust(width) for m in modes)]
        for a in attacks:
            row = a.ljust(14)
            for m in modes:
                try:
                    c = self.cell(a, m)
                except KeyError:
                    row += "-".ljust(width)
                    continue
                mark = ("*" if c.model_decision else "") + ("!" if not c.as_expected else "")
                row += f"{c.verdict}{mark} {c.attempts} {c.unit}, {c.seconds:.1f}s".ljust(width)
            lines.append(row)
        lines.append("* depends on a model decision (docs/attacks.md); ! not the expected verdict; "
                     "PINs typed or stores observed, and seconds")
        return "\n".join(lines)

    def png(self, path: str | os.PathLike[str]) -> Path:
        """Draw the matrix (pillow) into ``path`` (all or nothing, replacing it): one coloured cell
        per verdict, attempts and time in it."""
        from PIL import Image, ImageDraw, ImageFont

        modes = [m for m in MITIGATIONS if any(c.mitigation == m for c in self.cells)]
        attacks = [a for a in ATTACKS if any(c.attack == a for c in self.cells)]
        colours = {"succeeded": (231, 76, 60), "detected": (243, 156, 18), "blocked": (39, 174, 96),
                   "failed": (149, 165, 166)}
        font = ImageFont.load_default(size=15)
        small = ImageFont.load_default(size=12)
        cw, ch, lw, th = 168, 62, 130, 70
        img = Image.new("RGB", (lw + cw * len(modes) + 10, th + ch * len(attacks) + 58), "white")
        draw = ImageDraw.Draw(img)
        draw.text((10, 8), f"qemu-mktme attack matrix ({self.guest} guests, {self.seconds:.0f} s)", fill="black", font=font)
        for j, m in enumerate(modes):
            draw.text((lw + j * cw + 8, 40), m, fill="black", font=font)
        for i, a in enumerate(attacks):
            y = th + i * ch
            draw.text((10, y + 22), a, fill="black", font=font)
            for j, m in enumerate(modes):
                x = lw + j * cw
                try:
                    c = self.cell(a, m)
                except KeyError:
                    continue
                draw.rectangle((x + 2, y + 2, x + cw - 2, y + ch - 2), fill=colours[c.verdict],
                               outline="black" if not c.as_expected else (0, 0, 0), width=1 if c.as_expected else 4)
                label = c.verdict + (" *" if c.model_decision else "")
                draw.text((x + 8, y + 8), label, fill="white", font=font)
                draw.text((x + 8, y + 30), f"{c.attempts} {c.unit}, {c.seconds:.1f} s", fill="white", font=small)
                if not c.as_expected:
                    draw.text((x + 8, y + 44), f"expected {c.expected}", fill="white", font=small)
        y = th + len(attacks) * ch + 10
        x = 10
        legend = {"succeeded": "attack succeeded", "detected": "detected: #MC", "blocked": "blocked",
                  "failed": "failed"}
        for verdict, colour in colours.items():
            draw.rectangle((x, y, x + 14, y + 14), fill=colour)
            draw.text((x + 20, y), legend[verdict], fill="black", font=small)
            x += 130
        draw.text((x, y), "* depends on a model decision (docs/attacks.md)", fill="black", font=small)
        with atomic_output(path, force=True, what="matrix PNG") as f:
            img.save(f, "PNG")
        return Path(path)

    def save_json(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_json` to ``path`` (all or nothing, replacing it)."""
        with atomic_output(path, force=True, what="matrix JSON") as f:
            f.write((json.dumps(self.to_json(), indent=2) + "\n").encode())
        return Path(path)


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


async def run_matrix(*, guest: str = "baremetal", attacks: Sequence[str] = ATTACKS,
                     mitigations: Sequence[str] = MITIGATIONS, pin: str = "4711", wrong: int = 4,
                     secret: str | None = None, width: int = 2, period: float = 0.05,
                     out: Callable[[str], None] = print, detail: Callable[[str], None] | None = None,
                     alias_bit: int = DEFAULT_ALIAS_BIT, timeout: float = 60.0) -> Matrix:
    """Run ``attacks`` against ``mitigations`` on ``guest`` victims; one host boot per cell (the
    two dictionary attacks share theirs). ``out`` hears one line per cell, ``detail`` (when
    given) every step of every attack."""
    for a in attacks:
        if a not in ATTACKS:
            raise AttackError(f"unknown attack {a!r} (have: {', '.join(ATTACKS)})")
    for m in mitigations:
        if m not in MITIGATIONS:
            raise AttackError(f"unknown mitigation {m!r} (have: {', '.join(MITIGATIONS)})")
    if secret is None:
        secret = "".join(random.SystemRandom().choice("01") for _ in range(32 if guest == "baremetal" else 64))
    started = time.monotonic()
    cells: list[Cell] = []
    guesses = default_guesses(pin, wrong)
    channels = [c for c, a in ATTACK_OF_CHANNEL.items() if a in attacks]

    def quiet(_: str) -> None:
        pass

    log = detail or quiet
    for mitigation in mitigations:
        for attack in (a for a in ROLLBACKS if a in attacks):
            r = await rollback(attack=attack, mitigation=mitigation, victim=PinVictim(guest, pin),
                               guesses=guesses, out=log, alias_bit=alias_bit, timeout=timeout)
            cells.append(rollback_cell(r))
            _report(cells[-1], out)
        if channels:
            for r2 in await table_leak(mitigation=mitigation, victim=TableVictim(guest, secret, width, period),
                                       channels=channels, out=log, timeout=timeout):
                cells.append(leak_cell(r2))
                _report(cells[-1], out)
    return Matrix(guest, cells, time.monotonic() - started, _load())


def _report(c: Cell, out: Callable[[str], None]) -> None:
    mark = "" if c.as_expected else f"  (expected {c.expected})"
    out(f"{c.attack:<13} {c.mitigation:<18} {c.verdict:<9} {c.attempts:>3} {c.unit:<6} {c.seconds:5.1f} s  "
        f"{c.evidence}{mark}")


__all__ = ["ATTACKS", "CONTROLS", "EXPECTED", "MODEL_DECISIONS", "VERDICTS", "Cell", "Matrix", "run_matrix"]
