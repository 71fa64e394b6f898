"""The shim on a real kernel: stock Debian Linux boots under full attribution, and what its
/dev/mem workload does to the reserved region is seen store by store and load by load."""

from __future__ import annotations

import asyncio
import os

from traced_machine import traced
from qemu_mktme import images
from qemu_mktme.trace.accesses import Traffic

from helpers import patience


async def test_linux_boot_secret_and_foreign_read(linux_image):
    secret = "LINUX-SHIM-SECRET-0123"
    gpa = images.LINUX_RESERVED_GPA
    boot = linux_image.boot(workload="secret", params={"secret": secret})
    async with traced(boot, memory="1G", start_paused=True) as (vm, tracer):
        tracer.set_keyid(gpa, 4096, 1)
        stores = tracer.watch(gpa, len(secret), on="store")
        loads = tracer.watch(gpa, len(secret), on="load")
        await vm.resume()
        await vm.console.wait_for(r"mktme-linux: boot kernel=6\.", patience(120))
        await vm.console.wait_for("waiting for host", patience(60))
        await tracer.flush()
        assert stores.pending == len(secret) and loads.pending == 0
        written = [await anext(stores) for _ in range(len(secret))]
        assert sorted(a.gpa for a in written) == [gpa + i for i in range(len(secret))]
        assert {(a.kind, a.vcpu, a.keyid) for a in written} == {("store", 0, 1)}
        assert all(a.vaddr >= 1 << 63 and a.instruction is not None for a in written)   # the kernel's copy

        async with tracer.foreign_reads() as reads:
            vm.ram.write(gpa, os.urandom(len(secret)))                  # a DMA write through KeyID 5
            tracer.mark_foreign(gpa, len(secret), keyid=5)
            await vm.console.write("go\n")
            await vm.console.wait_for(r"secret-region sha256=\w{64}", patience(30))
            read = await asyncio.wait_for(anext(reads), patience(10))
        assert (read.foreign_keyid, read.line_gpa, read.access.gpa) == (5, gpa, gpa)
        assert read.access.kind == "load" and read.instruction is not None
        await tracer.flush()
        assert loads.pending == len(secret)
        assert tracer.keyid_totals()[1] == Traffic(len(secret), len(secret), len(secret), len(secret))
        assert await vm.wait(patience(60)) == 0
        stats = tracer.stats()
        totals = tracer.totals()
    # the software TLB and the inline decoding were checked all through a kernel boot
    assert stats.verify_mismatches == 0 and stats.verify_checks > 10_000
    assert stats.decode_mismatches == 0 and stats.decode_checks > 10_000 and not stats.decode_api
    assert stats.tlb_flushes > 1000 and stats.insns_tlb_flush > 10
    assert stats.tlb_hit_rate > 0.99 and stats.ring_dropped == 0
    assert stats.ram_accesses == totals.accesses > 10**8
    assert stats.io_loads > 0 and stats.io_stores > 0


async def test_linux_on_two_vcpus_counts_per_vcpu(linux_image):
    """MTTCG: each vCPU thread keeps its own TLB, counters and ring; nothing is lost or mixed."""
    boot = linux_image.boot(workload="checksum", params={"size_mb": 2})
    async with traced(boot, memory="1G", cpus=2) as (vm, tracer):
        await vm.console.wait_for(r"mktme-linux: checksum bytes=\d+ sha256=\w{64}", patience(120))
        assert await vm.wait(patience(60)) == 0
        stats = tracer.stats()
    assert len(stats.vcpu_accesses) == 2 and all(n > 10**6 for n in stats.vcpu_accesses)
    assert sum(stats.vcpu_accesses) == stats.ram_accesses
    assert stats.verify_mismatches == 0 and stats.decode_mismatches == 0 and stats.verify_checks > 1000
