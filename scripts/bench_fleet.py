#!/usr/bin/env python3
"""libvirt runs the hosts: what the MKTME host model adds to libvirt's own operations, measured
between two namespaced machines (qemu_mktme.virt.lab: the tenant, hosts a and b, each with its
libvirtd, the hook and 'qemu-mktme host --libvirt').

    .venv/bin/python scripts/bench_fleet.py [--rounds 5] [--quick]

(1) migration: ``virsh migrate --live --p2p --tls`` of a 256 MiB bare-metal domain holding 192 MiB
    of random data, back and forth over the a-b veth link, opted in (the destination's host model
    attests to the broker at 'prepare' and binds a KeyID at 'started' before the stream; the source
    releases its KeyID at 'stopped') vs the same domain not opted in (libvirt alone). Wall time of
    virsh migrate. Line: ``migrate-ratio=``. Beside it, from the host models' logs, what they add on
    migration's critical path: how long each hook of the opted-in domain waited for its answer
    (destination: migrate, prepare, start, started; source: stopped, release), and the attestation
    (started at 'migrate', awaited at 'prepare'), medians over the migrations.
(2) start: ``virsh start`` to the guest's first console line, Linux guest (512 MiB, stock kernel +
    busybox): opted in (``virsh start --paused``: attestation at 'prepare', binding at 'started',
    resumed by the host model) vs a plain domain with ``virsh start``. Line: ``start-ratio=``.
Rounds interleaved (benchlib); medians with their spread. Machines are made anew for (1) and (2)
(the hosts' measured launch names one guest kernel).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import add_common, interleave, median, ratio_spread, spread  # noqa: E402

from qemu_mktme import images  # noqa: E402
from qemu_mktme.virt.lab import FleetLab, guest_ram  # noqa: E402

FILL_AT = 32 << 20
PHASES = ("migrate", "prepare", "start", "started", "stopped", "release")


def _wait(condition, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.01)


def hook_phases(logs: list[str], name: str) -> dict[str, list[float]]:
    """Seconds each hook operation of domain ``name`` took in the host models (their ``-v`` logs),
    and its attestations (``attest``)."""
    out: dict[str, list[float]] = {p: [] for p in (*PHASES, "attest")}
    for text in logs:
        for op, seconds in re.findall(rf"domain {re.escape(name)}: (\w+) done in ([0-9.]+) s", text):
            out.setdefault(op, []).append(float(seconds))
        out["attest"] += [float(s) for s in re.findall(rf"domain {re.escape(name)}: attested and key released in ([0-9.]+) s", text)]
    return out


def bench_migration(work: Path, rounds: int, memory: int, data: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    boot = images.build("baremetal").boot(commands=["ticks 0 2000000"])
    with FleetLab(work / "migrate", boot) as lab:
        print(f"machines made in {lab.timings['machines']:.2f} s (all three with the host models: "
              f"{lab.timings['total']:.2f} s)", flush=True)
        where = {}
        for name, opt in (("mktme", True), ("plain", False)):
            lab.define("a", name, memory=memory, opt=opt)
            r = lab["a"].virsh("start", "--paused", name) if opt else lab["a"].virsh("start", name)
            if r.returncode:
                raise RuntimeError(r.stderr)
            _wait(lambda n=name: lab["a"].virsh("domstate", n).stdout.strip() == "running")
            with open(guest_ram(lab.qemu_pid("a", name), memory), "r+b") as ram:
                ram.seek(FILL_AT)
                for _ in range(data >> 24):
                    ram.write(os.urandom(16 << 20))
            where[name] = "a"
        logged = {h: len(lab.log(h).read_bytes()) for h in ("a", "b")}    # (the starts' hooks: not counted)

        def move(name: str) -> float:
            src = where[name]
            dst = "b" if src == "a" else "a"
            t0 = time.monotonic()
            r = lab[src].virsh("migrate", "--live", "--p2p", "--tls", name, lab[dst].uri, timeout=600)
            seconds = time.monotonic() - t0
            if r.returncode:
                raise RuntimeError(r.stderr)
            where[name] = dst
            print(f"  {name:6} {src}->{dst} {seconds:7.3f} s", flush=True)
            return seconds
        times = interleave({"mktme": lambda: move("mktme"), "plain": lambda: move("plain")}, rounds)
        left = [lab.bindings(h)["keyids_in_use"] for h in ("a", "b")]
        print(f"KeyIDs in use after the runs: a {left[0]}, b {left[1]} (one: the mktme domain's)")
        phases = hook_phases([lab.log(h).read_bytes()[logged[h]:].decode(errors="replace") for h in ("a", "b")], "mktme")
        return times, phases


def bench_start(work: Path, rounds: int) -> dict[str, list[float]]:
    boot = images.build("linux").boot(workload="counter", params={"period": "0.2"})
    with FleetLab(work / "start", boot) as lab:
        for name, opt in (("mktme", True), ("plain", False)):
            lab.define("a", name, opt=opt)

        def start(name: str) -> float:
            log = lab["a"].root / "log/qemu" / f"{name}-serial.log"
            log.unlink(missing_ok=True)
            t0 = time.monotonic()
            r = lab["a"].virsh("start", "--paused", name) if name == "mktme" else lab["a"].virsh("start", name)
            if r.returncode:
                raise RuntimeError(r.stderr)
            _wait(lambda: log.exists() and b"count 1" in log.read_bytes())
            seconds = time.monotonic() - t0
            lab["a"].virsh("destroy", name)
            print(f"  {name:6} start -> 'count 1' {seconds:7.3f} s", flush=True)
            return seconds
        return interleave({"mktme": lambda: start("mktme"), "plain": lambda: start("plain")}, rounds)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common(ap, rounds=5)
    ap.add_argument("--only", choices=("migrate", "start"), help="run one of the two benchmarks")
    args = ap.parse_args()
    rounds = 2 if args.quick else args.rounds
    memory, data = (64 << 20, 16 << 20) if args.quick else (256 << 20, 192 << 20)
    print(f"load: {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        mig, phases = bench_migration(Path(tmp), rounds, memory, data) if args.only != "start" else ({}, {})
        st = bench_start(Path(tmp), rounds) if args.only != "migrate" else {}
    if mig:
        print(f"(1) migration, {memory >> 20} MiB with {data >> 20} MiB random, over TLS: "
              f"opted in {spread(mig['mktme'])} s, plain {spread(mig['plain'])} s, ratio {ratio_spread(mig['mktme'], mig['plain'])}")
        waited = sum(median(phases[p]) for p in PHASES if phases[p])
        print("    host model's answers to the opted-in domain's hooks (median s): "
              + ", ".join(f"{p} {median(phases[p]):.3f}" for p in PHASES if phases[p])
              + f"; sum {waited:.3f} s a migration ({100 * waited / median(mig['plain']):.1f} % of plain); attestation "
              + (f"{spread(phases['attest'])} s, begun at 'migrate'" if phases["attest"] else "not logged"))
    if st:
        print(f"(2) start -> first console line, Linux guest: opted in {spread(st['mktme'])} s, plain {spread(st['plain'])} s, "
              f"ratio {ratio_spread(st['mktme'], st['plain'])}")
    print(f"load: {os.getloadavg()[0]:.2f}")
    if mig:
        print(f"migrate-ratio={median(mig['mktme']) / median(mig['plain']):.2f}")
    if st:
        print(f"start-ratio={median(st['mktme']) / median(st['plain']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
