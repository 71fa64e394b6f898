#!/usr/bin/env python3
"""Live migration: (a) plain QEMU without TLS, (b) plain QEMU over TLS, (c) emulated MKTME over TLS
with the destination's attestation and key delivery; a 512 MiB bare-metal guest holding 384 MiB of
random data, every run with ``max-bandwidth`` raised (QEMU 7.2's default cap of 128 MiB/s would
make the baseline meaningless).

    .venv/bin/python scripts/bench_migrate.py [--rounds 3] [--quick]

Each configuration keeps one VM that migrates back and forth between two hosts (two QEMUs; for
(c) two host models h1/h2, each attesting to the broker before it receives the key). Total is the
wall time from "migrate" asked to the destination running (destination QEMU start included in all
three; attestation and key release included in (c)); downtime and throughput are QEMU's
``query-migrate`` figures. Rounds are interleaved, medians reported. Last line:
``ratio=<(c)/(b) total time>``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from qemu_mktme import images
from qemu_mktme.live.migrate import plain_migrate
from qemu_mktme.live.session import HostSession
from qemu_mktme.qemu.machine import Machine, MachineConfig
from qemu_mktme.tenant import admin, keyserver
from qemu_mktme.attest.launch import TenantLaunch, attested_session
from qemu_mktme.attest.migrate import attested_migration
from qemu_mktme.tenant.store import TenantDir

MEMORY = 512 << 20
DATA = 384 << 20
DATA_GPA = 64 << 20


def fill(ram, seed: int) -> None:
    """384 MiB of random data in guest RAM (the CPU view: what the guest holds)."""
    chunk = 16 << 20
    for off in range(0, DATA, chunk):
        ram.write(DATA_GPA + off, os.urandom(chunk))


async def _plain_migrate(src: Machine, tls: Path | None) -> tuple[Machine, dict[str, float]]:
    t0 = time.perf_counter()
    dst, info = await plain_migrate(src, tls=tls)
    return dst, {"total": time.perf_counter() - t0, "downtime": info["downtime"] / 1000, "mbps": info["ram"]["mbps"]}


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one round (what bench_all runs)")
    args = ap.parse_args()
    rounds = 1 if args.quick else args.rounds
    boot = images.build("baremetal").boot()
    config = MachineConfig(boot=boot, memory=MEMORY, name="vm1")
    results: dict[str, list[dict[str, float]]] = {"a": [], "b": [], "c": []}
    with tempfile.TemporaryDirectory(prefix="bench-migrate-") as tmp:
        tenant = TenantDir(Path(tmp) / "tenant")
        tenant.init("bench")
        ks = keyserver.start(tenant)
        try:
            admin.add_key(tenant, "vm")
            dirs = {h: Path(tmp) / "hosts" / h for h in ("h1", "h2")}
            admin.make_policy(tenant, boot, hosts=list(dirs), host_dirs=dirs)
            tls = tenant.pki.directory
            plain = {"a": Machine(config), "b": Machine(dataclasses.replace(config, name="vm2"))}
            for vm in plain.values():
                await vm.launch()
                fill(vm.ram, 0)
            launch = {h: TenantLaunch(ks.url, tenant.pki.ca, host=h, host_dir=d) for h, d in dirs.items()}
            async with attested_session(launch["h1"], config, tenant="bench", control=False) as h1, \
                    HostSession([], control=False) as h2:
                fill(h1.machines["vm1"].ram, 0)
                sessions, here = {"h1": h1, "h2": h2}, "h1"
                for r in range(rounds):
                    for kind in ("a", "b", "c") if r % 2 == 0 else ("c", "b", "a"):
                        if kind == "c":
                            there = "h2" if here == "h1" else "h1"
                            t0 = time.perf_counter()
                            res = await attested_migration(sessions[here], "vm1", sessions[there], launch[there],
                                                           tls=tls)
                            total = time.perf_counter() - t0
                            results["c"].append({"total": total, "downtime": res.downtime_ms / 1000,
                                                 "mbps": res.mbps})
                            here = there
                        else:
                            plain[kind], fig = await _plain_migrate(plain[kind], tls if kind == "b" else None)
                            results[kind].append(fig)
            for vm in plain.values():
                await vm.close()
        finally:
            keyserver.stop(tenant)
    names = {"a": "plain QEMU, no TLS", "b": "plain QEMU, TLS", "c": "emulated, TLS + attestation + key"}
    med = {}
    for kind, rows in results.items():
        med[kind] = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
        m = med[kind]
        print(f"({kind}) {names[kind]:36} total {m['total']:6.3f} s  downtime {m['downtime'] * 1000:6.1f} ms  "
              f"throughput {m['mbps']:7.0f} Mb/s  ({len(rows)} runs)")
    print(f"ratio={med['c']['total'] / med['b']['total']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
