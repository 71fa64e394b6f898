"""The shared region: numpy dtypes against the C structs, field by field, and the geometry."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from qemu_mktme.errors import ShimError
from qemu_mktme.trace import layout as L
from qemu_mktme.trace.shim import source_path

STRUCTS = {
    "shim_header": L.HEADER_DTYPE, "shim_vcpu": L.VCPU_DTYPE, "shim_page_attr": L.PAGE_ATTR_DTYPE,
    "shim_counters": L.COUNTERS_DTYPE, "shim_record": L.RECORD_DTYPE, "shim_range": L.RANGE_DTYPE,
}

# The plugin API functions the shim calls, as empty stubs, so the probe links without QEMU.
STUBS = """
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t i, qemu_plugin_vcpu_tb_trans_cb_t c) {}
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t i, qemu_plugin_udata_cb_t c, void *u) {}
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *t) { return 0; }
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *t, size_t i) { return 0; }
uint64_t qemu_plugin_insn_vaddr(const struct qemu_plugin_insn *i) { return 0; }
size_t qemu_plugin_insn_size(const struct qemu_plugin_insn *i) { return 0; }
const void *qemu_plugin_insn_data(const struct qemu_plugin_insn *i) { return 0; }
void qemu_plugin_register_vcpu_insn_exec_cb(struct qemu_plugin_insn *i, qemu_plugin_vcpu_udata_cb_t c,
                                            enum qemu_plugin_cb_flags f, void *u) {}
void qemu_plugin_register_vcpu_mem_cb(struct qemu_plugin_insn *i, qemu_plugin_vcpu_mem_cb_t c,
                                      enum qemu_plugin_cb_flags f, enum qemu_plugin_mem_rw r, void *u) {}
unsigned int qemu_plugin_mem_size_shift(qemu_plugin_meminfo_t m) { return 0; }
bool qemu_plugin_mem_is_store(qemu_plugin_meminfo_t m) { return 0; }
struct qemu_plugin_hwaddr *qemu_plugin_get_hwaddr(qemu_plugin_meminfo_t m, uint64_t v) { return 0; }
bool qemu_plugin_hwaddr_is_io(const struct qemu_plugin_hwaddr *h) { return 0; }
uint64_t qemu_plugin_hwaddr_phys_addr(const struct qemu_plugin_hwaddr *h) { return 0; }
"""


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory) -> dict[str, int]:
    """sizeof and offsetof of every struct and field, from the shim source compiled by gcc."""
    lines = []
    for struct, dtype in STRUCTS.items():
        lines.append(f'printf("{struct} %zu\\n", sizeof(struct {struct}));')
        for field in dtype.names:
            if not field.startswith("_"):
                lines.append(f'printf("{struct}.{field} %zu\\n", offsetof(struct {struct}, {field}));')
    tmp = tmp_path_factory.mktemp("layout")
    probe = tmp / "probe.c"
    probe.write_text(f'#define MKTME_PLUGIN_ABI 1\n#include "{source_path()}"\n{STUBS}\n'
                     f'int main(void) {{ {" ".join(lines)} return 0; }}\n')
    exe = tmp / "probe"
    subprocess.run(["gcc", "-std=gnu11", "-w", "-o", str(exe), str(probe), "-pthread"], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("struct", list(STRUCTS))
def test_dtype_matches_the_c_struct(c_layout, struct):
    dtype = STRUCTS[struct]
    assert dtype.itemsize == c_layout[struct]
    for field in dtype.names:
        if not field.startswith("_"):
            assert dtype.fields[field][1] == c_layout[f"{struct}.{field}"], field


def test_geometry_sections_are_page_aligned_and_in_order():
    g = L.Geometry(npages=(5 << 30) >> 12, nvcpus=2, ring_entries=1 << 12)
    offsets = [g.vcpu_offset, g.attr_offset, g.page_ctr_offset, g.ring_offset, g.region_size]
    assert offsets == sorted(offsets) and all(o % 4096 == 0 for o in offsets)
    assert g.attr_offset - g.vcpu_offset == 2 * g.vcpu_block
    assert g.vcpu_block >= L.VCPU_DTYPE.itemsize + L.STLB_ENTRIES * L.STLB_ENTRY_BYTES
    assert g.region_size - g.ring_offset >= 2 * (1 << 12) * 64


@pytest.mark.parametrize("bad", [dict(npages=0), dict(nvcpus=0), dict(ring_entries=1000), dict(ring_entries=1)])
def test_geometry_rejects_nonsense(bad):
    with pytest.raises(ValueError):
        L.Geometry(**{"npages": 256, "nvcpus": 1, "ring_entries": 1024, **bad})


def test_region_is_a_private_memfd_with_its_header_filled():
    region = L.SharedRegion(L.Geometry(npages=1024, nvcpus=2, ring_entries=256))
    try:
        import os
        import stat
        st = os.fstat(region.fd)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == region.size
        with open(region.child_path, "rb") as f:                   # what the shim will open
            assert f.read(8) == b"MKTMESHM"
        h = region.header
        assert int(h["layout_version"]) == L.LAYOUT_VERSION and int(h["nvcpus"]) == 2
        assert int(h["ring_offset"]) == region.geometry.ring_offset
        region.vcpu["attr_gen"] = 7                                  # strided view: both vCPUs
        assert list(region.vcpu["attr_gen"]) == [7, 7]
        assert np.shares_memory(region.heads, region.vcpu)
        with pytest.raises(ShimError, match="did not attach"):
            region.check_attached(expected_abi=1)
    finally:
        region.close()
        region.close()


def test_ledger_keeps_traffic_with_the_keyid_a_page_had():
    from qemu_mktme.trace.accesses import Traffic
    from qemu_mktme.trace.ledger import KeyIdLedger

    region = L.SharedRegion(L.Geometry(npages=4, nvcpus=2, ring_entries=2))
    try:
        ledger = KeyIdLedger(region, lambda offsets: np.asarray(offsets, np.int64))
        region.page_counts[0, 1] = (3, 1, 12, 8)                    # vCPU 0, page 1, under KeyID 0
        ledger.assign(slice(1, 3), 5)
        region.page_counts[1, 1] = (2, 0, 8, 0)                      # vCPU 1, page 1, now KeyID 5
        snap = ledger.snapshot()
        assert snap.keyid_totals == {0: Traffic(3, 1, 12, 8), 5: Traffic(2, 0, 8, 0)}
        assert ledger.keyid(1) == ledger.keyid(2) == 5 and ledger.keyid(3) == 0
        assert [p.offset for p in snap.hottest_pages(1)] == [4096] and snap.totals == Traffic(5, 1, 20, 8)
    finally:
        del ledger
        region.close()


def test_counts_include_what_the_software_tlb_holds():
    """The hit path counts in TLB entries; a vCPU that folds on request leaves its page counters
    complete, one that does not (not running) has its entries' counts added, exactly once."""
    region = L.SharedRegion(L.Geometry(npages=4, nvcpus=2, ring_entries=2))
    try:
        region.page_counts[1, 2] = (5, 1, 40, 8)
        region.tlb[1, 7] = (0, 0, 2, (2, 3, 16, 24), (0, 0))              # vCPU 1: 2 loads, 3 stores held for page 2
        region.tlb[1, 9] = (0, 0, 2, (1, 0, 8, 0), (0, 0))                # an alias of page 2 (another vaddr)
        counts = region.counts()                                          # not attached: no waiting
        assert list(counts[1, 2]) == [8, 4, 64, 32] and not counts[0].any()
        assert list(region.page_counts[1, 2]) == [5, 1, 40, 8]            # read, not moved
        region.header["shim_state"] = L.STATE_ATTACHED
        region.vcpu["folded_gen"] = region._attr_gen + 1                 # both vCPUs answer the next request
        assert region.counts() is region.page_counts                      # folded: the counters alone
    finally:
        region.close()
