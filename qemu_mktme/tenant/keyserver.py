"""``qemu-mktme keyserver start|stop|status``: the tenant's PyKMIP server and key broker, as one
background process with its state in the tenant directory.

The process (``python -m qemu_mktme.tenant.keyserver TENANT``) runs PyKMIP's ``KmipServer``
on the main thread (it installs its own SIGTERM handler) and the broker's HTTPS server in a
thread, then writes ``TENANT/keyserver.json`` (pid, its start time, both ports, the broker URL)
once both listen. ``stop`` signals only the pid recorded there, and only while that process is
still the one that wrote it (same start time).

Both listen on loopback unless ``start`` is given another address (``--listen ADDR[:PORT]``:
the broker's port, any free one by default; KMIP on the same address, ``kmip_port``). PyKMIP
is served with per-connection deadlines and a bound on sessions (:func:`.kmip.serve_bounded`),
the broker likewise (:class:`.broker.BrokerServer`): one silent client stalls neither.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import KeyServerError, TenantError
from ..files.runtime import process_start_time
from .kmip import KmipClient, KmipEndpoint, quiet, serve_bounded, server_config
from .store import TenantDir

STATE = "keyserver.json"
START_TIMEOUT = 30.0


@dataclass(frozen=True)
class KeyServerInfo:
    pid: int
    start_time: int
    kmip_port: int
    broker_port: int
    address: str = "127.0.0.1"
    """Where both listen (``0.0.0.0``: every IPv4 address of the machine)."""

    @property
    def local_address(self) -> str:
        """The address a client on this machine dials (loopback for a wildcard)."""
        return "127.0.0.1" if self.address == "0.0.0.0" else self.address

    @property
    def url(self) -> str:
        return broker_url(self.local_address, self.broker_port)

    def to_json(self) -> dict[str, object]:
        return {"pid": self.pid, "start_time": self.start_time, "kmip_port": self.kmip_port,
                "broker_port": self.broker_port, "address": self.address, "url": self.url}


def broker_url(address: str, port: int) -> str:
    """``https://ADDRESS:PORT`` (an IPv6 address in brackets)."""
    return f"https://[{address}]:{port}" if ":" in address else f"https://{address}:{port}"


def parse_listen(text: str) -> tuple[str, int]:
    """``ADDR[:PORT]`` (``[V6]:PORT`` for IPv6; ``localhost`` is 127.0.0.1) -> (address, port);
    port 0 when absent (any free port). ``TenantError`` for anything else."""
    host, port = text, "0"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ("0" if not rest else "x")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    host = "127.0.0.1" if host == "localhost" else host
    try:
        addr = ipaddress.ip_address(host)
        if not (port.isascii() and port.isdigit()):   # int() takes "１", " 1", "+1", "1_0"
            raise ValueError(port)
        number = int(port)
    except ValueError:
        raise TenantError(f"--listen wants ADDR[:PORT] with an IP address, got {text!r}") from None
    if not 0 <= number <= 65535:
        raise TenantError(f"--listen port {number} is not in 0..65535")
    if addr.version == 6:
        raise TenantError(f"--listen {text}: PyKMIP's server listens on IPv4 only")
    return str(addr), number


def _recorded(tenant: TenantDir) -> KeyServerInfo | None:
    try:
        obj = json.loads((tenant.path / STATE).read_text())
        return KeyServerInfo(int(obj["pid"]), int(obj["start_time"]), int(obj["kmip_port"]), int(obj["broker_port"]),
                             str(obj.get("address", "127.0.0.1")))
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
    return KmipClient(KmipEndpoint(info.kmip_port, tenant.pki, info.local_address), **kw)  # type: ignore[arg-type]


def start(tenant: TenantDir, listen: str | None = None, *, kmip_port: int = 0) -> KeyServerInfo:
    """Start the key server in the background (or return the one running); waits until it listens.

    ``listen``: ``ADDR[:PORT]`` for both services (PORT: the broker's; None: 127.0.0.1, or
    wherever the running one listens); ``kmip_port``: KMIP's (0: any free port). A running key
    server elsewhere than an explicit ``listen``/``kmip_port`` asks is ``KeyServerError``. Clients check the broker's certificate against the name they dial: give
    the tenant's server certificate that name (``tenant init --server-name``).
    """
    tenant.require()
    address, broker_port = parse_listen(listen or "127.0.0.1")
    if not 0 <= kmip_port <= 65535:
        raise TenantError(f"KMIP port {kmip_port} is not in 0..65535")
    running = status(tenant)
    if running is not None:
        if (listen is not None and (address, broker_port or running.broker_port) != (running.address, running.broker_port)) \
                or kmip_port not in (0, running.kmip_port):
            raise KeyServerError(f"the key server already runs (pid {running.pid}) on {running.address}: KMIP port "
                                 f"{running.kmip_port}, broker port {running.broker_port}; stop it to listen elsewhere")
        return running
    _reap_group(tenant, _recorded(tenant))          # a server killed with -9 may have left its helper
    (tenant.path / STATE).unlink(missing_ok=True)
    tenant.kmip_dir.mkdir(mode=0o700, exist_ok=True)
    log = open(tenant.kmip_dir / "daemon.log", "ab")  # noqa: SIM115 - closed in the finally below, after Popen
    # The same qemu_mktme as ours, wherever it was imported from (a checkout, a virtualenv).
    package_root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "qemu_mktme.tenant.keyserver", str(tenant.path),
                                 address, str(broker_port), str(kmip_port)],
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


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def _serve(tenant: TenantDir, address: str = "127.0.0.1", broker_port: int = 0, kmip_port: int = 0) -> None:
    """The background process: PyKMIP on the main thread, the broker beside it."""
    from .broker import Broker, BrokerServer
    with quiet():
        from kmip.services.server.server import KmipServer
    state = tenant.kmip_dir
    pki = tenant.pki.check()
    # PyKMIP's database holds the tenant's keys: everything this process writes is the tenant's
    # alone (0600), and files an older key server left readable are made so too.
    os.umask(0o077)
    for leftover in (state / "pykmip.db", state / "server.log", tenant.path / "broker.log"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(leftover, 0o600, follow_symlinks=False)
    broker_log = open(tenant.path / "broker.log", "a", buffering=1)  # noqa: SIM115 - lives as long as the server

    def note(message: str) -> None:
        broker_log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")

    local = "127.0.0.1" if address == "0.0.0.0" else address
    for attempt in range(5):
        port = kmip_port or _free_port(address)
        conf = server_config(state, pki, port, address)
        server = KmipServer(config_path=str(conf), log_path=str(state / "server.log"), live_policies=False)
        try:
            server.start()
            break
        except Exception:  # noqa: BLE001  port taken between probe and bind: try another
            if attempt == 4 or kmip_port:
                raise
    kmip = KmipClient(KmipEndpoint(port, pki, local, check_name=False), persistent=True)    # its own PyKMIP
    broker = BrokerServer(Broker(tenant, kmip, logger=note), tenant, broker_port, host=address).start()
    info = KeyServerInfo(os.getpid(), process_start_time(os.getpid()) or 0, port, broker.port, address).to_json()
    tmp = tenant.path / (STATE + ".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, tenant.path / STATE)
    note(f"key server started: KMIP on {address}:{port}, broker on {address}:{broker.port}")
    try:
        serve_bounded(server)           # until SIGTERM / SIGINT
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
    address, broker_port, kmip_port = (args[1:] + ["127.0.0.1", "0", "0"][len(args) - 1:])[:3]
    _serve(TenantDir(Path(args[0])), address, int(broker_port), int(kmip_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
