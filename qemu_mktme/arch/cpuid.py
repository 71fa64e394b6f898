"""The CPUID bits that enumerate TME, MKTME and PCONFIG (mktme.md §2, SDM vol. 2A CPUID).

Encoders produce the four output registers from a description of the processor, decoders read
them back, so both the platform model and code written against the manual use one definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

LEAF_EXTENDED_FEATURES = 0x7
LEAF_PCONFIG = 0x1B
LEAF_EXT_MAX = 0x80000000
LEAF_ADDRESS_SIZES = 0x80000008

LEAF7_ECX_TME = 13  # CPUID.(EAX=7,ECX=0):ECX[13] TME_EN
LEAF7_EDX_PCONFIG = 18  # CPUID.(EAX=7,ECX=0):EDX[18] PCONFIG

PCONFIG_SUBLEAF_INVALID = 0
PCONFIG_SUBLEAF_TARGET_ID = 1  # EAX[11:0] = 1: EBX, ECX, EDX hold target identifiers
PCONFIG_TARGET_MKTME = 1


class CpuidResult(NamedTuple):
    eax: int
    ebx: int
    ecx: int
    edx: int


@dataclass(frozen=True)
class CpuidFeatures:
    """What the modelled processor enumerates."""

    tme: bool
    pconfig: bool
    maxphyaddr: int
    linear_address_bits: int = 48


def leaf7(features: CpuidFeatures) -> CpuidResult:
    """Sub-leaf 0 of leaf 7 with only the bits this project models."""
    return CpuidResult(
        0, 0, int(features.tme) << LEAF7_ECX_TME, int(features.pconfig) << LEAF7_EDX_PCONFIG
    )


def leaf1b(features: CpuidFeatures, subleaf: int) -> CpuidResult:
    """PCONFIG enumeration: sub-leaf 0 names MKTME as target 1; every other sub-leaf is invalid."""
    if features.pconfig and subleaf == 0:
        return CpuidResult(PCONFIG_SUBLEAF_TARGET_ID, PCONFIG_TARGET_MKTME, 0, 0)
    return CpuidResult(PCONFIG_SUBLEAF_INVALID, 0, 0, 0)


def leaf80000008(features: CpuidFeatures) -> CpuidResult:
    """Address sizes: EAX[7:0] physical, EAX[15:8] linear. MAXPHYADDR is *not* reduced by
    KEYID_BITS; software subtracts them itself."""
    return CpuidResult(features.maxphyaddr | features.linear_address_bits << 8, 0, 0, 0)


def has_tme(leaf7_result: CpuidResult) -> bool:
    return bool(leaf7_result.ecx >> LEAF7_ECX_TME & 1)


def has_pconfig(leaf7_result: CpuidResult) -> bool:
    return bool(leaf7_result.edx >> LEAF7_EDX_PCONFIG & 1)


def pconfig_targets(leaf1b_results: list[CpuidResult]) -> list[int]:
    """Target identifiers from consecutive leaf 0x1B sub-leaves, stopping at the first invalid one."""
    targets: list[int] = []
    for r in leaf1b_results:
        if r.eax & 0xFFF != PCONFIG_SUBLEAF_TARGET_ID:
            break
        targets += [t for t in (r.ebx, r.ecx, r.edx) if t]
    return targets


def maxphyaddr(leaf80000008_result: CpuidResult) -> int:
    return leaf80000008_result.eax & 0xFF
