#!/usr/bin/env python3
"""Probe: ``kill -9`` in the middle of a live migration between two running hosts.

A tenant (key server, broker, policy enrolling hosts A and B) and two hosts as a user runs them:
A is ``qemu-mktme run --tenant-server ... --host-name A`` (an attested bare-metal VM ``mvm``), B is
``qemu-mktme host start B``. Each trial starts ``qemu-mktme host migrate mvm --from X --to Y`` and kills,
with SIGKILL, one of:

- ``client``: the migrate command, at a given delay (before it reached the source host; while the
  destination prepares; during the stream) or ``when-done`` (as soon as the destination lists the VM:
  after completion, before the source closed its copy);
- ``source``: the source host, once the destination shows its incoming VM (during the stream);
- ``dest``: the destination host, at the same moment.

What must hold after every trial, once the hosts settled:

- the VM runs on exactly one host (a killed source takes it along: then on none, and that is the only
  case), no incoming VM is left on any live host, and a host without the VM holds no KeyID and no key;
- no QEMU outlives its killed host;
- a retry works in both directions: the VM migrates to the other host and back (a host that exited,
  as ``run`` does once its VM left, is started again with ``host start``).

All along, each host's control socket has a silent connection and a half-sent request open on it:
every migration and query of the probe goes through beside them.

    .venv/bin/python scripts/probe_migrate.py                 # every kind of kill, one line per trial

``tests/probe/test_migrate_kill.py`` runs a bounded set in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from probe_kill import _qemu_children, _state  # noqa: E402
from probe_secrets import cli, stop_host  # noqa: E402

from qemu_mktme.errors import MktmeError  # noqa: E402
from qemu_mktme.live import control  # noqa: E402

VM = "mvm"
READY = b"ok write"
GUEST = ["-c", "write 0x200000 probe", "-c", "ticks 0 1000000"]
TRIALS = [("client", 0.2), ("client", 1.2), ("client", "prepared"), ("client", "when-done"),
          ("source", "prepared"), ("dest", "prepared")]


class World:
    """The tenant and the two hosts of the probe (subprocesses), in a private directory."""

    def __init__(self, work: Path, timeout: float) -> None:
        self.work = work
        self.timeout = timeout
        tag = os.getpid()
        self.names = {"A": f"probe-a-{tag}", "B": f"probe-b-{tag}"}
        self.env = dict(os.environ, QEMU_MKTME_TENANT_DIR=str(work / "tenant"),
                        QEMU_MKTME_HOSTS_DIR=str(work / "hosts"))
        self.hosts: dict[str, subprocess.Popen] = {}
        self.pests: list[socket.socket] = []
        self.started: list[int] = []
        self.out: list[bytes] = []

    def cli(self, *args: str, check: bool = True) -> str:
        return cli(*args, env=self.env, out=self.out, check=check, timeout=self.timeout)

    def set_up(self) -> None:
        self.cli("tenant", "init", "probe")
        self.cli("keyserver", "start")
        info = json.loads(self.cli("keyserver", "status", "--json"))
        self.url, self.ca = info["url"], str(self.work / "tenant" / "pki" / "ca-cert.pem")
        self.pki = str(self.work / "tenant" / "pki")
        self.cli("tenant", "add-key", "vm")
        self.cli("tenant", "policy", "--host", self.names["A"], "--host", self.names["B"], "--guest", "baremetal")

    def tear_down(self) -> None:
        for peer in self.pests:
            peer.close()
        for host in list(self.hosts.values()):
            if host.poll() is None:
                stop_host(host)
        self.cli("keyserver", "stop", check=False)

    def _spawn(self, which: str, argv: list[str], ready: bytes) -> subprocess.Popen:
        log = self.work / f"{which}-{time.monotonic_ns()}.out"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "qemu_mktme.cli", *argv], env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while ready not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"host {which} did not come up: {log.read_text(errors='replace')[-800:]}")
            time.sleep(0.05)
        self.hosts[which] = proc
        self.started.append(proc.pid)
        self._pester(which)
        return proc

    def _pester(self, which: str) -> None:
        """Hostile peers on the host's control socket for the trials to work beside: one silent
        connection and one that sent half a request (each host serves them apart)."""
        sock = control.find_host(host=self.names[which])
        for first in (b"", b'{"cmd": "qu'):
            peer = socket.socket(socket.AF_UNIX)
            peer.connect(str(sock))
            peer.sendall(first)
            self.pests.append(peer)

    def run_vm(self, which: str) -> None:
        """Host ``which`` as ``run`` with the attested VM (the broker releases its key)."""
        self._spawn(which, ["run", *GUEST, "--no-input", "--memory", "256M", "--name", VM, "--tenant-server", self.url,
                            "--tenant-ca", self.ca, "--host-name", self.names[which]], READY)

    def host_start(self, which: str) -> None:
        self._spawn(which, ["host", "start", self.names[which], "--tenant-server", self.url, "--tenant-ca",
                            self.ca], b"ready")

    def alive(self, which: str) -> bool:
        return which in self.hosts and self.hosts[which].poll() is None

    def query(self, which: str) -> dict | None:
        if not self.alive(which):
            return None
        try:
            return asyncio.run(control.request("query", host=self.names[which], timeout=30))
        except MktmeError:
            return None

    def migrate(self, src: str, dst: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "qemu_mktme.cli", "host", "migrate", VM,
                                 "--from", self.names[src], "--to", self.names[dst], "--tls", self.pki], env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def where(self) -> str | None:
        """The host running the VM once both settled (None: none does); ``RuntimeError`` if both do."""
        deadline = time.monotonic() + self.timeout
        last = None
        while time.monotonic() < deadline:
            seen = {w: self.query(w) for w in ("A", "B")}
            on = tuple(sorted(w for w, q in seen.items() if q and VM in q["guests"]))
            pending = [w for w, q in seen.items() if q and q.get("incoming")]
            state = (on, tuple(pending))
            if not pending and state == last:           # the same for two looks in a row
                if len(on) > 1:
                    raise RuntimeError(f"both hosts run {VM}")
                return on[0] if on else None
            last = state
            time.sleep(0.5)
        raise RuntimeError(f"the hosts did not settle: {last}")


def _clean(world: World, which: str) -> list[str]:
    """Problems on host ``which`` (without the VM): KeyIDs, keys, incoming VMs left."""
    q = world.query(which)
    if q is None:
        return []
    problems = []
    if q["keyids"]:
        problems.append(f"host {which} keeps KeyIDs {[row['keyid'] for row in q['keyids']]}")
    if q.get("incoming"):
        problems.append(f"host {which} keeps incoming VMs {sorted(q['incoming'])}")
    if q["guests"]:
        problems.append(f"host {which} runs {sorted(q['guests'])}")
    return problems


def _ensure(world: World, which: str) -> None:
    """Host ``which`` running (``host start``: a ``run`` host exits once its VM left)."""
    if not world.alive(which):
        world.host_start(which)


def _wait_for(world: World, which: str, test, limit: float) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        q = world.query(which)
        if q is not None and test(q):
            return True
        time.sleep(0.02)
    return False


def trial(world: World, victim: str, when: float | str) -> list[str]:
    """One kill during a migration from where the VM runs to the other host; the violations."""
    src = world.where()
    if src is None:
        world.run_vm("A")
        src = "A"
    dst = "B" if src == "A" else "A"
    _ensure(world, dst)
    client = world.migrate(src, dst)
    target = {"client": client, "source": world.hosts[src], "dest": world.hosts[dst]}[victim]
    if isinstance(when, float):
        time.sleep(when)
    elif when == "prepared":
        _wait_for(world, dst, lambda q: VM in q.get("incoming", {}), world.timeout)
    else:                                                  # when-done: the destination runs it
        _wait_for(world, dst, lambda q: VM in q["guests"], world.timeout)
    qemus = {w: _qemu_children(world.hosts[w].pid) for w in ("A", "B") if world.alive(w)}
    target.send_signal(signal.SIGKILL)
    target.wait()
    client.communicate(timeout=world.timeout)
    problems: list[str] = []
    time.sleep(0.5)
    for w, pids in qemus.items():                          # a killed host's QEMU dies with it
        if not world.alive(w):
            alive = [q for q in pids if (_state(q) or ("Z",))[0] != "Z"]
            if alive:
                problems.append(f"QEMU {alive} outlived the killed host {w}")
    try:
        on = world.where()
    except RuntimeError as err:
        return [*problems, str(err)]
    if on is None and victim != "source":
        problems.append(f"the VM is gone, though only the {victim} was killed")
    for w in ("A", "B"):
        if w != on:
            problems += _clean(world, w)
    if on is None:                                         # the killed source took it along
        world.run_vm(src if not world.alive(src) else "A" if not world.alive("A") else "B")
        on = world.where()
    # a retry in both directions
    for _ in range(2):
        other = "B" if on == "A" else "A"
        _ensure(world, other)
        r = world.migrate(on, other)
        out, err = r.communicate(timeout=world.timeout)
        if r.returncode != 0:
            problems.append(f"retry {on} -> {other} failed: {err.decode(errors='replace').strip()}")
            break
        on = world.where()
        if on != other:
            problems.append(f"after the retry to {other} the VM runs on {on}")
            break
        problems += _clean(world, "B" if on == "A" else "A")
    return problems


def run(trials: list[tuple[str, float | str]], timeout: float = 300) -> dict:
    results = []
    with tempfile.TemporaryDirectory(prefix="probe-migrate-") as tmp:
        world = World(Path(tmp), timeout)
        try:
            world.set_up()
            world.run_vm("A")
            world.host_start("B")
            for i, (victim, when) in enumerate(trials):
                problems = trial(world, victim, when)
                results.append({"trial": i, "killed": victim, "when": when, "problems": problems})
                print(f"trial {i:2}: kill -9 {victim:6} at {when!s:9}: {'ok' if not problems else '; '.join(problems)}",
                      flush=True)
        finally:
            world.tear_down()
        shm_left = sorted(n for n in os.listdir("/dev/shm") if any(f"-{pid}-" in n for pid in world.started))
    return {"trials": results, "violations": sum(bool(r["problems"]) for r in results), "shm_left": shm_left}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    report = run(TRIALS)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{len(TRIALS) - report['violations']} of {len(TRIALS)} trials held; "
              f"/dev/shm files left: {report['shm_left'] or 'none'}")
    return 1 if report["violations"] or report["shm_left"] else 0


if __name__ == "__main__":
    sys.exit(main())
