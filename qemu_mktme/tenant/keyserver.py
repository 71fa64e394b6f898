"""``qemu-mktme keyserver start|stop|status``: the tenant's PyKMIP server and key broker, as one
background process with its state in the tenant directory.

The process (``python -m qemu_mktme.tenant.keyserver TENANT``) runs PyKMIP's ``KmipServer``
on the main thread (it installs its own SIGTERM handler) and the broker's HTTPS server in a
thread, then writes ``TENANT/keyserver.json`` (pid, its start time, both ports, the broker URL)
once both listen. ``stop`` signals only the pid recorded there, and only while that process is
still the one that wrote it (same start time).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import KeyServerError
from ..files.runtime import process_start_time
from .kmip import KmipClient, KmipEndpoint, quiet, server_config
from .store import TenantDir

STATE = "keyserver.json"
START_TIMEOUT = 30.0


@dataclass(frozen=True)
class KeyServerInfo:
    pid: int
    start_time: int
    kmip_port: int
    broker_port: int

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.broker_port}"

    def to_json(self) -> dict[str, object]:
        return {"pid": self.pid, "start_time": self.start_time, "kmip_port": self.kmip_port,
                "broker_port": self.broker_port, "url": self.url}


def _recorded(tenant: TenantDir) -> KeyServerInfo | None:
    try:
        obj = json.loads((tenant.path / STATE).read_text())
        return KeyServerInfo(int(obj["pid"]), int(obj["start_time"]), int(obj["kmip_port"]), int(obj["broker_port"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def status(tenant: TenantDir) -> KeyServerInfo | None:
    """The running key server of ``tenant``, or None (a stale state file is ignored)."""
    info = _recorded(tenant)
    if info is None or not _alive(info):
        return None
    return info


def _leftovers(tenant: TenantDir, pgid: int) -> list[int]:
    """Processes of a dead key server's process group (PyKMIP's multiprocessing manager, when the
    server was killed with -9): only those whose command line is this tenant's key server."""
    mine = []
    marker = f"qemu_mktme.tenant.keyserver\0{tenant.path}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if int(fields[2]) == pgid and marker in cmdline and fields[0] != b"Z":
            mine.append(int(entry))
    return mine


def _reap_group(tenant: TenantDir, info: KeyServerInfo | None, timeout: float = 5.0) -> None:
    """SIGKILL what a dead key server left of its process group, and wait (up to ``timeout``)
    until it is gone: a signal is delivered, not acted on, by the time kill() returns."""
    if info is None:
        return
    deadline = time.monotonic() + timeout
    while (left := _leftovers(tenant, info.pid)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def kmip_client(tenant: TenantDir, info: KeyServerInfo | None = None, **kw: float) -> KmipClient:
    info = info or status(tenant)
    if info is None:
        raise KeyServerError(f"no key server runs for the tenant in {tenant.path} (qemu-mktme keyserver start)")
    return KmipClient(KmipEndpoint(info.kmip_port, tenant.pki), **kw)  # type: ignore[arg-type]


def start(tenant: TenantDir) -> KeyServerInfo:
    """Start the key server in the background (or return the one running); waits until it listens."""
    tenant.require()
    running = status(tenant)
    if running is not None:
        return running
    _reap_group(tenant, _recorded(tenant))          # a server killed with -9 may have left its helper
    (tenant.path / STATE).unlink(missing_ok=True)
    tenant.kmip_dir.mkdir(mode=0o700, exist_ok=True)
    log = open(tenant.kmip_dir / "daemon.log", "ab")  # noqa: SIM115 - closed in the finally below, after Popen
    # The same qemu_mktme as ours, wherever it was imported from (a checkout, a virtualenv).
    package_root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "qemu_mktme.tenant.keyserver", str(tenant.path)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                cwd=str(tenant.path), env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": path})
    finally:
        log.close()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        info = status(tenant)
        if info is not None and info.pid == proc.pid:
            return info
        if proc.poll() is not None:
            tail = (tenant.kmip_dir / "daemon.log").read_text(errors="replace").strip().splitlines()[-1:]
            raise KeyServerError(f"the key server exited at start: {tail[0] if tail else 'no message'} "
                                 f"(see {tenant.kmip_dir / 'daemon.log'})")
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise KeyServerError(f"the key server did not listen within {START_TIMEOUT:g} s")


def stop(tenant: TenantDir, timeout: float = 10.0) -> bool:
    """Stop the tenant's key server; False when none was running."""
    info = status(tenant)
    if info is None:
        _reap_group(tenant, _recorded(tenant))
        (tenant.path / STATE).unlink(missing_ok=True)
        return False
    os.kill(info.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(info) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(info):
        os.kill(info.pid, signal.SIGKILL)
    _reap_group(tenant, info)
    (tenant.path / STATE).unlink(missing_ok=True)
    return True


def _alive(info: KeyServerInfo) -> bool:
    """Whether the key server still runs (a zombie child of ours is reaped and counts as gone)."""
    try:
        if os.waitpid(info.pid, os.WNOHANG)[0] == info.pid:
            return False
    except ChildProcessError:
        pass                                  # not our child: its parent reaps it
    try:
        with open(f"/proc/{info.pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                return False
    except (OSError, IndexError):
        return False
    return process_start_time(info.pid) == info.start_time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(tenant: TenantDir) -> None:
    """The background process: PyKMIP on the main thread, the broker beside it."""
    from .broker import Broker, BrokerServer
    with quiet():
        from kmip.services.server.server import KmipServer
    state = tenant.kmip_dir
    pki = tenant.pki.check()
    broker_log = open(tenant.path / "broker.log", "a", buffering=1)  # noqa: SIM115 - lives as long as the server

    def note(message: str) -> None:
        broker_log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")

    for attempt in range(5):
        port = _free_port()
        conf = server_config(state, pki, port)
        server = KmipServer(config_path=str(conf), log_path=str(state / "server.log"), live_policies=False)
        try:
            server.start()
            break
        except Exception:  # noqa: BLE001  port taken between probe and bind: try another
            if attempt == 4:
                raise
    # accept() wakes twice a second, so that SIGTERM (which only clears a flag) ends serve() promptly
    server._socket.settimeout(0.5)
    kmip = KmipClient(KmipEndpoint(port, pki), persistent=True)
    broker = BrokerServer(Broker(tenant, kmip, logger=note), tenant).start()
    info = {"pid": os.getpid(), "start_time": process_start_time(os.getpid()), "kmip_port": port,
            "broker_port": broker.port, "url": f"https://127.0.0.1:{broker.port}"}
    tmp = tenant.path / (STATE + ".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, tenant.path / STATE)
    note(f"key server started: KMIP on 127.0.0.1:{port}, broker {info['url']}")
    try:
        server.serve()                  # until SIGTERM / SIGINT
    finally:
        broker.stop()
        kmip.close()
        server.stop()
        note("key server stopped")
        broker_log.close()


def main(argv: list[str] | None = None) -> int:
    import warnings
    warnings.simplefilter("ignore")
    args = argv if argv is not None else sys.argv[1:]
    _serve(TenantDir(Path(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
