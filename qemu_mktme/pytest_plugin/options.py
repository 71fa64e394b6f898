"""The plugin's settings: each ``--mktme-*`` option has an ini twin; bad values fail fast."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from ..keymaterial import key_payload
from ..images import RECIPES, default_memory_help
from ..arch.sizes import parse_size

GUESTS = tuple(RECIPES)

# (name, ini key, default, help)
OPTIONS = [
    ("guest", "mktme_guest", "baremetal", f"guest image for mktme_vm: {' or '.join(GUESTS)}"),
    ("memory", "mktme_memory", "", f"guest RAM for mktme_vm, e.g. 512M (default: {default_memory_help()})"),
    ("key", "mktme_key", "user", "the VM key: user (a random tenant key), cpu, user:KEYHEX:TWEAKHEX, "
                                  "user:@FILE, clear, no-encrypt"),
    ("keyid-bits", "mktme_keyid_bits", "6", "MK_TME_KEYID_BITS of the emulated host"),
    ("boot-timeout", "mktme_boot_timeout", "120", "seconds to wait for a guest's boot marker"),
]


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("qemu-mktme", "MKTME emulation (qemu-mktme)")
    for name, ini, default, help_text in OPTIONS:
        group.addoption(f"--mktme-{name}", dest=ini, default=None, help=f"{help_text} [ini: {ini}]")
        parser.addini(ini, help=help_text, default=default)


@dataclass(frozen=True)
class Settings:
    guest: str
    memory: int | None
    key: str
    keyid_bits: int
    boot_timeout: float

    def header(self) -> str:
        mem = f"{self.memory >> 20}M" if self.memory else "default"
        return (f"qemu-mktme: guest={self.guest} memory={mem} key={self.key.split(':')[0]} "
                f"keyid-bits={self.keyid_bits} boot-timeout={self.boot_timeout:g}s")


def _value(config: pytest.Config, ini: str) -> str:
    cli = config.getoption(ini)
    return str(cli if cli is not None else config.getini(ini))


def settings(config: pytest.Config) -> Settings:
    """Validated settings; ``pytest.UsageError`` naming the option and the valid values."""
    guest = _value(config, "mktme_guest")
    if guest not in GUESTS:
        raise pytest.UsageError(f"--mktme-guest / mktme_guest: {guest!r} is not one of {', '.join(GUESTS)}")
    memory_text = _value(config, "mktme_memory")
    try:
        memory = parse_size(memory_text) if memory_text else None
    except ValueError:
        raise pytest.UsageError(f"--mktme-memory / mktme_memory: {memory_text!r} is not a size (e.g. 512M, 1G)") from None
    key = _value(config, "mktme_key")
    if key != "user":
        try:
            key_payload(key)
        except ValueError as err:
            raise pytest.UsageError(f"--mktme-key / mktme_key: {err}") from None
    numbers: dict[str, Any] = {}
    for ini, low, high in (("mktme_keyid_bits", 1, 15), ("mktme_boot_timeout", 1, 3600)):
        text = _value(config, ini)
        try:
            numbers[ini] = float(text) if ini == "mktme_boot_timeout" else int(text)
            if not low <= numbers[ini] <= high:
                raise ValueError
        except ValueError:
            raise pytest.UsageError(f"--{ini.replace('_', '-')} / {ini}: {text!r} must be a number in {low}..{high}") from None
    return Settings(guest, memory, key, numbers["mktme_keyid_bits"], numbers["mktme_boot_timeout"])
