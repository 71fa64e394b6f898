"""The four TME/MKTME MSRs: addresses, bit layouts and the encryption algorithm numbers.

Layouts follow Intel's *Architecture Memory Encryption Technologies Specification* rev 1.3
(336907-003), §2.2-2.5 (mktme.md §2). The exclusion MSRs hold an address field that ends at
MAXPHYADDR-1, so their layouts are built per MAXPHYADDR. The WRMSR rules themselves live with
the platform model (``engine.platform``); this module only says where the bits are.
"""

from __future__ import annotations

from enum import IntEnum
from functools import cache

from .bitfield import BitLayout

IA32_TME_CAPABILITY = 0x981
IA32_TME_ACTIVATE = 0x982
IA32_TME_EXCLUDE_MASK = 0x983
IA32_TME_EXCLUDE_BASE = 0x984


class Algorithm(IntEnum):
    """An encryption algorithm, valued by its bit number.

    The same number is the TME policy value (ACTIVATE bits 7:4), the CAPABILITY bit, the
    MK_TME_CRYPTO_ALGS bit minus 48 and the KEYID_CTRL.ENC_ALG bit minus 8.
    """

    AES_XTS_128 = 0
    AES_XTS_256 = 2

    @property
    def key_nbytes(self) -> int:
        """Length of each of the two keys (data key, tweak key)."""
        return 16 if self is Algorithm.AES_XTS_128 else 32

    @property
    def label(self) -> str:
        return self.name.replace("_", "-")


def algorithm_bitmap(algorithms: tuple[Algorithm, ...] | list[Algorithm]) -> int:
    """The algorithms as a bitmap by bit number (0x5 for both AES-XTS variants)."""
    return sum(1 << a for a in set(algorithms))


def algorithms_in(bitmap: int) -> tuple[Algorithm, ...]:
    """The known algorithms whose bits are set in ``bitmap``."""
    return tuple(a for a in Algorithm if bitmap >> a & 1)


# SDM vol. 4 / TME-MK spec §2.3: IA32_TME_CAPABILITY (read-only)
TME_CAPABILITY = BitLayout(
    "IA32_TME_CAPABILITY",
    [
        ("aes_xts_128", 0, 0),
        ("reserved_1", 1, 1),  # AES-XTS-128 with integrity on later parts: not modelled
        ("aes_xts_256", 2, 2),
        ("reserved_30_3", 30, 3),
        ("tme_encryption_bypass_supported", 31, 31),
        ("mk_tme_max_keyid_bits", 35, 32),
        ("mk_tme_max_keys", 50, 36),
        ("reserved_63_51", 63, 51),
    ],
)

# TME-MK spec §2.4: IA32_TME_ACTIVATE
TME_ACTIVATE = BitLayout(
    "IA32_TME_ACTIVATE",
    [
        ("lock", 0, 0),  # RO: set by a successful WRMSR, written value ignored
        ("tme_enable", 1, 1),
        ("key_select", 2, 2),  # 0 = new key, 1 = restore key from storage (standby resume)
        ("save_key_for_standby", 3, 3),
        ("tme_policy", 7, 4),  # an Algorithm value
        ("reserved_30_8", 30, 8),
        ("tme_bypass_enable", 31, 31),
        ("mk_tme_keyid_bits", 35, 32),
        ("reserved_47_36", 47, 36),
        ("mk_tme_crypto_algs", 63, 48),  # bitmap by Algorithm value
    ],
)

CRYPTO_ALGS_SHIFT = TME_ACTIVATE.field("mk_tme_crypto_algs").low


@cache
def tme_exclude_mask_layout(maxphyaddr: int) -> BitLayout:
    """TME-MK spec §2.5: IA32_TME_EXCLUDE_MASK for one MAXPHYADDR."""
    return BitLayout(
        "IA32_TME_EXCLUDE_MASK",
        [
            ("reserved_10_0", 10, 0),
            ("enable", 11, 11),
            ("tmeemask", maxphyaddr - 1, 12),
            ("reserved_high", 63, maxphyaddr),
        ],
    )


@cache
def tme_exclude_base_layout(maxphyaddr: int) -> BitLayout:
    """TME-MK spec §2.5: IA32_TME_EXCLUDE_BASE for one MAXPHYADDR."""
    return BitLayout(
        "IA32_TME_EXCLUDE_BASE",
        [
            ("reserved_11_0", 11, 0),
            ("tmeebase", maxphyaddr - 1, 12),
            ("reserved_high", 63, maxphyaddr),
        ],
    )


def is_contiguous_mask(tmeemask: int, width: int) -> bool:
    """True when the ``width``-bit mask field is ones from its top bit down, then zeros.

    The exclusion mask selects the bits that must match the base, so a valid mask covers a
    naturally aligned power-of-two range: 0b1111000, not 0b1011000. An all-zero mask is
    contiguous (it matches every address).
    """
    inverted = ~tmeemask & ((1 << width) - 1)
    return inverted & (inverted + 1) == 0
