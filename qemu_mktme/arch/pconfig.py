"""PCONFIG leaf 0 (MKTME_KEY_PROGRAM): the 256-byte struct, its commands and status codes.

SDM vol. 2B "PCONFIG" and TME-MK spec §4 (mktme.md §3). The struct is read from memory at RBX,
which must be 256-byte aligned; only its first 192 bytes are read. Key bytes never appear in
``repr``: a :class:`KeyProgramStruct` shows the KeyID, the command and the algorithm only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

from .msr import Algorithm

PCONFIG_LEAF_MKTME_KEY_PROGRAM = 0

STRUCT_NBYTES = 256
STRUCT_ALIGN = 256
STRUCT_READ_NBYTES = 192  # KEYID .. KEY_FIELD_2; the last 64 bytes are not read
KEY_FIELD_NBYTES = 64

OFF_KEYID = 0
OFF_KEYID_CTRL = 2
OFF_RESERVED = 6
RESERVED_NBYTES = 58
OFF_KEY_FIELD_1 = 64
OFF_KEY_FIELD_2 = 128

# KEYID_CTRL (32 bits)
CTRL_COMMAND_MASK = 0xFF  # bits 7:0
CTRL_ENC_ALG_SHIFT = 8  # bits 23:8, same bit order as MK_TME_CRYPTO_ALGS
CTRL_ENC_ALG_MASK = 0xFFFF << CTRL_ENC_ALG_SHIFT
CTRL_RESERVED_MASK = 0xFF << 24  # bits 31:24, must be zero


class Command(IntEnum):
    """KEYID_CTRL.COMMAND."""

    KEYID_SET_KEY_DIRECT = 0
    KEYID_SET_KEY_RANDOM = 1
    KEYID_CLEAR_KEY = 2
    KEYID_NO_ENCRYPT = 3


KEYID_SET_KEY_DIRECT = Command.KEYID_SET_KEY_DIRECT
KEYID_SET_KEY_RANDOM = Command.KEYID_SET_KEY_RANDOM
KEYID_CLEAR_KEY = Command.KEYID_CLEAR_KEY
KEYID_NO_ENCRYPT = Command.KEYID_NO_ENCRYPT


class Status(IntEnum):
    """PCONFIG's RAX on return from MKTME_KEY_PROGRAM (ZF = 1 for every value but 0)."""

    PROG_SUCCESS = 0
    INVALID_PROG_CMD = 1
    ENTROPY_ERROR = 2
    INVALID_KEYID = 3
    INVALID_ENC_ALG = 4
    DEVICE_BUSY = 5


def enc_alg_bit(algorithm: Algorithm) -> int:
    """The ENC_ALG field value (not shifted) that names exactly ``algorithm``."""
    return 1 << algorithm


@dataclass(frozen=True)
class KeyProgramStruct:
    """MKTME_KEY_PROGRAM_STRUCT, decoded but not validated.

    ``unpack`` keeps whatever the bytes say, reserved fields included, so the platform can apply
    the architectural checks; ``pack`` writes exactly these fields. ``key_field_1`` is the data
    key (DIRECT) or entropy (RANDOM), ``key_field_2`` the tweak key or entropy; shorter values are
    zero-padded to 64 bytes.

    >>> s = KeyProgramStruct(keyid=1, command=Command.KEYID_NO_ENCRYPT, enc_alg=1)
    >>> KeyProgramStruct.unpack(s.pack()) == s
    True
    """

    keyid: int
    command: int
    enc_alg: int
    key_field_1: bytes = field(default=bytes(KEY_FIELD_NBYTES), repr=False)
    key_field_2: bytes = field(default=bytes(KEY_FIELD_NBYTES), repr=False)
    ctrl_reserved: int = 0
    reserved: bytes = field(default=bytes(RESERVED_NBYTES), repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.keyid <= 0xFFFF:
            raise ValueError(f"keyid must fit in 16 bits, got {self.keyid}")
        if not 0 <= self.command <= 0xFF:
            raise ValueError(f"command must fit in 8 bits, got {self.command}")
        if not 0 <= self.enc_alg <= 0xFFFF:
            raise ValueError(f"enc_alg must fit in 16 bits, got {self.enc_alg:#x}")
        if not 0 <= self.ctrl_reserved <= 0xFF:
            raise ValueError(f"ctrl_reserved must fit in 8 bits, got {self.ctrl_reserved:#x}")
        if len(self.reserved) != RESERVED_NBYTES:
            raise ValueError(f"reserved must be {RESERVED_NBYTES} bytes, got {len(self.reserved)}")
        for name in ("key_field_1", "key_field_2"):
            value = bytes(getattr(self, name))
            if len(value) > KEY_FIELD_NBYTES:
                raise ValueError(f"{name} must be at most {KEY_FIELD_NBYTES} bytes, got {len(value)}")
            object.__setattr__(self, name, value.ljust(KEY_FIELD_NBYTES, b"\0"))

    @classmethod
    def for_algorithm(
        cls,
        keyid: int,
        command: Command,
        algorithm: Algorithm,
        key: bytes = b"",
        tweak_key: bytes = b"",
    ) -> KeyProgramStruct:
        """A well-formed struct: ``enc_alg`` names ``algorithm`` alone."""
        return cls(keyid, command, enc_alg_bit(algorithm), key, tweak_key)

    @property
    def keyid_ctrl(self) -> int:
        return self.command | self.enc_alg << CTRL_ENC_ALG_SHIFT | self.ctrl_reserved << 24

    def pack(self) -> bytes:
        """The 256 bytes software writes to memory before PCONFIG."""
        head = struct.pack("<HI", self.keyid, self.keyid_ctrl) + self.reserved
        return head + self.key_field_1 + self.key_field_2 + bytes(STRUCT_NBYTES - OFF_KEY_FIELD_2 - 64)

    @classmethod
    def unpack(cls, raw: bytes | bytearray | memoryview) -> KeyProgramStruct:
        """Decode at least the 192 bytes PCONFIG reads (256 also accepted)."""
        raw = bytes(raw)
        if len(raw) not in (STRUCT_READ_NBYTES, STRUCT_NBYTES):
            raise ValueError(f"a key program struct is {STRUCT_READ_NBYTES} or {STRUCT_NBYTES} bytes, got {len(raw)}")
        keyid, ctrl = struct.unpack_from("<HI", raw, OFF_KEYID)
        return cls(
            keyid=keyid,
            command=ctrl & CTRL_COMMAND_MASK,
            enc_alg=(ctrl & CTRL_ENC_ALG_MASK) >> CTRL_ENC_ALG_SHIFT,
            ctrl_reserved=ctrl >> 24,
            reserved=raw[OFF_RESERVED : OFF_RESERVED + RESERVED_NBYTES],
            key_field_1=raw[OFF_KEY_FIELD_1 : OFF_KEY_FIELD_1 + KEY_FIELD_NBYTES],
            key_field_2=raw[OFF_KEY_FIELD_2 : OFF_KEY_FIELD_2 + KEY_FIELD_NBYTES],
        )

    def single_algorithm(self) -> Algorithm | None:
        """The algorithm ENC_ALG names, when it names exactly one known algorithm."""
        if self.enc_alg and self.enc_alg & (self.enc_alg - 1) == 0:
            bit = self.enc_alg.bit_length() - 1
            if bit in Algorithm._value2member_map_:
                return Algorithm(bit)
        return None
