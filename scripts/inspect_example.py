#!/usr/bin/env python3
"""A tour of ``qemu-mktme inspect`` on dumps of real guests, written to a directory you can study.

Boots two bare-metal guests on one emulated MKTME host: ``enc`` under a tenant key (saved to
``OUT/tenant.key``) that writes a secret, and ``clear`` with a ``no-encrypt`` key. Captures a
dump, lets ``enc`` fill a few ranges, captures a second dump of it, then runs every action and
prints the command line for each, so you can rerun and vary them:

    .venv/bin/python scripts/inspect_example.py [OUT]        (default OUT: ./inspect-example)

Afterwards: ``OUT/map.png`` (KeyID map and entropy), ``OUT/diff.png``, ``OUT/secret.bin``.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qemu_mktme.cli import main as inspect  # noqa: E402
from qemu_mktme.qemu import images  # noqa: E402
from qemu_mktme.qemu.machine import MachineConfig  # noqa: E402
from qemu_mktme.live.session import HostSession, VmSpec  # noqa: E402

SECRET = "attack-at-dawn-" + os.urandom(4).hex()


async def make_dumps(out: Path) -> None:
    key, tweak = os.urandom(16), os.urandom(16)
    fd = os.open(out / "tenant.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{key.hex()} {tweak.hex()}\n")
    image = images.build("baremetal")
    specs = [
        VmSpec(MachineConfig(boot=image.boot(commands=[f"write 0x200000 {SECRET}"]), memory="128M", name="enc"),
               "acme", f"type=user key={key.hex()} tweak={tweak.hex()}"),
        VmSpec(MachineConfig(boot=image.boot(commands=["write 0x200000 nothing-to-hide", "fill 0x300000 8192 0x41"]),
                             memory="128M", name="clear"), "acme", "type=no-encrypt"),
    ]
    async with HostSession(specs, control=False) as session:
        enc = session.machines["enc"]
        await enc.console.wait_for(r"ok write 0x200000 ", 10)
        await session.machines["clear"].console.wait_for(r"ok fill 0x300000 ", 10)
        await session.dump(out / "before")
        for cmd in ("fill 0x400010 32 0xab", "fill 0x500000 4096 0x55", "fill 0x600000 256 0"):
            await enc.console.command(cmd, r"ok fill ")
            print(f"  enc> {cmd}")
        await session.dump(out / "after", vms=["enc"])


def run(*argv: str) -> None:
    print(f"\n$ qemu-mktme inspect {shlex.join(argv)}")
    sys.stdout.flush()
    inspect(["inspect", *argv])


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "inspect-example").resolve()
    out.mkdir(mode=0o700)
    print(f"booting two guests and capturing two dumps into {out}")
    asyncio.run(make_dumps(out))
    before, after, key = str(out / "before"), str(out / "after"), f"@{out / 'tenant.key'}"
    run(before, "map", "--png", str(out / "map.png"))
    run(before, "entropy", "--limit", "5")
    run(before, "search", SECRET)                                  # ciphertext: nothing
    run(before, "search", "nothing-to-hide")                       # the no-encrypt VM: plaintext
    run(before, "search", SECRET, "--key", key)                    # found, with its GPA
    run(before, "decrypt", "--key", key, "--vm", "enc", "--gpa", "0x200000", "--length", str(len(SECRET)),
        "-o", str(out / "secret.bin"))
    run(before, "diff", after, "--vm", "enc", "--png", str(out / "diff.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
