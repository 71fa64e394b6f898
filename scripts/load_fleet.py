#!/usr/bin/env python3
"""Load on the libvirt fleet: N bare-metal domains (``ticks``) over hosts a and b, M migrations back
and forth (``virsh migrate --live --p2p --tls``, several at once), then R concurrent key-broker
requests from both hosts' namespaces. Checks: every domain's tick counter monotonic across its
machines' consoles, every migration done, 0 KeyIDs or keys left on a host that runs no domain, the
broker answered every request (bounded: its concurrency limit queues, nothing is dropped).

    .venv/bin/python scripts/load_fleet.py [--domains 6] [--migrations 20] [--requests 100]

Exit 0 when every check holds; each failure is printed. ``tests/virt/test_fleet_load.py`` runs a
small instance.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from qemu_mktme import images
from qemu_mktme.attest.hostid import host_credentials
from qemu_mktme.virt.lab import FleetLab

PROBE = r'''
import concurrent.futures, json, sys, time
from pathlib import Path
from qemu_mktme.attest.client import BrokerClient
url, creds, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
def one(i):
    c = BrokerClient(url, creds / "ca-cert.pem", cert=(creds / "client-cert.pem", creds / "client-key.pem"), timeout=120)
    try:
        t0 = time.monotonic(); c.nonce(); return time.monotonic() - t0
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    finally:
        c.close()
with concurrent.futures.ThreadPoolExecutor(n) as pool:
    print(json.dumps(list(pool.map(one, range(n)))))
'''


def ticks(lab: FleetLab, name: str) -> list[list[int]]:
    """The tick counts each machine's console shows for ``name`` (in order of writing)."""
    return [[int(n) for n in re.findall(r"^tick (\d+)", lab.serial(h, name), re.M)] for h in ("a", "b")]


def run(domains: int, migrations: int, requests: int, parallel: int = 2) -> list[str]:
    failures: list[str] = []
    boot = images.build("baremetal").boot(commands=["ticks 0 20000000"])
    with tempfile.TemporaryDirectory(prefix="load-fleet-") as tmp, FleetLab(Path(tmp), boot) as lab:
        names = [f"d{i}" for i in range(domains)]
        where = {}
        for i, name in enumerate(names):
            host = "a" if i % 2 == 0 else "b"
            lab.define(host, name, memory=64 << 20)
            r = lab[host].virsh("start", "--paused", name)
            if r.returncode:
                failures.append(f"{name}: start on {host}: {r.stderr.strip()}")
            where[name] = host
        time.sleep(1)

        def migrate(name: str) -> str | None:
            src = where[name]
            dst = "b" if src == "a" else "a"
            r = lab[src].virsh("migrate", "--live", "--p2p", "--tls", name, lab[dst].uri, timeout=600)
            if r.returncode:
                return f"{name}: {src}->{dst}: {r.stderr.strip()}"
            where[name] = dst
            return None
        t0 = time.monotonic()
        done = 0
        with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
            while done < migrations:
                batch = [names[(done + k) % len(names)] for k in range(min(parallel, migrations - done))]
                batch = list(dict.fromkeys(batch))
                failures += [f for f in pool.map(migrate, batch) if f]
                done += len(batch)
        print(f"{done} migrations in {time.monotonic() - t0:.1f} s ({parallel} at a time)", flush=True)
        time.sleep(1)
        for name in names:
            seen = ticks(lab, name)
            if lab[where[name]].virsh("domstate", name).stdout.strip() != "running":
                failures.append(f"{name}: not running on {where[name]}")
            for host, counts in zip(("a", "b"), seen):
                if counts != sorted(counts):
                    failures.append(f"{name}: tick counter not monotonic on {host}'s console")
        for host in ("a", "b"):
            b = lab.bindings(host)
            here = [n for n in names if where[n] == host]
            if sorted(b["domains"]) != sorted(here):
                failures.append(f"{host}: bound {sorted(b['domains'])}, runs {sorted(here)}")
            if len(b["keyids_in_use"]) > (1 if here else 0) or (not here and b["keys"]):
                failures.append(f"{host}: KeyIDs {b['keyids_in_use']} / {b['keys']} keys left with {len(here)} domains")
        assert lab.tenant is not None
        outs = {}
        procs = {h: lab[h].popen([sys.executable, "-c", PROBE, lab.url, str(host_credentials(lab.host_dirs[h])),
                                  str(requests // 2)],
                                 stdout=-1, stderr=-1) for h in ("a", "b")}
        for h, p in procs.items():
            out, err = p.communicate(timeout=600)
            try:
                outs[h] = json.loads(out)
            except ValueError:
                failures.append(f"broker probe from {h}: {err.decode(errors='replace')[-500:]}")
                outs[h] = []
        answers = [x for v in outs.values() for x in v]
        bad = [x for x in answers if not isinstance(x, float)]
        failures += [f"broker request: {x}" for x in bad[:5]]
        if answers:
            ok = sorted(x for x in answers if isinstance(x, float))
            print(f"{len(answers)} concurrent broker requests: {len(ok)} answered, slowest {ok[-1] if ok else 0:.2f} s, "
                  f"median {ok[len(ok) // 2] if ok else 0:.2f} s", flush=True)
        for name in names:
            lab[where[name]].virsh("destroy", name)
        time.sleep(0.5)
        for host in ("a", "b"):
            b = lab.bindings(host)
            if b["keyids_in_use"] or b["keys"]:
                failures.append(f"{host}: KeyIDs {b['keyids_in_use']} and {b['keys']} keys left after destroying all")
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--domains", type=int, default=6)
    ap.add_argument("--migrations", type=int, default=20)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--parallel", type=int, default=2, help="migrations at once (default 2)")
    args = ap.parse_args()
    print(f"load: {os.getloadavg()[0]:.2f}", flush=True)
    failures = run(args.domains, args.migrations, args.requests, args.parallel)
    for f in failures:
        print(f"FAIL {f}")
    print(f"load: {os.getloadavg()[0]:.2f}")
    print("ok" if not failures else f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
