#!/usr/bin/env python3
"""Probe: ``kill -9`` of the host in the middle of a snapshot save or a dump.

Each trial starts ``qemu-mktme run`` (a bare-metal guest with a tenant key), saves a first
snapshot, then starts ``snapshot save`` (or ``dump``) of the same path and kills the host with
SIGKILL after a random delay. What must hold after every trial:

- the client tells the truth: exit 0 only if a new snapshot is in place and verifies; otherwise
  the previous snapshot is still there, unchanged, and verifies (a dump: complete, or absent);
- no QEMU of the killed host is left running (PR_SET_PDEATHSIG), no guest RAM file stays in
  ``/dev/shm``;
- the next tool command removes what the killed writer left: partial snapshot files and dump
  directories named for a dead writer, and the killed host's runtime directory.

    .venv/bin/python scripts/probe_kill.py --trials 18      # prints a line per trial; exit 1 on a violation

``tests/probe/test_kill.py`` runs two trials (a save, a dump) in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from probe_secrets import cli, start_host, stop_host, write_private  # noqa: E402

from qemu_mktme.files import runtime  # noqa: E402

READY = b"ok write"
GUEST = ["-c", "write 0x200000 probe", "-c", "ticks 0 1000000"]


def _state(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of process ``pid``, None when there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def _qemu_children(pid: int) -> list[int]:
    """Live QEMU processes whose parent is ``pid``."""
    found = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv0 = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        state = _state(int(p))
        if b"qemu-system" in argv0 and state is not None and state[1] == pid and state[0] != "Z":
            found.append(int(p))
    return found


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _stacks(pid: int) -> str:
    """The Python stacks of ``pid`` (py-spy, when installed), to say where a process hangs."""
    try:
        out = subprocess.run(["py-spy", "dump", "--locals", "--pid", str(pid)], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return f":\n{out.stdout}" if out.returncode == 0 else ""


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".partial-" in p.name)


def trial(work: Path, what: str, delay: float, key_file: Path, kek_file: Path, env: dict,
          timeout: float = 300, hosts: list[int] | None = None) -> list[str]:
    """One kill; the violations found (empty: all held). The pids of the hosts it started are
    appended to ``hosts``."""
    problems: list[str] = []
    hosts = [] if hosts is None else hosts
    snap, dump = work / "vm.snap", work / f"dump-{time.monotonic_ns()}"
    host = start_host(work, key_file, GUEST, READY, memory="256M", env=env, timeout=timeout)
    hosts.append(host.pid)
    qemus = _qemu_children(host.pid)
    try:
        if what == "save" and not snap.exists():
            cli("snapshot", "save", str(snap), "--kek-file", str(kek_file), "--pid", str(host.pid), env=env, out=[])
        before = _identity(snap)
        args = (["snapshot", "save", str(snap), "--kek-file", str(kek_file)] if what == "save"
                else ["host", "dump", str(dump)])
        client = subprocess.Popen([sys.executable, "-m", "qemu_mktme.cli", *args, "--pid", str(host.pid)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(delay)
        host.send_signal(signal.SIGKILL)
        host.wait()
        killed = host.pid
        out, err = client.communicate(timeout=timeout)
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
    time.sleep(0.5)                                       # PDEATHSIG delivery and QEMU's exit
    alive = [q for q in qemus if (_state(q) or ("Z",))[0] != "Z"]
    if alive:
        problems.append(f"QEMU {alive} outlived the killed host")
    if what == "save":
        after = _identity(snap)
        verifies = subprocess.run([sys.executable, "-m", "qemu_mktme.cli", "snapshot", "verify", str(snap),
                                   "--kek-file", str(kek_file)], env=env, capture_output=True).returncode == 0
        if not verifies:
            problems.append("the snapshot at the path does not verify")
        if client.returncode == 0 and after == before:
            problems.append("the client reported success but the old snapshot is still there")
        if client.returncode != 0 and after != before:
            problems.append(f"the client reported failure ({err.decode(errors='replace').strip()}) "
                            "but a new snapshot replaced the old one")
    else:
        if client.returncode == 0 and not (dump / "manifest.json").exists():
            problems.append("the client reported a dump that is not complete")
        if client.returncode != 0 and dump.exists():
            problems.append("a failed dump left its target directory")
    # The next command of the tool cleans up after the dead writer.
    host = start_host(work, key_file, GUEST, READY, memory="256M", env=env, timeout=timeout)
    hosts.append(host.pid)
    try:
        cli("snapshot", "save", str(work / "next.snap"), "--kek-file", str(kek_file), "--pid", str(host.pid),
            env=env, out=[])
        cli("host", "dump", str(work / f"next-dump-{time.monotonic_ns()}"), "--pid", str(host.pid), env=env, out=[])
    finally:
        hung = stop_host(host, diagnose=_stacks)
        if hung is not None:
            problems.append("the next host did not exit within 30 s of SIGTERM" + hung)
    left = _leftovers(work)
    if left:
        problems.append(f"partial files of the dead writer survived the next command: {left}")
    parent = runtime.private_parent()
    stale = [n for n in os.listdir(parent) if f"-{killed}-" in n or n == f"{killed}.sock"]
    if stale:
        problems.append(f"the killed host's runtime entries survived the next command in {parent}: {stale}")
    return problems


def run(trials: int, seed: int | None = None, max_delay: float = 1.5) -> dict:
    rng = random.Random(seed)
    env = dict(os.environ)
    results = []
    with tempfile.TemporaryDirectory(prefix="probe-kill-") as tmp:
        work = Path(tmp)
        key_file, kek_file = work / "tenant.key", work / "kek.hex"
        write_private(key_file, f"{os.urandom(16).hex()} {os.urandom(16).hex()}\n")
        write_private(kek_file, os.urandom(32).hex() + "\n")
        hosts: list[int] = []
        for i in range(trials):
            what = "dump" if i % 3 == 1 else "save"
            delay = rng.uniform(0.0, max_delay)
            problems = trial(work, what, delay, key_file, kek_file, env, hosts=hosts)
            results.append({"trial": i, "kill_during": what, "delay_s": round(delay, 3), "problems": problems})
            print(f"trial {i:2}: kill -9 {delay:5.3f} s into {what:4}: "
                  f"{'ok' if not problems else '; '.join(problems)}", flush=True)
        # guest RAM files are named for the process that made them (qemu/machine.py): only this
        # probe's hosts count (tests running beside it have VMs of their own)
        shm_left = sorted(n for n in os.listdir("/dev/shm") if any(f"-{pid}-" in n for pid in hosts))
    return {"trials": results, "violations": sum(bool(r["problems"]) for r in results), "shm_left": shm_left}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=18)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    report = run(args.trials, args.seed)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.trials - report['violations']} of {args.trials} trials held; "
              f"/dev/shm files left: {report['shm_left'] or 'none'}")
    return 1 if report["violations"] or report["shm_left"] else 0


if __name__ == "__main__":
    sys.exit(main())
