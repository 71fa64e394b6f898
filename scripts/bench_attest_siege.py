#!/usr/bin/env python3
"""Attested launches in a row while local attackers hold connections to the key server: silent
TCP connections and half ClientHellos to the broker and to KMIP, each reopened as soon as the
server drops it (:class:`probe_keyserver.Siege`). Issue 22's first finding: one such connection
used to stop every attested launch.

    .venv/bin/python scripts/bench_attest_siege.py [--launches 50] [--idle 4]

Each launch is the library's ``attested_session`` (what ``run --tenant-server`` calls): QEMU
paused, the host measured, a nonce and a release from the broker (which fetches the key from
KMIP), the key into the key service, the bare-metal guest to its first console line. Prints one
line per launch and ``ok=<launches that succeeded>/<launches> median=<s> max=<s> reopened=<n>``;
exit 1 unless every launch succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # this checkout's package
sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe_keyserver import Siege  # noqa: E402

from qemu_mktme import images  # noqa: E402
from qemu_mktme.errors import MktmeError  # noqa: E402
from qemu_mktme.qemu.machine import MachineConfig  # noqa: E402
from qemu_mktme.tenant import admin, keyserver  # noqa: E402
from qemu_mktme.attest.launch import TenantLaunch, attested_session  # noqa: E402
from qemu_mktme.tenant.store import TenantDir  # noqa: E402

FIRST_LINE = r"mktme-baremetal \d+ ready"


async def launches(launch: TenantLaunch, boot, ports: list[int], n: int, *, idle: int = 4, tenant: str = "siege",
                   timeout: float = 60.0, log=print) -> dict[str, object]:
    """``n`` attested launches one after another under a :class:`Siege` of ``ports``."""
    seconds: list[float] = []
    failures: list[str] = []
    with Siege(ports, idle=idle) as siege:
        for i in range(n):
            t0 = time.perf_counter()
            try:
                async with attested_session(launch, MachineConfig(boot=boot, memory="128M", name="bm"),
                                            tenant=tenant, control=False) as s:
                    await s.machines["bm"].console.wait_for(FIRST_LINE, timeout)
                seconds.append(time.perf_counter() - t0)
                log(f"launch {i + 1}: {seconds[-1]:.2f} s")
            except (MktmeError, OSError, TimeoutError) as err:
                failures.append(f"launch {i + 1}: {type(err).__name__}: {err}")
                log(failures[-1])
        reopened = siege.reopened
    return {"ok": len(seconds), "launches": n, "failures": failures, "seconds": seconds, "reopened": reopened,
            "median": statistics.median(seconds) if seconds else None, "max": max(seconds, default=None)}


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=50)
    parser.add_argument("--idle", type=int, default=4, help="silent connections (and half hellos) per port")
    args = parser.parse_args()
    boot = images.build("baremetal").boot()
    with tempfile.TemporaryDirectory(prefix="bench-siege-") as tmp:
        tenant = TenantDir(Path(tmp) / "tenant")
        tenant.init("siege")
        info = keyserver.start(tenant)
        try:
            admin.add_key(tenant, "vm")
            hostdir = Path(tmp) / "hosts" / "host0"
            admin.make_policy(tenant, boot, hosts=["host0"], host_dirs={"host0": hostdir})
            launch = TenantLaunch(info.url, tenant.pki.ca, host_dir=hostdir)
            result = await launches(launch, boot, [info.broker_port, info.kmip_port], args.launches, idle=args.idle)
        finally:
            keyserver.stop(tenant)
    print(f"ok={result['ok']}/{result['launches']} median={result['median'] or 0:.2f}s max={result['max'] or 0:.2f}s "
          f"reopened={result['reopened']}")
    return 0 if result["ok"] == result["launches"] else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
