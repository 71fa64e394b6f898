"""An MKTME platform with an instruction-level interface: CPUID, RDMSR/WRMSR, PCONFIG, memory.

Code written against Intel's manual drives it unchanged: a BIOS writes IA32_TME_ACTIVATE (and
the exclusion MSRs) with every #GP rule of mktme.md §2 applied; the OS runs PCONFIG leaf 0 with
the struct in this platform's physical memory, with the order of checks of mktme.md §3 (#UD,
#GP(0), then the status in RAX and ZF). Faults are :class:`~qemu_mktme.errors.GeneralProtection`
and :class:`~qemu_mktme.errors.InvalidOpcode`.

Model decisions beyond the manual:

* One key table **per package**; PCONFIG programs only the package it runs on. Memory is homed on
  packages (``memory_homes``, default: all on package 0) and a line uses its home package's
  table. :meth:`Platform.inconsistencies` lists KeyIDs programmed differently across packages.
* A KeyID **never programmed since boot** encrypts with a per-boot random key nobody knows
  (per package), so its reads are garbage; it also shows up in the inconsistency report when
  another package programmed it.
* **CLEAR** uses the TME key, or plaintext under bypass; the exclusion range applies to KeyID 0
  only (not to cleared KeyIDs). Before activation, or with TME disabled, memory is plaintext.
* **RANDOM keys** are ``rng(n)`` XOR the struct's entropy fields, ``rng`` defaulting to
  :func:`secrets.token_bytes`; ``rng`` returning ``None`` or :meth:`Platform.entropy_failure`
  gives ENTROPY_ERROR. :meth:`Platform.key_table_lock` holds a package's table lock, as another
  logical processor would, so PCONFIG there returns DEVICE_BUSY.
* The upper-key-bytes rule uses the key length of the algorithm ENC_ALG names; when ENC_ALG does
  not name exactly one known algorithm, bytes 32..63 must be zero (#GP) and the status check
  then reports INVALID_ENC_ALG.
* KEY_SELECT = 1 (restore the TME key from storage) with no stored key is #GP. Storage survives
  :meth:`Platform.resume_from_standby` (S3: DRAM kept, MSRs and key tables lost).
* PCONFIG's RBX is treated as a physical address (identity-mapped), KeyID bits included.
* ``integrity="mac"`` adds a per-line MAC (not MKTME: what TDX adds; :mod:`.integrity` says how
  the model differs from TDX). PCONFIG gives the KeyID a fresh integrity key; activation gives
  KeyID 0 one. ``integrity=None`` (the default) is MKTME as shipped.
* ``mitigation`` names a platform mode (:data:`MITIGATIONS`, docs/attacks.md): ``none`` (TME-MK as
  shipped), ``mac`` (= ``integrity="mac"``), ``mac+owner`` (the MAC plus TDX's TD-owner bit),
  ``alias-check`` (the BIOS probes the DIMMs for address aliases before activating TME, AMD's
  BadRAM fix: :class:`~.dimm.DimmAliasError` when it finds one), ``ciphertext-hiding`` (SNP's:
  shared-KeyID reads of private lines return 0xFF) and ``freshness`` (the MAC plus SGX-MEE-like
  version counters, :class:`~.integrity.CounterTree`). Private KeyIDs are the ones PCONFIG gave a
  key (DIRECT or RANDOM); KeyID 0, CLEAR and NO_ENCRYPT KeyIDs are shared.
* ``dimm_alias`` (a bit): the DIMMs decode one address bit less than the controller drives, from
  power-on (BadRAM's SPD); :meth:`Platform.set_dimm_alias` switches it at run time (Battering
  RAM's interposer). See :mod:`.dimm`.
* A memory ``observer`` with a ``key_programmed(keyid, package, command)`` method hears of every
  successful PCONFIG (the KeyID-aliasing sanitizer's rule (d)).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from ..arch import cpuid as cpuid_bits
from ..arch import msr as msr_bits
from ..arch import pconfig as pc
from ..arch.addresses import PAGE_SIZE, KeyIdLayout
from ..arch.msr import Algorithm
from ..errors import GeneralProtection, InvalidOpcode
from .dimm import DimmAliasError, DimmMap, check_alias_bit, probe_aliases
from .integrity import CounterTree, Hiding, LineIntegrity
from .keytable import PLAINTEXT, KeyEntry, KeyMode, KeyTable, LineCipher, XtsLineCipher
from .memory import PhysicalMemory, Segments
from .xts import XtsKey

__all__ = ["AES_XTS_128", "AES_XTS_256", "MITIGATIONS", "KeyIdInconsistency", "PconfigResult", "Platform"]

MITIGATIONS = ("none", "mac", "mac+owner", "alias-check", "ciphertext-hiding", "freshness")
"""The platform modes, from MKTME as shipped to a counter tree (docs/attacks.md)."""

AES_XTS_128 = Algorithm.AES_XTS_128
AES_XTS_256 = Algorithm.AES_XTS_256

Rng = Callable[[int], "bytes | None"]

MAX_PACKAGES = 64
"""CPU packages (sockets, each with its own key table) a platform may have: more than any shipped
MKTME system (8-socket Xeons), and a bound on the tables the model allocates."""


@dataclass(frozen=True)
class PconfigResult:
    """What PCONFIG leaves behind when it does not fault: RAX and ZF."""

    rax: int
    zf: bool

    @property
    def status(self) -> pc.Status:
        return pc.Status(self.rax)


@dataclass(frozen=True)
class KeyIdInconsistency:
    """A KeyID whose programming differs between packages.

    ``per_package[p]`` describes package p's entry (mode and algorithm, never key bytes);
    ``groups[p]`` is equal for packages holding identical programming.
    """

    keyid: int
    per_package: tuple[str, ...]
    groups: tuple[int, ...]


@dataclass(frozen=True)
class _CryptoView:
    """Everything that decides a line's cipher, frozen so old and new can be compared."""

    tme: LineCipher  # KeyID 0 and CLEAR: TME key, or plaintext (bypass / not enabled)
    exclusion: tuple[int, int] | None  # [start, end) for KeyID 0
    tables: tuple[dict[int, KeyEntry], ...]
    homes: tuple[tuple[int, int, int], ...]
    unprogrammed: Callable[[int, int], LineCipher]

    def cipher(self, package: int, keyid: int) -> LineCipher:
        if keyid == 0:
            return self.tme
        entry = self.tables[package].get(keyid)
        if entry is None:
            return self.unprogrammed(package, keyid)
        if entry.mode is KeyMode.CLEAR:
            return self.tme
        if entry.mode is KeyMode.NO_ENCRYPT:
            return PLAINTEXT
        assert entry.cipher is not None
        return entry.cipher

    def segments(self, keyid: int, start: int, end: int) -> list[tuple[int, int, LineCipher]]:
        cuts = {start, end}
        for s, e, _ in self.homes:
            cuts.update(x for x in (s, e) if start < x < end)
        if keyid == 0 and self.exclusion is not None:
            cuts.update(x for x in self.exclusion if start < x < end)
        points = sorted(cuts)
        out: list[tuple[int, int, LineCipher]] = []
        for s, e in zip(points, points[1:]):
            if keyid == 0 and self.exclusion is not None and self.exclusion[0] <= s < self.exclusion[1]:
                cipher = PLAINTEXT
            else:
                cipher = self.cipher(self._home(s), keyid)
            if out and out[-1][1] == s and out[-1][2] is cipher:
                out[-1] = (out[-1][0], e, cipher)
            else:
                out.append((s, e, cipher))
        return out

    def private(self, keyid: int) -> bool:
        """A private KeyID: one PCONFIG gave a key (on any package); KeyID 0 is shared."""
        return keyid != 0 and any((e := t.get(keyid)) is not None and e.mode is KeyMode.ENCRYPT for t in self.tables)

    def _home(self, hpa: int) -> int:
        for s, e, package in self.homes:
            if s <= hpa < e:
                return package
        return 0


class Platform:
    """An emulated MKTME platform, starting as after reset (MSRs unlocked, TME not active).

    >>> p = Platform()
    >>> p.bios_activate(keyid_bits=6)
    >>> p.layout
    KeyIdLayout(maxphyaddr=46, keyid_bits=6)
    >>> s = pc.KeyProgramStruct.for_algorithm(1, pc.KEYID_NO_ENCRYPT, AES_XTS_128)
    >>> p.memory.write(0x1000, s.pack())
    >>> p.pconfig(0, 0x1000)
    PconfigResult(rax=0, zf=False)
    """

    def __init__(
        self,
        maxphyaddr: int = 46,
        max_keyid_bits: int = 6,
        max_keys: int = 63,
        algorithms: Sequence[Algorithm] = (AES_XTS_128, AES_XTS_256),
        packages: int = 1,
        *,
        tme_supported: bool = True,
        bypass_supported: bool = True,
        pconfig_supported: bool | None = None,
        memory_homes: Sequence[tuple[int, int, int]] | None = None,
        rng: Rng | None = None,
        integrity: str | None = None,
        mitigation: str | None = None,
        dimm_alias: int | None = None,
    ) -> None:
        KeyIdLayout(maxphyaddr, 0)  # validates maxphyaddr
        if not 0 <= max_keyid_bits <= 15 or max_keyid_bits >= maxphyaddr - 30:
            raise ValueError(f"max_keyid_bits must be in 0..15 and leave room below bit 30, got {max_keyid_bits}")
        if not 0 <= max_keys <= min(0x7FFF, (1 << max_keyid_bits) - 1):
            raise ValueError(f"max_keys must be in 0..2^max_keyid_bits-1, got {max_keys}")
        algs = tuple(Algorithm(a) for a in algorithms)
        if tme_supported and not algs:
            raise ValueError("a TME platform supports at least one algorithm")
        if isinstance(packages, bool) or not 1 <= packages <= MAX_PACKAGES:
            raise ValueError(f"packages must be in 1..{MAX_PACKAGES}, got {packages}")
        if integrity not in (None, "mac"):
            raise ValueError(f"integrity must be None or 'mac', got {integrity!r}")
        if mitigation is None:
            mitigation = integrity or "none"
        if mitigation not in MITIGATIONS or (integrity is not None and mitigation != integrity):
            raise ValueError(f"mitigation must be one of {', '.join(MITIGATIONS)} (and agree with integrity=), "
                             f"got {mitigation!r}")
        check_alias_bit(dimm_alias, maxphyaddr)
        self.maxphyaddr = maxphyaddr
        self.max_keyid_bits = max_keyid_bits
        self.max_keys = max_keys
        self.algorithms = algs
        self.packages = packages
        self.tme_supported = tme_supported
        self.bypass_supported = bypass_supported
        self.pconfig_supported = (max_keyid_bits > 0 and tme_supported) if pconfig_supported is None else pconfig_supported
        self._homes = self._check_homes(memory_homes)
        self._rng: Rng = rng if rng is not None else secrets.token_bytes
        self._entropy_failures = 0
        self._stored_tme_key: XtsKey | None = None
        self.memory = PhysicalMemory(lambda: self.layout, self._current_segments, lambda k: self._view.private(k))
        self.mitigation = mitigation
        self.integrity = "mac" if mitigation in ("mac", "mac+owner", "freshness") else None
        if self.integrity is not None:
            self.memory.integrity = LineIntegrity(freshness=CounterTree() if mitigation == "freshness" else None)
        if mitigation == "mac+owner":
            self.memory.hiding = Hiding(0x00, "TD-owner bit")
        elif mitigation == "ciphertext-hiding":
            self.memory.hiding = Hiding(0xFF, "ciphertext hiding")
        self.memory.set_dimm(DimmMap(dimm_alias))
        self._boot()

    def __repr__(self) -> str:
        state = "active" if self._activate & 1 else "not activated"
        return f"Platform(maxphyaddr={self.maxphyaddr}, packages={self.packages}, {state}, {self.layout})"

    def _check_homes(self, homes: Sequence[tuple[int, int, int]] | None) -> tuple[tuple[int, int, int], ...]:
        if homes is None:
            return ((0, 1 << self.maxphyaddr, 0),)
        out: list[tuple[int, int, int]] = []
        for start, end, package in sorted(homes):
            if start % PAGE_SIZE or end % PAGE_SIZE or not 0 <= start < end <= 1 << self.maxphyaddr:
                raise ValueError(f"memory home {start:#x}..{end:#x} must be page-aligned and inside the physical space")
            if not 0 <= package < self.packages:
                raise ValueError(f"memory home {start:#x}..{end:#x} names package {package} of {self.packages}")
            if out and out[-1][1] > start:
                raise ValueError(f"memory homes overlap at {start:#x}")
            out.append((start, end, package))
        return tuple(out)

    def _boot(self) -> None:
        self._activate = 0
        self._exclude_mask = 0
        self._exclude_base = 0
        self._tme_key: XtsKey | None = None
        self._tables = [KeyTable() for _ in range(self.packages)]
        self._unprogrammed: dict[tuple[int, int], LineCipher] = {}
        self._view = self._make_view()

    # --- derived state --------------------------------------------------------------------------

    @property
    def layout(self) -> KeyIdLayout:
        """The KeyID layout of physical addresses now (KEYID_BITS = 0 until MKTME is activated)."""
        return KeyIdLayout(self.maxphyaddr, msr_bits.TME_ACTIVATE.get(self._activate, "mk_tme_keyid_bits"))

    @property
    def activated(self) -> bool:
        return bool(self._activate & 1)

    def _unprogrammed_cipher(self, package: int, keyid: int) -> LineCipher:
        cipher = self._unprogrammed.get((package, keyid))
        if cipher is None:
            n = 32 if AES_XTS_256 in self.algorithms else 16
            key = XtsKey(secrets.token_bytes(n), secrets.token_bytes(n))
            cipher = self._unprogrammed[(package, keyid)] = XtsLineCipher(key, f"unknown key, KeyID {keyid}")
        return cipher

    def _make_view(self) -> _CryptoView:
        act = msr_bits.TME_ACTIVATE.decode(self._activate)
        if act.lock and act.tme_enable and not act.tme_bypass_enable and self._tme_key is not None:
            tme: LineCipher = self._tme_cipher
        else:
            tme = PLAINTEXT
        exclusion = None
        if act.lock and act.tme_enable and self._exclude_mask >> 11 & 1:
            mask = self._exclude_mask & ~0xFFF & ((1 << self.maxphyaddr) - 1)
            size = mask & -mask if mask else 1 << self.maxphyaddr
            start = self._exclude_base & mask
            exclusion = (start, start + size)
        return _CryptoView(tme, exclusion, tuple(dict(t.entries) for t in self._tables), self._homes, self._unprogrammed_cipher)

    def _current_segments(self, keyid: int, start: int, end: int) -> list[tuple[int, int, LineCipher]]:
        return self._view.segments(keyid, start, end)

    def _commit(self, change: Callable[[], None]) -> None:
        """Apply a state change, keeping the DRAM content behind attached buffers unchanged."""
        old = self._view
        change()
        self._view = self._make_view()
        new = self._view
        old_segments: Segments = old.segments
        self.memory.transcode(old_segments, new.segments)

    # --- CPUID ----------------------------------------------------------------------------------

    def _features(self) -> cpuid_bits.CpuidFeatures:
        return cpuid_bits.CpuidFeatures(self.tme_supported, self.pconfig_supported, self.maxphyaddr)

    def cpuid(self, leaf: int, subleaf: int = 0) -> cpuid_bits.CpuidResult:
        """CPUID for the leaves this model defines (0, 7, 0x1B, 0x80000000, 0x80000008);
        any other leaf returns zeros."""
        f = self._features()
        if leaf == 0:
            return cpuid_bits.CpuidResult(cpuid_bits.LEAF_PCONFIG, 0x756E6547, 0x6C65746E, 0x49656E69)
        if leaf == cpuid_bits.LEAF_EXTENDED_FEATURES and subleaf == 0:
            return cpuid_bits.leaf7(f)
        if leaf == cpuid_bits.LEAF_PCONFIG:
            return cpuid_bits.leaf1b(f, subleaf)
        if leaf == cpuid_bits.LEAF_EXT_MAX:
            return cpuid_bits.CpuidResult(cpuid_bits.LEAF_ADDRESS_SIZES, 0, 0, 0)
        if leaf == cpuid_bits.LEAF_ADDRESS_SIZES:
            return cpuid_bits.leaf80000008(f)
        return cpuid_bits.CpuidResult(0, 0, 0, 0)

    # --- MSRs -----------------------------------------------------------------------------------

    def _capability(self) -> int:
        return msr_bits.TME_CAPABILITY.encode(
            aes_xts_128=int(AES_XTS_128 in self.algorithms),
            aes_xts_256=int(AES_XTS_256 in self.algorithms),
            tme_encryption_bypass_supported=int(self.bypass_supported),
            mk_tme_max_keyid_bits=self.max_keyid_bits,
            mk_tme_max_keys=self.max_keys,
        )

    def _tme_msr(self, msr: int) -> None:
        if msr not in (msr_bits.IA32_TME_CAPABILITY, msr_bits.IA32_TME_ACTIVATE,
                       msr_bits.IA32_TME_EXCLUDE_MASK, msr_bits.IA32_TME_EXCLUDE_BASE):
            raise GeneralProtection(f"MSR {msr:#x} is not implemented")
        if not self.tme_supported:
            raise GeneralProtection(f"MSR {msr:#x} does not exist: TME is not enumerated")

    def rdmsr(self, msr: int) -> int:
        """RDMSR; #GP for an MSR this model does not implement."""
        self._tme_msr(msr)
        return {
            msr_bits.IA32_TME_CAPABILITY: self._capability(),
            msr_bits.IA32_TME_ACTIVATE: self._activate,
            msr_bits.IA32_TME_EXCLUDE_MASK: self._exclude_mask,
            msr_bits.IA32_TME_EXCLUDE_BASE: self._exclude_base,
        }[msr]

    def wrmsr(self, msr: int, value: int) -> None:
        """WRMSR with the architectural #GP rules (mktme.md §2)."""
        self._tme_msr(msr)
        if not 0 <= value < 1 << 64:
            raise ValueError(f"value {value!r} is not a 64-bit unsigned integer")
        if msr == msr_bits.IA32_TME_CAPABILITY:
            raise GeneralProtection("IA32_TME_CAPABILITY is read-only")
        if self._activate & 1:
            raise GeneralProtection(f"MSR {msr:#x}: TME MSRs are locked")
        if msr == msr_bits.IA32_TME_ACTIVATE:
            self._write_activate(value)
        elif msr == msr_bits.IA32_TME_EXCLUDE_MASK:
            lay = msr_bits.tme_exclude_mask_layout(self.maxphyaddr)
            v = lay.decode(value)
            if v.reserved:
                raise GeneralProtection(f"IA32_TME_EXCLUDE_MASK: reserved bits {v.reserved:#x}")
            if not msr_bits.is_contiguous_mask(v.tmeemask, lay.field("tmeemask").width):
                raise GeneralProtection(f"IA32_TME_EXCLUDE_MASK: mask {v.tmeemask << 12:#x} is not contiguous")
            self._exclude_mask = value
        else:
            v = msr_bits.tme_exclude_base_layout(self.maxphyaddr).decode(value)
            if v.reserved:
                raise GeneralProtection(f"IA32_TME_EXCLUDE_BASE: reserved bits {v.reserved:#x}")
            self._exclude_base = value

    def _write_activate(self, value: int) -> None:
        v = msr_bits.TME_ACTIVATE.decode(value)
        if v.reserved:
            raise GeneralProtection(f"IA32_TME_ACTIVATE: reserved bits {v.reserved:#x}")
        if v.tme_policy not in [int(a) for a in self.algorithms]:
            raise GeneralProtection(f"IA32_TME_ACTIVATE: TME policy {v.tme_policy} not in IA32_TME_CAPABILITY")
        if v.mk_tme_keyid_bits > self.max_keyid_bits:
            raise GeneralProtection(f"IA32_TME_ACTIVATE: KEYID_BITS {v.mk_tme_keyid_bits} > MK_TME_MAX_KEYID_BITS {self.max_keyid_bits}")
        if v.mk_tme_keyid_bits and not v.tme_enable:
            raise GeneralProtection("IA32_TME_ACTIVATE: KEYID_BITS > 0 with TME disabled")
        if v.mk_tme_crypto_algs & ~msr_bits.algorithm_bitmap(list(self.algorithms)):
            raise GeneralProtection(f"IA32_TME_ACTIVATE: MK_TME_CRYPTO_ALGS {v.mk_tme_crypto_algs:#x} has unsupported bits")
        if v.tme_bypass_enable and not self.bypass_supported:
            raise GeneralProtection("IA32_TME_ACTIVATE: bypass is not supported")
        if v.tme_enable and v.key_select and self._stored_tme_key is None:
            raise GeneralProtection("IA32_TME_ACTIVATE: no stored TME key to restore")

        def change() -> None:
            self._activate = value | 1
            if v.tme_enable:
                if v.key_select:
                    assert self._stored_tme_key is not None
                    key = self._stored_tme_key
                else:
                    n = Algorithm(v.tme_policy).key_nbytes
                    key = XtsKey(secrets.token_bytes(n), secrets.token_bytes(n))
                self._tme_key = key
                self._tme_cipher = XtsLineCipher(key, "TME key")
                if v.save_key_for_standby:
                    self._stored_tme_key = key
            if self.memory.integrity is not None:
                self.memory.integrity.rekey(0)

        self._commit(change)

    def bios_activate(
        self,
        keyid_bits: int = 0,
        *,
        policy: Algorithm = AES_XTS_128,
        algorithms: Sequence[Algorithm] | None = None,
        bypass: bool = False,
        exclude: tuple[int, int] | None = None,
        enable: bool = True,
        save_key: bool = False,
        restore_key: bool = False,
    ) -> None:
        """Do what a BIOS does: the exclusion MSRs (``exclude=(base, nbytes)``, nbytes a power of
        two >= 4 KiB, base aligned to it), then IA32_TME_ACTIVATE. Goes through :meth:`wrmsr`, so
        every #GP rule applies. ``algorithms`` defaults to all supported when ``keyid_bits > 0``.
        Under ``mitigation="alias-check"`` the BIOS first probes the DIMMs for address aliases
        and refuses to go on (``DimmAliasError``) when it finds one."""
        if self.mitigation == "alias-check":
            found = probe_aliases(self.memory.read_dram, self.memory.write_dram, self.maxphyaddr)
            if found:
                raise DimmAliasError(f"BIOS alias check: DIMM address bit{'s' * (len(found) > 1)} "
                                     f"{', '.join(map(str, found))} alias{'es' * (len(found) == 1)} two physical "
                                     "addresses to one DRAM cell: the memory configuration is refused at boot")
        if exclude is not None:
            base, nbytes = exclude
            if nbytes < PAGE_SIZE or nbytes & (nbytes - 1) or base % nbytes:
                raise ValueError(f"exclude must be (base, nbytes) with nbytes a power of two >= 4 KiB and base aligned, got {exclude}")
            mask = ((1 << self.maxphyaddr) - 1) & ~(nbytes - 1)
            self.wrmsr(msr_bits.IA32_TME_EXCLUDE_BASE, base)
            self.wrmsr(msr_bits.IA32_TME_EXCLUDE_MASK, mask | 1 << 11)
        if algorithms is None:
            algorithms = self.algorithms if keyid_bits else ()
        value = msr_bits.TME_ACTIVATE.encode(
            tme_enable=int(enable), key_select=int(restore_key), save_key_for_standby=int(save_key),
            tme_policy=int(policy), tme_bypass_enable=int(bypass), mk_tme_keyid_bits=keyid_bits,
            mk_tme_crypto_algs=msr_bits.algorithm_bitmap(list(algorithms)),
        )
        self.wrmsr(msr_bits.IA32_TME_ACTIVATE, value)

    @property
    def dimm(self) -> DimmMap:
        """The memory controller's address decoding now (:mod:`.dimm`)."""
        return self.memory.dimm

    def set_dimm_alias(self, bit: int | None) -> None:
        """Switch the DIMM alias on (``bit``) or off (``None``) while the platform runs, as Battering
        RAM's interposer does: no check runs (the boot-time one is over)."""
        check_alias_bit(bit, self.maxphyaddr)
        self.memory.set_dimm(DimmMap(bit))

    def resume_from_standby(self) -> None:
        """S3 resume: MSRs unlocked and key tables empty again, DRAM kept, stored TME key kept."""
        self._commit(self._boot_tables_only)

    def _boot_tables_only(self) -> None:
        self._activate = self._exclude_mask = self._exclude_base = 0
        self._tme_key = None
        self._tables = [KeyTable() for _ in range(self.packages)]
        self._unprogrammed = {}

    # --- PCONFIG --------------------------------------------------------------------------------

    def pconfig(self, eax: int, rbx: int, package: int = 0, cpl: int = 0) -> PconfigResult:
        """PCONFIG on a logical processor of ``package`` at privilege ``cpl``.

        Raises ``InvalidOpcode`` (not enumerated, CPL > 0) or ``GeneralProtection`` (leaf,
        activation, alignment, reserved fields); otherwise returns RAX and ZF.
        """
        if not 0 <= package < self.packages:
            raise ValueError(f"package must be in 0..{self.packages - 1}, got {package}")
        if not self.pconfig_supported:
            raise InvalidOpcode("PCONFIG is not enumerated (CPUID.7.0:EDX[18] = 0)")
        if cpl != 0:
            raise InvalidOpcode(f"PCONFIG at CPL {cpl}")
        if eax != pc.PCONFIG_LEAF_MKTME_KEY_PROGRAM:
            raise GeneralProtection(f"PCONFIG leaf {eax:#x} is not supported")
        act = msr_bits.TME_ACTIVATE.decode(self._activate)
        if not act.lock or not act.tme_enable or act.mk_tme_keyid_bits == 0:
            raise GeneralProtection("PCONFIG: MKTME is not activated (lock, enable, KEYID_BITS)")
        if rbx % pc.STRUCT_ALIGN:
            raise GeneralProtection(f"PCONFIG: struct at {rbx:#x} is not 256-byte aligned")
        if rbx < 0 or (rbx + pc.STRUCT_READ_NBYTES) >> self.maxphyaddr:
            raise GeneralProtection(f"PCONFIG: struct at {rbx:#x} is outside physical memory")
        s = pc.KeyProgramStruct.unpack(self.memory.read(rbx, pc.STRUCT_READ_NBYTES))
        self._check_struct_reserved(s)
        status, entry = self._program_entry(s, act.mk_tme_keyid_bits, act.mk_tme_crypto_algs, package)
        if entry is not None:
            table = self._tables[package]
            self._commit(lambda: setattr(table, "entries", table.updated(s.keyid, entry)))
            if self.memory.integrity is not None:
                self.memory.integrity.rekey(s.keyid)
            notify = getattr(self.memory.observer, "key_programmed", None)
            if notify is not None:
                notify(s.keyid, package, pc.Command(s.command).name)
        return PconfigResult(int(status), status != pc.Status.PROG_SUCCESS)

    @staticmethod
    def _check_struct_reserved(s: pc.KeyProgramStruct) -> None:
        if s.ctrl_reserved:
            raise GeneralProtection("PCONFIG: reserved KEYID_CTRL bits 31:24 set")
        if any(s.reserved):
            raise GeneralProtection("PCONFIG: reserved struct bytes 6..63 not zero")
        alg = s.single_algorithm()
        key_nbytes = alg.key_nbytes if alg is not None else 32
        if any(s.key_field_1[key_nbytes:]) or any(s.key_field_2[key_nbytes:]):
            raise GeneralProtection(f"PCONFIG: key field bytes beyond {key_nbytes} not zero")

    def _program_entry(
        self, s: pc.KeyProgramStruct, keyid_bits: int, crypto_algs: int, package: int
    ) -> tuple[pc.Status, KeyEntry | None]:
        if s.command not in pc.Command._value2member_map_:
            return pc.Status.INVALID_PROG_CMD, None
        if s.keyid == 0 or s.keyid > (1 << keyid_bits) - 1 or s.keyid > self.max_keys:
            return pc.Status.INVALID_KEYID, None
        alg = s.single_algorithm()
        if alg is None or not crypto_algs >> alg & 1:
            return pc.Status.INVALID_ENC_ALG, None
        if self._tables[package].busy:
            return pc.Status.DEVICE_BUSY, None
        command = pc.Command(s.command)
        n = alg.key_nbytes
        if command is pc.KEYID_CLEAR_KEY:
            return pc.Status.PROG_SUCCESS, KeyEntry(KeyMode.CLEAR, alg)
        if command is pc.KEYID_NO_ENCRYPT:
            return pc.Status.PROG_SUCCESS, KeyEntry(KeyMode.NO_ENCRYPT, alg)
        if command is pc.KEYID_SET_KEY_DIRECT:
            key = XtsKey(s.key_field_1[:n], s.key_field_2[:n])
        else:
            data_rnd, tweak_rnd = self._random(n), self._random(n)
            if data_rnd is None or tweak_rnd is None:
                return pc.Status.ENTROPY_ERROR, None
            key = XtsKey(_xor(data_rnd, s.key_field_1[:n]), _xor(tweak_rnd, s.key_field_2[:n]))
        cipher = XtsLineCipher(key, f"KeyID {s.keyid} key")
        return pc.Status.PROG_SUCCESS, KeyEntry(KeyMode.ENCRYPT, alg, command is pc.KEYID_SET_KEY_RANDOM, cipher)

    def _random(self, nbytes: int) -> bytes | None:
        if self._entropy_failures:
            self._entropy_failures -= 1
            return None
        value = self._rng(nbytes)
        if value is None:
            return None
        if len(value) != nbytes:
            raise ValueError(f"rng returned {len(value)} bytes, asked for {nbytes}")
        return bytes(value)

    # --- test hooks and reports -----------------------------------------------------------------

    @contextmanager
    def key_table_lock(self, package: int = 0) -> Iterator[None]:
        """Hold ``package``'s key table lock, as another logical processor would: PCONFIG there
        returns DEVICE_BUSY until the block ends."""
        table = self._tables[package]
        if table.busy:
            raise ValueError(f"package {package}'s key table lock is already held")
        table.busy = True
        try:
            yield
        finally:
            table.busy = False

    @contextmanager
    def entropy_failure(self, count: int = 1_000_000) -> Iterator[None]:
        """Make the next ``count`` random-number draws fail (ENTROPY_ERROR) inside the block."""
        self._entropy_failures = count
        try:
            yield
        finally:
            self._entropy_failures = 0

    def key_entry(self, keyid: int, package: int = 0) -> KeyEntry:
        """What ``package``'s table holds for ``keyid`` (no key bytes in its repr)."""
        return self._tables[package].get(keyid)

    def inconsistencies(self) -> list[KeyIdInconsistency]:
        """KeyIDs whose programming differs between packages (empty with one package)."""
        keyids = sorted({k for t in self._tables for k in t.entries})
        report = []
        for keyid in keyids:
            entries = [t.get(keyid) for t in self._tables]
            groups: list[int] = []
            for i, e in enumerate(entries):
                groups.append(next((groups[j] for j in range(i) if entries[j].same_programming(e)), i))
            if len(set(groups)) > 1:
                report.append(KeyIdInconsistency(keyid, tuple(e.describe() for e in entries), tuple(groups)))
        return report


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))
