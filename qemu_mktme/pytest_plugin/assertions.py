"""Assertions for MKTME properties, with messages that say where and what.

    assert_not_in_dram(vm, b"secret")                 # nowhere in what the memory bus carries
    assert_ciphertext(vm, gpa, 4096)                  # DRAM holds this range encrypted under the VM's KeyID
    await expect_console(vm, r"ok crc32 .*\\n")         # or the transcript tail in the failure
    assert_no_sanitizer_reports(vm)                   # the KeyID-aliasing sanitizer found nothing
"""

from __future__ import annotations

import re
from typing import Any

from ..arch.addresses import KeyID
from ..errors import ConsoleTimeout
from ..host.guest import EncryptedGuest

__tracebackhide__ = True


def _guest(vm: Any) -> EncryptedGuest:
    guest = getattr(vm, "guest", vm)
    if not isinstance(guest, EncryptedGuest):
        raise TypeError("pass an EncryptedMachine (or its .guest): plain QEMU has no DRAM view")
    return guest


def find_in_dram(vm: Any, needle: bytes) -> int | None:
    """Backend offset of ``needle`` in the guest's whole DRAM view, or None."""
    return _guest(vm).find_in_dram(needle)


def assert_not_in_dram(vm: Any, secret: bytes | str) -> None:
    """``secret`` appears nowhere in the DRAM view of the guest's RAM."""
    __tracebackhide__ = True
    needle = secret.encode() if isinstance(secret, str) else bytes(secret)
    if len(needle) < 4:
        raise ValueError("a secret shorter than 4 bytes would match ciphertext by chance")
    offset = find_in_dram(vm, needle)
    if offset is not None:
        guest = _guest(vm)
        raise AssertionError(f"secret found in DRAM at HPA {guest.hpa_base + offset:#x} "
                             f"(GPA {guest.gpa_of(guest.hpa_base + offset):#x}): memory is not encrypted there")


def assert_ciphertext(vm: Any, gpa: int, nbytes: int, keyid: int | None = None) -> None:
    """DRAM holds ``[gpa, gpa + nbytes)`` as the CPU view encrypted under ``keyid`` (default: the
    VM's), and — unless that KeyID stores plaintext — not as plaintext."""
    __tracebackhide__ = True
    guest = _guest(vm)
    start, end = gpa - gpa % 64, -(-(gpa + nbytes) // 64) * 64
    k = guest.keyid if keyid is None else KeyID(keyid)
    plain = guest.read(start, end - start)
    dram = guest.dram(start, end - start)
    expected = guest.platform.memory.dram_image(k, guest.hpa_of(start, end - start), plain).tobytes()
    if dram != expected:
        first = next(i for i in range(len(dram)) if dram[i] != expected[i])
        raise AssertionError(f"DRAM at GPA {start + first:#x} is not this range encrypted under KeyID {k}")
    mode = guest.platform.key_entry(k).mode.value
    if mode == "encrypt" and dram == plain and any(plain):
        raise AssertionError(f"DRAM at GPA {start:#x}+{end - start:#x} holds plaintext")


def assert_no_sanitizer_reports(vm: Any) -> None:
    """The KeyID-aliasing sanitizer of ``vm``'s host made no report about this VM or the host
    (rules (a)-(d), see :mod:`qemu_mktme.host.sanitizer`). The ``mktme_host`` fixture installs
    one; a host of your own needs ``Host(sanitizer=Sanitizer())``."""
    __tracebackhide__ = True
    host = getattr(vm, "host", None)
    sanitizer = getattr(host, "sanitizer", None)
    if sanitizer is None:
        raise TypeError("the VM's host has no sanitizer: build it with Host(sanitizer=Sanitizer())")
    name = getattr(vm, "name", None)
    found = [r for r in sanitizer.reports if r.vm in (None, name)]
    if found:
        shown = "\n".join(f"  {r}" for r in found[:10])
        more = f"\n  ... and {len(found) - 10} more" if len(found) > 10 else ""
        raise AssertionError(f"{len(found)} sanitizer report{'s' * (len(found) != 1)} for VM {name}:\n{shown}{more}")


async def expect_console(vm: Any, pattern: str | re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
    """Wait for ``pattern`` on the console; on timeout, fail with the transcript's tail."""
    __tracebackhide__ = True
    try:
        return await vm.console.wait_for(pattern, timeout)
    except ConsoleTimeout as err:
        raise AssertionError(f"console never showed {err.pattern!r} within {timeout:g} s; last output:\n"
                             f"{err.transcript_tail[-1500:]}") from None
