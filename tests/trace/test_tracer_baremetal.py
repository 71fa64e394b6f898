"""The tracer against what the bare-metal guest is known to do, access by access."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from traced_machine import traced
from qemu_mktme.errors import AccessTimeout, QemuExited, ShimError
from qemu_mktme.trace.accesses import Traffic
from qemu_mktme.qemu.machine import Machine, MachineConfig
from qemu_mktme.qemu.binary import find_qemu
from qemu_mktme.trace.shim import abi_for, build_shim
from qemu_mktme.trace.tracer import Tracer, format_summary, run_trace_summary

from helpers import eventually, patience

PAGE = 0x400_0000                  # untouched by the guest until a command names it
OPERAND = {1: "byte ptr", 2: "word ptr", 4: "dword ptr", 8: "qword ptr"}


async def drain(stream, n: int, timeout: float = 10.0) -> list:
    """Exactly the next ``n`` items (fails on fewer within patience(timeout))."""
    out = []
    async def take() -> None:
        async for item in stream:
            out.append(item)
            if len(out) == n:
                return
    await asyncio.wait_for(take(), patience(timeout))
    return out


async def nothing_more(stream, quiet: float = 0.3) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(anext(stream), quiet)


async def test_fill_counts_and_watch_stream_exact(baremetal_image):
    """fill P 4096 B W: exactly 4096/W stores of W bytes on P, each reported with its mov."""
    async with traced(baremetal_image.boot()) as (vm, tracer):
        await vm.console.wait_for("mktme> ", patience(10))
        for i, width in enumerate((8, 4, 2, 1)):
            page = PAGE + i * 0x1000
            n = 4096 // width
            async with tracer.watch(page, 4096, on="store") as stores:
                await vm.console.command(f"fill {page:#x} 4096 0xaa {width}", r"ok fill .*\n")
                got = await drain(stores, n)
                await nothing_more(stores)
            assert [a.gpa for a in got] == [page + width * k for k in range(n)]
            assert {(a.kind, a.size, a.vcpu) for a in got} == {("store", width, 0)}
            assert [a.seq for a in got] == list(range(got[0].seq, got[0].seq + n))
            insn = got[0].instruction
            assert insn is not None and insn.mnemonic == "mov" and insn.op_str.startswith(OPERAND[width])
            assert len({a.pc for a in got}) == 1                    # one store instruction in the loop
            [counters] = tracer.page_counters(page)
            assert counters.traffic == Traffic(loads=0, stores=n, load_bytes=0, store_bytes=4096)
        assert vm.ram.read(PAGE, 8) == b"\xaa" * 8


async def test_crc_makes_exactly_one_byte_loads(baremetal_image):
    async with traced(baremetal_image.boot()) as (vm, tracer):
        await vm.console.wait_for("mktme> ", patience(10))
        vm.ram.write(PAGE, bytes(range(256)) * 16)
        async with tracer.watch(PAGE, 4096, on="load") as loads:
            await vm.console.command(f"crc {PAGE:#x} 4096", r"ok crc32 .*\n")
            got = await drain(loads, 4096)
            await nothing_more(loads)
        assert [a.gpa for a in got] == [PAGE + k for k in range(4096)]
        assert {(a.kind, a.size) for a in got} == {("load", 1)}
        assert got[0].instruction.mnemonic == "movzx" and "byte ptr" in got[0].instruction.op_str
        assert tracer.page_counters(PAGE)[0].traffic == Traffic(loads=4096, stores=0, load_bytes=4096)


async def test_secret_write_is_reported_with_gpa_and_instruction(baremetal_image):
    secret = "TOP SECRET"
    async with traced(baremetal_image.boot(), start_paused=True) as (vm, tracer):
        waiter = tracer.wait_for_access(0x200000, len(secret), on="store", timeout=patience(10))
        async with tracer.watch(0x200000, 4096, on="store") as stores:
            await vm.resume()
            await vm.console.wait_for("mktme> ", patience(10))
            await vm.console.command(f"write 0x200000 {secret}", r"ok write .*\n")
            got = await drain(stores, len(secret))
        first = await waiter
        assert first == got[0]
        assert [(a.gpa, a.size, a.kind) for a in got] == [(0x200000 + i, 1, "store") for i in range(len(secret))]
        assert str(got[0].instruction).startswith("mov byte ptr")
        assert "0x200000" in str(got[0]) and "mov byte ptr" in str(got[0])


async def test_wait_for_access_times_out_cleanly(baremetal_image):
    async with traced(baremetal_image.boot()) as (vm, tracer):
        await vm.console.wait_for("mktme> ", patience(10))
        with pytest.raises(AccessTimeout, match=r"no guest load to 0x4000000\+16 within 0.2 s"):
            await tracer.wait_for_access(PAGE, 16, on="load", timeout=0.2)
        assert not tracer._watches and not tracer._refs.any()          # unregistered
        assert not tracer._region.attrs["watch"].any()


async def test_keyid_totals_follow_set_keyid(baremetal_image):
    async with traced(baremetal_image.boot()) as (vm, tracer):
        await vm.console.wait_for("mktme> ", patience(10))
        tracer.set_keyid(PAGE, 0x2000, 3)
        assert tracer.keyid_of(PAGE + 0x1fff) == 3 and tracer.keyid_of(PAGE + 0x2000) == 0
        await vm.console.command(f"fill {PAGE:#x} 8192 1 8", r"ok fill .*\n")
        assert tracer.keyid_totals()[3] == Traffic(stores=1024, store_bytes=8192)
        tracer.set_keyid(PAGE + 0x1000, 0x1000, 4)                    # re-key one page: history stays
        await vm.console.command(f"crc {PAGE:#x} 8192", r"ok crc32 .*\n")
        totals = tracer.keyid_totals()
        assert totals[3] == Traffic(loads=4096, stores=1024, load_bytes=4096, store_bytes=8192)
        assert totals[4] == Traffic(loads=4096, load_bytes=4096)
        grand = sum(totals.values(), Traffic())
        assert grand == tracer.totals()
        with pytest.raises(ValueError, match="4 KiB pages"):
            tracer.set_keyid(PAGE + 1, 4096, 1)
        with pytest.raises(ValueError, match="keyid"):
            tracer.set_keyid(PAGE, 4096, 1 << 15)


async def test_foreign_keyid_read_detected_with_instruction(baremetal_image):
    line = PAGE + 0x40
    async with traced(baremetal_image.boot()) as (vm, tracer):
        await vm.console.wait_for("mktme> ", patience(10))
        async with tracer.foreign_reads() as reads:
            vm.ram.write(line, bytes(64))                              # the "DMA" write ...
            tracer.mark_foreign(line, 64, keyid=9)                     # ... went through KeyID 9
            await vm.console.command(f"fill {line:#x} 8 0x11 8", r"ok fill .*\n")  # repairs 8 bytes
            await vm.console.command(f"crc {line:#x} 8", r"ok crc32 .*\n")          # reads only those
            await tracer.flush()
            await nothing_more(reads)
            assert tracer.foreign_garbage(line, 64).tolist() == [False] * 8 + [True] * 56
            await vm.console.command(f"crc {PAGE:#x} 256", r"ok crc32 .*\n")         # reads garbage
            [read] = await drain(reads, 1)
            await nothing_more(reads)                                  # once per line
        assert (read.foreign_keyid, read.line_gpa, read.garbage_bytes) == (9, line, 1)
        assert read.access.gpa == line + 8 and read.access.kind == "load"
        assert read.instruction.mnemonic == "movzx"
        assert "KeyID 9" in str(read)
        await vm.console.command(f"fill {line:#x} 64 0 8", r"ok fill .*\n")       # whole line rewritten
        await tracer.flush()
        assert not tracer.foreign_garbage(line, 64).any()
        assert not tracer._region.attrs["watch"].any()                 # nothing left to watch
        assert tracer.foreign_read_count == 1


async def test_dead_consumer_never_stalls_the_guest_and_overflow_is_counted(baremetal_image):
    async with traced(baremetal_image.boot(), ring_entries=1024, queue_limit=1 << 16) as (vm, tracer):
        await vm.console.wait_for("mktme> ", patience(10))
        async with tracer.watch(PAGE, 4096, on="store") as stores:
            async with tracer.consumer_paused():
                for _ in range(8):                                    # 8 x 4096 stores, 1024 slots
                    await vm.console.command(f"fill {PAGE:#x} 4096 7 1", r"ok fill .*\n", patience(10))
                await vm.console.command("echo alive", "ok echo alive", patience(10))
                stats = tracer.stats()
                assert stats.ring_dropped == 8 * 4096 - 1024 and stats.records <= 1024
            got = await drain(stores, 1024)
            await nothing_more(stores)
            assert [a.seq for a in got] == list(range(got[0].seq, got[0].seq + 1024))
            await vm.console.command(f"fill {PAGE:#x} 1 1 1", r"ok fill .*\n")
            [after] = await drain(stores, 1)
            assert after.seq == got[0].seq + 8 * 4096                 # the gap shows the loss
        assert tracer.overflow == 8 * 4096 - 1024
        # the counters never lose anything
        assert tracer.page_counters(PAGE)[0].traffic.stores == 8 * 4096 + 1


async def test_watch_queue_limit_counts_what_it_drops(baremetal_image):
    async with traced(baremetal_image.boot(), queue_limit=100) as (vm, tracer):
        await vm.console.wait_for("mktme> ", patience(10))
        stores = tracer.watch(PAGE, 4096, on="store")
        await vm.console.command(f"fill {PAGE:#x} 4096 7 8", r"ok fill .*\n")
        await eventually(lambda: stores.pending + stores.dropped == 512)
        assert (stores.pending, stores.dropped) == (100, 412)        # the first 100 kept
        assert tracer.stats().watch_dropped == 412 and tracer.stats().ring_dropped == 0
        batch = await anext(stores.batches())
        assert batch["gpa"][0] == PAGE and len(batch) <= 100
        stores.close()
        assert tracer.stats().watch_dropped == 412


@pytest.mark.parametrize("options", [dict(tlb=False), dict(decode="api"), dict(verify=1)])
async def test_slow_paths_count_exactly_what_the_fast_path_counts(baremetal_image, options):
    """The TLB, the inline decoding and verification change how, never what, is counted."""
    commands = [f"fill {PAGE:#x} 12288 3 4", f"crc {PAGE + 100:#x} 5000", f"fill {PAGE + 0x2000:#x} 64 1 8"]
    results = []
    for opts in ({}, options):
        async with traced(baremetal_image.boot(), **opts) as (vm, tracer):
            await vm.console.wait_for("mktme> ", patience(10))
            for c in commands:
                await vm.console.command(c, r"ok \w+ .*\n")
            results.append([p.traffic for p in tracer.page_counters(PAGE, 0x3000)])
            stats = tracer.stats()
            assert stats.verify_mismatches == 0 and stats.decode_mismatches == 0
            assert stats.decode_api == (opts.get("decode") == "api")
            if opts.get("verify") == 1:
                assert stats.verify_checks > 1000
    assert results[0] == results[1]
    assert results[0][0] == Traffic(loads=3996, stores=1024, load_bytes=3996, store_bytes=4096)


async def test_ram_above_4g_is_attributed_by_backend_offset(baremetal_image):
    """On QEMU 7.2, phys_addr gives the RAMBlock offset (not the GPA) above 4 GiB; both agree."""
    high = 0x1_2345_6000
    async with traced(baremetal_image.boot(), memory="5G") as (vm, tracer):
        await vm.console.wait_for("mktme> ", patience(10))
        before = tracer.snapshot()
        async with tracer.watch(high, 4096, on="store") as stores:
            await vm.console.command(f"fill {high:#x} 4096 0x5a 8", r"ok fill .*\n")
            got = await drain(stores, 512)
        interval = tracer.snapshot() - before
        assert got[0].gpa == high and got[0].offset == vm.ram.offset_of(high) == high - (4 << 30) + (2 << 30)
        [page] = tracer.page_counters(high)
        assert page.offset == vm.ram.offset_of(high) and page.traffic.stores == 512
        hot = {p.gpa: p for p in interval.hottest_pages(5, by="bytes")}
        assert hot[high].traffic == Traffic(stores=512, store_bytes=4096)
        assert interval.seconds > 0 and interval.totals.stores >= 512


async def test_trace_summary_prints_keyids_and_stops_with_qemu(baremetal_image):
    lines: list[str] = []
    boot = baremetal_image.boot(commands=[f"fill {PAGE:#x} 65536 1 8", "ticks 3 300000", "poweroff"])
    async with traced(boot, start_paused=True) as (vm, tracer):
        tracer.set_keyid(PAGE, 65536, 6)
        await vm.resume()
        await asyncio.wait_for(run_trace_summary(vm, tracer, 0.2, lines.append), patience(30))
        text = "\n".join(lines)
        assert "trace total" in text and "KeyID" in text and "hottest pages" in text
        assert any(line.split()[:3] == ["6", "0", "8,192"] for line in lines), text
        stats = tracer.stats()
        assert stats.verify_mismatches == 0 and stats.tlb_hit_rate > 0.5
        snap = tracer.snapshot()
        assert format_summary(snap - snap, stats)[0].startswith("trace 0.0s: 0 accesses (0/s), 0 B")
    assert tracer.stats() == stats                                  # the last ones, after close


async def test_bad_plugin_options_stop_qemu_with_the_shims_message(baremetal_image):
    for extra, message in ((",bogus=1", "mktme-shim: unknown option 'bogus=1'"),
                           (",verify=-3", "mktme-shim: verify=-3: expected a number"),
                           (",layout=2", "this shim speaks layout version 1"),
                           (",tlb=maybe", "tlb=maybe: expected one of off, on")):
        tracer = Tracer()
        config = tracer.configure(MachineConfig(boot=baremetal_image.boot()))
        config = dataclasses.replace(config, plugins=(config.plugins[-1] + extra,))
        with pytest.raises(QemuExited) as info:
            await Machine(config).launch()
        assert message in info.value.stderr_tail and info.value.returncode == 1
        await tracer.close()


async def test_missing_small_or_foreign_region_is_a_clear_error(baremetal_image, tmp_path):
    tracer = Tracer()
    config = tracer.configure(MachineConfig(boot=baremetal_image.boot()))
    arg = config.plugins[-1]
    region = tracer._region
    small = tmp_path / "small.region"
    small.write_bytes(b"\0" * 4096)
    junk = tmp_path / "junk.region"
    junk.write_bytes(b"\0" * region.size)
    for replacement, message in ((str(tmp_path / "gone"), "cannot open region"),
                                 (str(small), f"holds 4096 bytes, size= says {region.size}"),
                                 (str(junk), "bad magic")):
        bad = dataclasses.replace(config, plugins=(arg.replace(region.child_path, replacement),))
        with pytest.raises(QemuExited, match="mktme-shim") as info:
            await Machine(bad).launch()
        assert message in info.value.stderr_tail
    region.header["layout_version"] = 7
    with pytest.raises(QemuExited) as info:
        await Machine(config).launch()
    assert "region: layout version is 7, expected 1" in info.value.stderr_tail
    await tracer.close()


async def test_shim_built_for_the_wrong_abi_is_refused(baremetal_image):
    tracer = Tracer()
    config = tracer.configure(MachineConfig(boot=baremetal_image.boot()))
    # QEMU 7.2 speaks plugin API 1 only; QEMU 9.0+ no longer loads API 1 (make test-qemu10)
    abi, said = (2, "supports only up to version 1") if abi_for(find_qemu().version) == 1 else \
        (1, "supports only a minimum version of 2")
    wrong = str(build_shim(abi=abi)) + config.plugins[-1][config.plugins[-1].index(","):]
    vm = Machine(dataclasses.replace(config, plugins=(wrong,)))
    try:
        with pytest.raises(QemuExited, match=f"requires API version {abi}") as info:
            await vm.launch()
    finally:
        await vm.close()
    assert said in info.value.stderr_tail
    await tracer.close()


async def test_lifecycle_misuse(baremetal_image):
    tracer = Tracer()
    with pytest.raises(ShimError, match="call start"):
        tracer.watch(PAGE, 16)
    with pytest.raises(ValueError, match="TCG"):
        tracer.configure(MachineConfig(boot=baremetal_image.boot(), accel="kvm"))
    plain = Machine(MachineConfig(boot=baremetal_image.boot(), start_paused=True))
    config = tracer.configure(MachineConfig(boot=baremetal_image.boot()))
    with pytest.raises(ShimError, match="configure"):
        tracer.configure(config)
    async with plain:                                                 # launched without the shim
        with pytest.raises(ShimError, match="did not attach"):
            await tracer.start(plain)
    await tracer.close()
    await tracer.close()
    with pytest.raises(ValueError, match="on must be"):
        async with traced(baremetal_image.boot()) as (vm, t):
            t.watch(PAGE, 16, on="write")


async def test_batches_after_single_events_continue_where_iteration_stopped(baremetal_image):
    """Read a few accesses one by one, then the rest in bulk: nothing lost, nothing repeated."""
    async with traced(baremetal_image.boot()) as (vm, tracer):
        await vm.console.wait_for("mktme> ", patience(10))
        async with tracer.watch(PAGE, 4096, on="store") as stores:
            await vm.console.command(f"fill {PAGE:#x} 4096 0x11 8", r"ok fill .*\n")
            await tracer.flush()
            first = await drain(stores, 3)
            rest = []
            async def bulk() -> None:
                async for batch in stores.batches():
                    rest.extend(int(g) for g in batch["gpa"])
                    if len(first) + len(rest) >= 512:
                        return
            await asyncio.wait_for(bulk(), patience(10))
        assert [a.gpa for a in first] + rest == [PAGE + 8 * k for k in range(512)]
