#!/usr/bin/env python3
"""Probe: does any key byte reach a file, a log, an output stream or ``ps``?

Runs the tool as a user would, through the CLI: ``qemu-mktme run`` with a tenant key read from a
file and a secret written by the guest, then ``query``, ``dump``, ``snapshot save`` and
``snapshot verify`` against it, and ``inspect`` of the dump with the key. While the host runs it
reads every process's command line (what ``ps`` shows other users); afterwards it scans every file
the run could have written (the work directory, the runtime and control directories, ``/dev/shm``,
new files in the temporary directory and the cache) and every captured output stream for the
tenant key, its tweak key and the key-encryption key, raw and in hex (lower and upper case).

    .venv/bin/python scripts/probe_secrets.py            # prints what it scanned; exit 1 on a hit
    .venv/bin/python scripts/probe_secrets.py --guest linux

``tests/probe/test_secrets.py`` runs it on the bare-metal guest in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

SECRET = "PROBE-GUEST-SECRET-7f3a"
MAX_SCAN = 2 << 30          # bytes per file; guest RAM files are scanned whole up to this


@dataclass
class Report:
    files: int = 0
    nbytes: int = 0
    processes: int = 0
    hits: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"files_scanned": self.files, "bytes_scanned": self.nbytes, "processes_checked": self.processes,
                "hits": self.hits}


def needles(secrets: dict[str, bytes]) -> dict[bytes, str]:
    """Every form in which a key could leak: raw, hex, HEX."""
    out = {}
    for name, raw in secrets.items():
        out[raw] = f"{name} (raw)"
        out[raw.hex().encode()] = f"{name} (hex)"
        out[raw.hex().upper().encode()] = f"{name} (HEX)"
    return out


def scan_bytes(data: bytes, where: str, forms: dict[bytes, str], report: Report) -> None:
    report.nbytes += len(data)
    for needle, what in forms.items():
        if needle in data:
            report.hits.append(f"{what} in {where}")


def scan_file(path: Path, forms: dict[bytes, str], report: Report, allowed: set[Path]) -> None:
    try:
        if path.is_symlink() or not path.is_file() or path.resolve() in allowed:
            return
        with open(path, "rb") as f:
            data = f.read(MAX_SCAN)
    except OSError:
        return
    report.files += 1
    scan_bytes(data, str(path), forms, report)


def scan_tree(root: Path, forms: dict[bytes, str], report: Report, allowed: set[Path],
              newer_than: float | None = None) -> None:
    if not root.exists():
        return
    for dirpath, _dirs, files in os.walk(root, followlinks=False):
        for name in files:
            p = Path(dirpath) / name
            try:
                if newer_than is not None and p.lstat().st_mtime < newer_than:
                    continue
            except OSError:
                continue
            scan_file(p, forms, report, allowed)


def scan_processes(forms: dict[bytes, str], report: Report) -> None:
    """What ``ps`` shows every user: each process's command line and name."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        report.processes += 1
        for needle, what in forms.items():
            if needle in cmdline:
                report.hits.append(f"{what} in the command line of pid {pid} (ps)")


def write_private(path: Path, text: str) -> None:
    """A new 0600 file (a key file as a careful user keeps it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def start_host(work: Path, key_file: Path, guest_args: list[str], ready: bytes, *, memory: str | None,
               env: dict, timeout: float) -> subprocess.Popen:
    """``qemu-mktme run`` with the tenant key from ``key_file``, its console in ``work``, once
    ``ready`` shows on the console (``RuntimeError`` if it exits or hangs first)."""
    console = work / f"console-{time.monotonic_ns()}.out"
    with open(console, "wb") as out:
        host = subprocess.Popen([sys.executable, "-m", "qemu_mktme.cli", "run", *guest_args, "--no-input",
                                 "--key", f"user:@{key_file}", "--tenant", "probe", "--name", "probe",
                                 *(["--memory", memory] if memory else [])],
                                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while ready not in console.read_bytes():
        if host.poll() is not None or time.monotonic() > deadline:
            host.kill()
            host.wait()
            raise RuntimeError(f"the host did not come up: {console.read_text(errors='replace')[-500:]}")
        time.sleep(0.05)
    return host


def stop_host(host: subprocess.Popen, grace: float = 30.0,
              diagnose: Callable[[int], str] = lambda pid: "") -> str | None:
    """SIGTERM, then SIGKILL after ``grace`` (a hang guard: a host stops in well under a second).
    None when SIGTERM stopped it; else what ``diagnose(pid)`` said of the hung host first."""
    host.send_signal(signal.SIGTERM)
    try:
        host.wait(grace)
        return None
    except subprocess.TimeoutExpired:
        said = diagnose(host.pid)
        host.kill()
        host.wait()
        return said


def cli(*args: str, env: dict, out: list[bytes], check: bool = True, timeout: float = 600) -> str:
    r = subprocess.run([sys.executable, "-m", "qemu_mktme.cli", *args], env=env, capture_output=True,
                       timeout=timeout)
    out += [r.stdout, r.stderr]
    if check and r.returncode != 0:
        raise RuntimeError(f"qemu-mktme {' '.join(args)} exited {r.returncode}: {r.stderr.decode(errors='replace')}")
    return r.stdout.decode(errors="replace")


def probe(work: Path, guest: str = "baremetal", memory: str | None = None, timeout: float = 600) -> Report:
    """Run the scenario in ``work`` (a fresh private directory) and scan for key bytes."""
    started = time.time() - 1
    key, tweak, kek = os.urandom(16), os.urandom(16), os.urandom(32)
    key_file, kek_file = work / "tenant.key", work / "kek.hex"
    write_private(key_file, f"{key.hex()} {tweak.hex()}\n")
    write_private(kek_file, kek.hex() + "\n")
    forms = needles({"tenant key": key, "tweak key": tweak, "tenant key+tweak": key + tweak, "KEK": kek})
    report = Report()
    env = dict(os.environ)
    outputs: list[bytes] = []
    if guest == "baremetal":
        guest_args = ["-c", f"write 0x200000 {SECRET}", "-c", "ticks 100000"]
        ready = b"ok write"
    else:
        guest_args = ["--guest", "linux", "--workload", "secret", "--param", f"secret={SECRET}"]
        ready = b"secret at"
    host = start_host(work, key_file, guest_args, ready, memory=memory, env=env, timeout=timeout)
    try:
        scan_processes(forms, report)
        pid = str(host.pid)
        cli("host", "query", "--pid", pid, env=env, out=outputs)
        cli("host", "dump", str(work / "dump"), "--pid", pid, env=env, out=outputs)
        cli("snapshot", "save", str(work / "vm.snap"), "--kek-file", str(kek_file), "--pid", pid, env=env, out=outputs)
        scan_processes(forms, report)
    finally:
        stop_host(host)
    cli("snapshot", "verify", str(work / "vm.snap"), "--kek-file", str(kek_file), env=env, out=outputs)
    cli("inspect", str(work / "dump"), "search", SECRET, "--key", f"@{key_file}", "--json", env=env, out=outputs)
    allowed = {key_file.resolve(), kek_file.resolve()}
    scan_tree(work, forms, report, allowed)
    scan_tree(Path("/dev/shm"), forms, report, allowed, newer_than=started)
    scan_tree(Path(tempfile.gettempdir()), forms, report, allowed | {work.resolve()}, newer_than=started)
    if os.environ.get("XDG_RUNTIME_DIR"):
        scan_tree(Path(os.environ["XDG_RUNTIME_DIR"]), forms, report, allowed, newer_than=started)
    cache = Path(os.environ.get("QEMU_MKTME_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
                 / "qemu-mktme")
    scan_tree(cache, forms, report, allowed, newer_than=started)
    for i, data in enumerate(outputs):
        scan_bytes(data, f"output stream {i} of the CLI", forms, report)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guest", choices=("baremetal", "linux"), default="baremetal")
    ap.add_argument("--memory", help="guest RAM (default: the guest's)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="probe-secrets-") as tmp:
        report = probe(Path(tmp), args.guest, args.memory)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(f"scanned {report.files} files ({report.nbytes >> 20} MiB), {report.processes} command lines, "
              f"output streams of every command: {len(report.hits)} key sightings")
        for hit in report.hits:
            print(f"  {hit}")
    return 1 if report.hits else 0


if __name__ == "__main__":
    sys.exit(main())
