"""Helpers shared by the engine tests."""

from qemu_mktme.arch import pconfig as pc
from qemu_mktme.arch.msr import Algorithm
from qemu_mktme.engine.platform import PconfigResult, Platform

STRUCT_PA = 0x10000


def program(p: Platform, s: pc.KeyProgramStruct, package: int = 0, pa: int = STRUCT_PA) -> PconfigResult:
    """Write ``s`` to memory (KeyID 0) and run PCONFIG on it."""
    p.memory.write(pa, s.pack())
    return p.pconfig(0, pa, package=package)


def direct(keyid: int, key: bytes, tweak: bytes, alg: Algorithm = Algorithm.AES_XTS_128) -> pc.KeyProgramStruct:
    return pc.KeyProgramStruct.for_algorithm(keyid, pc.KEYID_SET_KEY_DIRECT, alg, key, tweak)


