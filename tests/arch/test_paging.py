"""Entry encode/decode round trips for any MAXPHYADDR/KEYID_BITS, and walks over tables built in
an encrypted platform memory (so a table read through the wrong KeyID would show up)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qemu_mktme.arch import ept, paging, vtd
from qemu_mktme.arch import pconfig as pc
from qemu_mktme.arch.addresses import KeyIdLayout
from qemu_mktme.arch.entry import entry_address, entry_keyid, make_entry
from qemu_mktme.arch.msr import Algorithm
from qemu_mktme.arch.walk import FaultKind, Translation, WalkFault
from qemu_mktme.engine.platform import Platform

LAYOUT_FUNCS = [
    (paging.cr3_layout, 12), (paging.pml5e_layout, 12), (paging.pml4e_layout, 12),
    (paging.pdpte_layout, 12), (paging.pdpte_1g_layout, 30), (paging.pde_layout, 12),
    (paging.pde_2m_layout, 21), (paging.pte_layout, 12), (ept.eptp_layout, 12),
    (ept.ept_pml5e_layout, 12), (ept.ept_pml4e_layout, 12), (ept.ept_pdpte_layout, 12),
    (ept.ept_pdpte_1g_layout, 30), (ept.ept_pde_layout, 12), (ept.ept_pde_2m_layout, 21),
    (ept.ept_pte_layout, 12), (vtd.sl_pml5e_layout, 12), (vtd.sl_pml4e_layout, 12),
    (vtd.sl_pdpe_layout, 12), (vtd.sl_pdpe_1g_layout, 30), (vtd.sl_pde_layout, 12),
    (vtd.sl_pde_2m_layout, 21), (vtd.sl_pte_layout, 12),
]


@st.composite
def layouts(draw: st.DrawFn) -> KeyIdLayout:
    m = draw(st.integers(36, 52))
    return KeyIdLayout(m, draw(st.integers(0, min(15, m - 31))))


@pytest.mark.parametrize("func,low", LAYOUT_FUNCS, ids=lambda x: getattr(x, "__name__", str(x)))
@given(layout=layouts(), data=st.data())
def test_entry_round_trip(func, low, layout: KeyIdLayout, data: st.DataObject) -> None:
    lay = func(layout)
    frame = data.draw(st.integers(0, (1 << (layout.keyid_shift - low)) - 1))
    keyid = data.draw(st.integers(0, layout.max_keyid))
    raw = make_entry(lay, frame << low, keyid)
    assert entry_address(lay, raw) == frame << low
    assert entry_keyid(lay, raw) == keyid
    assert raw >> layout.keyid_shift & layout.max_keyid == keyid  # mktme.md §5 formula
    assert lay.reserved_bits(raw) == 0
    assert lay.decode(raw).raw == raw
    # bit M (when below 52, or below 64 for CR3/EPTP) is reserved
    if layout.maxphyaddr < 52:
        assert lay.reserved_bits(1 << layout.maxphyaddr)


def test_make_entry_rejects_bad_input() -> None:
    lay = paging.pte_layout(KeyIdLayout(46, 6))
    with pytest.raises(ValueError, match="aligned"):
        make_entry(lay, 0x1001)
    with pytest.raises(ValueError, match="fit"):
        make_entry(lay, 1 << 40)
    with pytest.raises(ValueError, match="does not fit"):
        make_entry(lay, 0x1000, keyid=64)
    with pytest.raises(ValueError, match="no KeyID"):
        make_entry(paging.pte_layout(KeyIdLayout(46, 0)), 0x1000, keyid=1)


class Tables:
    """Builds paging structures in platform memory, each table page under its own KeyID."""

    def __init__(self, platform: Platform, keyid: int) -> None:
        self.p = platform
        self.keyid = keyid
        self.next = 0x100000

    def page(self) -> int:
        hpa = self.next
        self.next += 0x1000
        self.p.memory.write(self.p.layout.compose(hpa, self.keyid), bytes(4096))
        return hpa

    def put(self, table: int, index: int, raw: int) -> None:
        self.p.memory.write_qword(self.p.layout.compose(table + 8 * index, self.keyid), raw)


@pytest.fixture
def platform() -> Platform:
    p = Platform(maxphyaddr=46, max_keyid_bits=6, max_keys=63)
    p.bios_activate(keyid_bits=6)
    s = pc.KeyProgramStruct.for_algorithm(7, pc.KEYID_SET_KEY_DIRECT, Algorithm.AES_XTS_128, bytes(range(16)), bytes(range(16, 32)))
    p.memory.write(0x2000, s.pack())
    assert p.pconfig(0, 0x2000).rax == 0
    return p


@pytest.mark.parametrize("levels", [4, 5])
def test_ia32e_walk_4k_2m_1g(platform: Platform, levels: int) -> None:
    lay = platform.layout
    t = Tables(platform, keyid=7)
    root = t.page()
    cr3 = make_entry(paging.cr3_layout(lay), root, 7)
    linear = 0x0000_7F12_3456_7ABC if levels == 4 else 0x00AB_7F12_3456_7ABC
    idx = [(linear >> s) & 0x1FF for s in (48, 39, 30, 21, 12)][5 - levels:]
    table = root
    if levels == 5:
        nxt = t.page()
        t.put(table, idx.pop(0), make_entry(paging.pml5e_layout(lay), nxt, 7, p=1, rw=1))
        table = nxt
    pdpt, pd, pt = t.page(), t.page(), t.page()
    t.put(table, idx[0], make_entry(paging.pml4e_layout(lay), pdpt, 7, p=1))
    t.put(pdpt, idx[1], make_entry(paging.pdpte_layout(lay), pd, 7, p=1))
    t.put(pd, idx[2], make_entry(paging.pde_layout(lay), pt, 7, p=1))
    t.put(pt, idx[3], make_entry(paging.pte_layout(lay), 0xABC000, 5, p=1, xd=1))
    r = paging.walk_ia32e(platform.memory.read_qword, cr3, linear, lay, levels=levels)
    assert isinstance(r, Translation), r
    assert (r.hpa, r.keyid, r.page_size) == (0xABC000 | 0xABC, 5, 4096)
    assert r.phys_addr == lay.compose(0xABCABC, 5)
    assert [e.level for e in r.entries][-4:] == ["PML4E", "PDPTE", "PDE", "PTE"]
    # the same tables read through KeyID 0 are garbage: the walk must not find the page
    r0 = paging.walk_ia32e(platform.memory.read_qword, make_entry(paging.cr3_layout(lay), root, 0), linear, lay, levels=levels)
    assert not (isinstance(r0, Translation) and r0.hpa == 0xABCABC)
    # 2 MiB leaf
    t.put(pd, idx[2], make_entry(paging.pde_2m_layout(lay), 0x4000_0000, 3, p=1, ps=1))
    r = paging.walk_ia32e(platform.memory.read_qword, cr3, linear, lay, levels=levels)
    assert (r.hpa, r.keyid, r.page_size) == (0x4000_0000 | (linear & 0x1FFFFF), 3, 2 << 20)
    # 1 GiB leaf
    t.put(pdpt, idx[1], make_entry(paging.pdpte_1g_layout(lay), 0x80_0000_0000, 2, p=1, ps=1))
    r = paging.walk_ia32e(platform.memory.read_qword, cr3, linear, lay, levels=levels)
    assert (r.hpa, r.keyid, r.page_size) == (0x80_0000_0000 | (linear & 0x3FFFFFFF), 2, 1 << 30)
    # not present, reserved bit (bit M), non-canonical, reserved XD without NXE
    t.put(pdpt, idx[1], 0)
    f = paging.walk_ia32e(platform.memory.read_qword, cr3, linear, lay, levels=levels)
    assert isinstance(f, WalkFault) and (f.kind, f.level) == (FaultKind.NOT_PRESENT, "PDPTE")
    t.put(pdpt, idx[1], make_entry(paging.pdpte_layout(lay), pd, 7, p=1) | 1 << 46)
    f = paging.walk_ia32e(platform.memory.read_qword, cr3, linear, lay, levels=levels)
    assert f.kind is FaultKind.RESERVED_BIT and f.level == "PDPTE"
    t.put(pdpt, idx[1], make_entry(paging.pdpte_layout(lay), pd, 7, p=1))
    t.put(pd, idx[2], make_entry(paging.pde_layout(lay), pt, 7, p=1))
    f = paging.walk_ia32e(platform.memory.read_qword, cr3, linear, lay, levels=levels, nxe=False)
    assert f.kind is FaultKind.RESERVED_BIT and f.level == "PTE"
    bad = 1 << (47 if levels == 4 else 56)
    assert paging.walk_ia32e(platform.memory.read_qword, cr3, bad, lay, levels=levels).kind is FaultKind.BAD_ADDRESS
    assert paging.walk_ia32e(platform.memory.read_qword, cr3 | 1 << 63, 0, lay).kind is FaultKind.RESERVED_BIT


def test_pml4e_ps_is_reserved(platform: Platform) -> None:
    lay = platform.layout
    t = Tables(platform, keyid=0)
    root = t.page()
    t.put(root, 0, make_entry(paging.pml4e_layout(lay), t.page(), 0, p=1) | 1 << 7)
    f = paging.walk_ia32e(platform.memory.read_qword, root, 0x1000, lay)
    assert f.kind is FaultKind.RESERVED_BIT and f.level == "PML4E"


@pytest.mark.parametrize("levels", [4, 5])
def test_ept_walk(platform: Platform, levels: int) -> None:
    lay = platform.layout
    t = Tables(platform, keyid=7)
    root = t.page()
    eptp = ept.make_eptp(lay, root, 7, levels=levels)
    assert ept.eptp_layout(lay).decode(eptp).page_walk_length == levels - 1
    gpa = 0x1234_5678_9000 | 0x123
    table = root
    if levels == 5:
        nxt = t.page()
        t.put(table, (gpa >> 48) & 0x1FF, make_entry(ept.ept_pml5e_layout(lay), nxt, 7, r=1, w=1, x=1))
        table = nxt
    pdpt, pd, pt = t.page(), t.page(), t.page()
    t.put(table, (gpa >> 39) & 0x1FF, make_entry(ept.ept_pml4e_layout(lay), pdpt, 7, r=1, w=1, x=1))
    t.put(pdpt, (gpa >> 30) & 0x1FF, make_entry(ept.ept_pdpte_layout(lay), pd, 7, r=1, w=1, x=1))
    t.put(pd, (gpa >> 21) & 0x1FF, make_entry(ept.ept_pde_layout(lay), pt, 7, r=1, w=1, x=1))
    pte_i = (gpa >> 12) & 0x1FF
    t.put(pt, pte_i, make_entry(ept.ept_pte_layout(lay), 0x77000, 9, r=1, w=1, memory_type=6))
    r = ept.walk_ept(platform.memory.read_qword, eptp, gpa, lay)
    assert isinstance(r, Translation) and (r.hpa, r.keyid, r.page_size) == (0x77123, 9, 4096)
    t.put(pt, pte_i, make_entry(ept.ept_pte_layout(lay), 0x77000, 9, w=1, memory_type=6))
    assert ept.walk_ept(platform.memory.read_qword, eptp, gpa, lay).kind is FaultKind.MISCONFIGURED
    t.put(pt, pte_i, make_entry(ept.ept_pte_layout(lay), 0x77000, 9, r=1, memory_type=2))
    assert ept.walk_ept(platform.memory.read_qword, eptp, gpa, lay).kind is FaultKind.MISCONFIGURED
    t.put(pt, pte_i, make_entry(ept.ept_pte_layout(lay), 0x77000, 9, r=1, memory_type=6) | 1 << 50)
    assert ept.walk_ept(platform.memory.read_qword, eptp, gpa, lay).kind is FaultKind.MISCONFIGURED
    t.put(pt, pte_i, 0)
    f = ept.walk_ept(platform.memory.read_qword, eptp, gpa, lay)
    assert f.kind is FaultKind.NOT_PRESENT and f.level == "EPT_PTE"
    t.put(pd, (gpa >> 21) & 0x1FF, make_entry(ept.ept_pde_2m_layout(lay), 0x20_0000, 4, r=1, x=1, ps=1, memory_type=6))
    r = ept.walk_ept(platform.memory.read_qword, eptp, gpa, lay)
    assert (r.hpa, r.keyid, r.page_size) == (0x20_0000 | (gpa & 0x1FFFFF), 4, 2 << 20)
    t.put(pdpt, (gpa >> 30) & 0x1FF, make_entry(ept.ept_pdpte_1g_layout(lay), 0x4000_0000, 1, r=1, ps=1, memory_type=0))
    r = ept.walk_ept(platform.memory.read_qword, eptp, gpa, lay)
    assert (r.hpa, r.keyid, r.page_size) == (0x4000_0000 | (gpa & 0x3FFFFFFF), 1, 1 << 30)
    assert ept.walk_ept(platform.memory.read_qword, eptp | 7, gpa, lay).kind is FaultKind.MISCONFIGURED
    assert ept.walk_ept(platform.memory.read_qword, eptp, 1 << (12 + 9 * levels), lay).kind is FaultKind.BAD_ADDRESS


@pytest.mark.parametrize("levels", [3, 4, 5])
def test_vtd_second_level_walk(platform: Platform, levels: int) -> None:
    lay = platform.layout
    t = Tables(platform, keyid=7)
    root = t.page()
    iova = 0x3_4567_8000 & ((1 << (12 + 9 * levels)) - 1) | 0x10
    table = root
    upper = {5: [(48, vtd.sl_pml5e_layout), (39, vtd.sl_pml4e_layout)], 4: [(39, vtd.sl_pml4e_layout)], 3: []}[levels]
    for shift, func in upper + [(30, vtd.sl_pdpe_layout), (21, vtd.sl_pde_layout)]:
        nxt = t.page()
        t.put(table, (iova >> shift) & 0x1FF, make_entry(func(lay), nxt, 7, r=1, w=1))
        table = nxt
    t.put(table, (iova >> 12) & 0x1FF, make_entry(vtd.sl_pte_layout(lay), 0x55000, 11, r=1, w=1))
    slptptr = lay.compose(root, 7)
    r = vtd.walk_vtd_second_level(platform.memory.read_qword, slptptr, iova, lay, levels=levels)
    assert isinstance(r, Translation) and (r.hpa, r.keyid) == (0x55010, 11)
    t.put(table, (iova >> 12) & 0x1FF, make_entry(vtd.sl_pte_layout(lay), 0x55000, 11, r=1) | 1 << 48)
    assert vtd.walk_vtd_second_level(platform.memory.read_qword, slptptr, iova, lay, levels=levels).kind is FaultKind.RESERVED_BIT
    t.put(table, (iova >> 12) & 0x1FF, make_entry(vtd.sl_pte_layout(lay), 0x55000, 11, x=1))
    assert vtd.walk_vtd_second_level(platform.memory.read_qword, slptptr, iova, lay, levels=levels).kind is FaultKind.NOT_PRESENT
