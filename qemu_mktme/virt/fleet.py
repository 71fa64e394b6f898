"""Start, migrate and stop domains that opt into MKTME across machines, through libvirt: what
``qemu-mktme libvirt start`` and ``query --libvirt`` call, and the pytest fixture's ``await``
forms. Typed results; :class:`FleetError` with libvirt's message (which carries the hook's, i.e.
the host model's, reason) when libvirt refuses.

    result = start_domain("qemu:///system", "vm1")            # paused start, bound, resumed
    moved = migrate_domain("qemu:///system", "vm1", "qemu+tcp://10.0.0.2/system")
    stop_domain("qemu+tcp://10.0.0.2/system", "vm1")

The host model of each machine is asked over its socket (``socket=``, default the machine's
``/run``) for the binding: KeyID, key handle, tagging state.
"""

from __future__ import annotations

import asyncio
import json
import socket as socketlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MktmeError
from .domain import RUN_DIR

SOCKET = RUN_DIR / "host.sock"
STATES = {0: "nostate", 1: "running", 2: "blocked", 3: "paused", 4: "shutdown", 5: "shutoff", 6: "crashed",
          7: "pmsuspended"}


class FleetError(MktmeError):
    """libvirt or a machine's host model refused an operation (the message says why)."""


@dataclass(frozen=True)
class DomainBinding:
    """A libvirt domain and, when bound, its MKTME state on that machine."""

    domain: str
    state: str
    keyid: int | None = None
    handle: str | None = None
    tenant: str | None = None
    key: str | None = None
    tagged: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class StartResult:
    domain: str
    host: str
    keyid: int
    handle: str
    seconds: float


@dataclass(frozen=True)
class MigrateResult:
    domain: str
    source: str
    dest: str
    seconds: float


def host_request(cmd: str, *, socket: Path | None = None, timeout: float = 60.0, **args: Any) -> Any:
    """One request to a machine's host model (``FleetError`` when it is not running or refuses)."""
    path = socket or SOCKET
    s = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        with s.makefile("rb") as f:
            while (data := f.readline()).startswith(b'{"progress"'):     # long commands stream progress first
                pass
    except OSError as err:
        raise FleetError(f"the host model at {path} is not reachable ({err.strerror or err}): is "
                         "'qemu-mktme host --libvirt URI' running on that machine?") from None
    finally:
        s.close()
    try:
        answer = json.loads(data)
    except ValueError:
        raise FleetError(f"the host model at {path} closed the connection without answering") from None
    if not answer.get("ok"):
        raise FleetError(str(answer.get("error")))
    return answer["result"]


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt's default error handler prints every error to stderr as well: the error we raise says it."""


def open_libvirt(uri: str) -> Any:
    """A libvirt connection to ``uri``; ``FleetError`` (one line, libvirt's reason) when there is none."""
    import libvirt
    libvirt.registerErrorHandler(_quiet, None)
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as err:
        raise FleetError(f"cannot connect to libvirt at {uri}: {err.get_error_message()}") from None


def _domain(conn: Any, name: str) -> Any:
    import libvirt
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as err:
        raise FleetError(err.get_error_message()) from None


def domain_bindings(uri: str, *, socket: Path | None = None) -> dict[str, DomainBinding]:
    """Every domain of libvirt at ``uri`` with its state, and the host model's binding of it."""
    conn = open_libvirt(uri)
    try:
        domains = {d.name(): STATES.get(d.state()[0], "?") for d in conn.listAllDomains()}
    finally:
        conn.close()
    try:
        bound = host_request("bindings", socket=socket)["domains"]
    except FleetError:
        bound = {}
    out = {}
    for name, state in sorted(domains.items()):
        b = bound.get(name)
        out[name] = DomainBinding(name, state, **({"keyid": b["keyid"], "handle": b["handle"], "tenant": b["tenant"],
                                                    "key": b["key"], "tagged": b["tagged"]} if b else {}))
    return out


def start_domain(uri: str, name: str, *, socket: Path | None = None, timeout: float = 120.0) -> StartResult:
    """Start domain ``name`` paused; the host model binds it and resumes it; wait for it to run."""
    import libvirt
    t0 = time.monotonic()
    conn = open_libvirt(uri)
    try:
        dom = _domain(conn, name)
        try:
            dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
        except libvirt.libvirtError as err:
            raise FleetError(f"{name}: {err.get_error_message()}") from None
        deadline = time.monotonic() + timeout
        while dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING:
            if time.monotonic() > deadline or not dom.isActive():
                raise FleetError(f"{name}: not running {timeout:g} s after its start (state "
                                 f"{STATES.get(dom.state()[0])}): see the host model's log")
            time.sleep(0.02)
        seconds = time.monotonic() - t0
    finally:
        conn.close()
    b = host_request("bindings", socket=socket)
    mine = b["domains"].get(name)
    if mine is None:
        raise FleetError(f"{name} runs but the host model of this machine has no binding of it")
    return StartResult(name, b["host"], mine["keyid"], mine["handle"], seconds)


def migrate_domain(uri: str, name: str, dest_uri: str, *, tls: bool = True, timeout: float = 600.0) -> MigrateResult:
    """``virsh migrate --live --p2p [--tls] NAME DEST``: the destination's host model binds a KeyID
    of its own before its vCPUs run; the source's is released once libvirt completed it."""
    import libvirt
    flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | (libvirt.VIR_MIGRATE_TLS if tls else 0)
    t0 = time.monotonic()
    conn = open_libvirt(uri)
    try:
        dom = _domain(conn, name)
        try:
            dom.migrateToURI3(dest_uri, {}, flags)
        except libvirt.libvirtError as err:
            raise FleetError(f"{name}: migration to {dest_uri} failed: {err.get_error_message()}") from None
    finally:
        conn.close()
    return MigrateResult(name, uri, dest_uri, time.monotonic() - t0)


def stop_domain(uri: str, name: str) -> None:
    """Destroy domain ``name``: its host model releases its KeyID and key."""
    import libvirt
    conn = open_libvirt(uri)
    try:
        try:
            _domain(conn, name).destroy()
        except libvirt.libvirtError as err:
            raise FleetError(f"{name}: {err.get_error_message()}") from None
    finally:
        conn.close()


async def astart(uri: str, name: str, **kw: Any) -> StartResult:
    return await asyncio.to_thread(start_domain, uri, name, **kw)


async def amigrate(uri: str, name: str, dest_uri: str, **kw: Any) -> MigrateResult:
    return await asyncio.to_thread(migrate_domain, uri, name, dest_uri, **kw)


async def astop(uri: str, name: str) -> None:
    await asyncio.to_thread(stop_domain, uri, name)
