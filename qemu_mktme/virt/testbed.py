"""Several machines on one machine, for tests: each a network namespace with its own mount
namespace, its own ``libvirtd``, joined by veth links.

    with Testbed(["tenant", "a", "b"], links=[("tenant", "a"), ("tenant", "b"), ("a", "b")]) as bed:
        bed["a"].run(["virsh", "-c", bed["a"].uri, "list"])

A machine is a holder process made by ``unshare --net --mount`` (util-linux): inside it a tmpfs
over ``/run`` and private directories bind-mounted over ``/var/lib/libvirt``, ``/var/log/libvirt``,
``/var/cache/libvirt`` and ``/etc/libvirt`` (a copy of the system's configuration files, without
its domain and network definitions, plus what the machine needs: ``listen_tcp`` on its own
address, ``auth_tcp = "none"`` (tests only), QEMU as root, ``stdio_handler = "file"``, the
migration TLS directory with certificates naming its address, its hook). Commands run inside it
through ``nsenter`` (the holder's namespaces). Each machine has its *own address* (a /32 on its
loopback, what ``libvirtd`` listens on and its certificates name) and one address per link; routes
send traffic for another machine's own address over the link between the two, so nothing between
machines crosses 127.0.0.1 or the host's network: the addresses exist only inside the namespaces.

Teardown (also after a failure, also of a half-made testbed) stops every process inside a
machine's network namespace (``libvirtd``, QEMU, whatever a test started there: found by the
namespace, killed by pid), ends the holders (which ends the namespaces and their links) and
removes the directories. Written here by hand: no library makes libvirt hosts in namespaces.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import MktmeError

log = logging.getLogger(__name__)

LIBVIRT_DIRS = ("/var/lib/libvirt", "/var/log/libvirt", "/var/cache/libvirt", "/etc/libvirt")
CAPS_CACHE = "qemu/capabilities"
START_TIMEOUT = 60.0


class TestbedError(MktmeError):
    """A machine of a testbed could not be made or reached."""


@dataclass
class NsMachine:
    """One machine: its namespaces (held by ``holder``), its directories and its ``libvirtd``."""

    name: str
    address: str                       # its own address: libvirtd listens here, its certificates name it
    root: Path                         # private directories (bind-mounted inside)
    holder: subprocess.Popen[bytes] | None = None
    libvirtd: int | None = None
    links: dict[str, str] = field(default_factory=dict)     # peer machine -> this machine's interface
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)   # reaped at teardown

    @property
    def uri(self) -> str:
        """libvirt's URI of this machine, reachable from every machine of the testbed."""
        return f"qemu+tcp://{self.address}/system"

    @property
    def pid(self) -> int:
        if self.holder is None:
            raise TestbedError(f"machine {self.name} is not running")
        return self.holder.pid

    def nsenter(self) -> list[str]:
        """The command prefix that runs a command inside this machine."""
        return ["nsenter", f"--target={self.pid}", "--mount", "--net", "--"]

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 60.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside this machine; its output as text."""
        r = subprocess.run([*self.nsenter(), *argv], capture_output=True, text=True, timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise TestbedError(f"{self.name}: {' '.join(argv)}: exit {r.returncode}: {r.stderr.strip() or r.stdout.strip()}")
        return r

    def popen(self, argv: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside this machine (stopped at teardown with everything else in it)."""
        return subprocess.Popen([*self.nsenter(), *argv], **kw)  # type: ignore[call-overload,no-any-return]

    def virsh(self, *args: str, uri: str | None = None, timeout: float = 120.0,
              check: bool = False) -> subprocess.CompletedProcess[str]:
        """``virsh -c URI ARGS`` run inside this machine (default: its own libvirtd)."""
        return self.run(["virsh", "-c", uri or self.uri, *args], check=check, timeout=timeout)

    @property
    def etc(self) -> Path:
        return self.root / "etc/libvirt"

    @property
    def run_dir(self) -> Path:
        """Where this machine's ``/run`` is seen from outside (``/proc/PID/root``)."""
        return Path(f"/proc/{self.pid}/root/run")

    def net_ns(self) -> str:
        return os.readlink(f"/proc/{self.pid}/ns/net")

    def processes(self) -> list[int]:
        """Every process in this machine's network namespace except its holder."""
        ns, own = self.net_ns(), self.pid
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != own:
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/ns/net") == ns:
                        found.append(int(entry))
        return found


class Testbed:
    """``with Testbed(names, links=...) as bed``: the machines, made at entry, removed at exit."""

    def __init__(self, names: Sequence[str], *, links: Iterable[tuple[str, str]] = (),
                 hook: bool = False, libvirtd: bool = True, base: Path | None = None) -> None:
        if len(set(names)) != len(names):
            raise ValueError(f"machine names must be unique, got {list(names)}")
        self.names = list(names)
        self.links = [tuple(pair) for pair in links]
        for a, b in self.links:
            if a not in names or b not in names or a == b:
                raise ValueError(f"a link joins two machines of the testbed, got {a!r}-{b!r}")
        self.hook = hook
        self._with_libvirtd = libvirtd
        self.top = Path(tempfile.mkdtemp(prefix="qemu-mktme-testbed-", dir=base))
        os.chmod(self.top, 0o700)
        self.machines: dict[str, NsMachine] = {}
        self.seconds = 0.0
        self._tag = f"mk{os.getpid() % 100000}{os.urandom(2).hex()}"

    def __getitem__(self, name: str) -> NsMachine:
        return self.machines[name]

    def __enter__(self) -> Testbed:
        t0 = time.monotonic()
        try:
            for n, name in enumerate(self.names):
                self.machines[name] = self._machine(name, f"10.77.0.{n + 1}")
            for n, (a, b) in enumerate(self.links):
                self._link(n, self.machines[a], self.machines[b])
            self._pki()
            if self._with_libvirtd:
                for m in self.machines.values():
                    self._configure(m)
                starting = {m.name: self._libvirtd(m) for m in self.machines.values()}
                for name, proc in starting.items():
                    self._wait_libvirtd(self.machines[name], proc)
        except BaseException:
            self.close()
            raise
        self.seconds = time.monotonic() - t0
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ making

    def _machine(self, name: str, address: str) -> NsMachine:
        root = self.top / name
        for d in ("run", "lib", "log/qemu", "cache", "etc"):
            (root / d).mkdir(parents=True, mode=0o700)
        system = Path("/etc/libvirt")
        # the system's configuration files; not its domain, network or hook definitions
        shutil.copytree(system, root / "etc/libvirt", ignore=lambda d, names: [
            n for n in names if Path(d) == system and n in ("qemu", "hooks", "storage", "secrets")])
        self._seed_caps(root)
        mounts = [f"mount --bind {root / sub} {target}" for sub, target in
                  (("lib", "/var/lib/libvirt"), ("log", "/var/log/libvirt"), ("cache", "/var/cache/libvirt"),
                   ("etc/libvirt", "/etc/libvirt"))]
        script = "; ".join([
            "set -e", "mount --make-rprivate /", "mount -t tmpfs -o mode=0755 tmpfs /run",
            "mkdir -p /run/libvirt /run/lock /run/user/0 && chmod 0700 /run/user/0", *mounts,
            "ip link set lo up", f"ip addr add {address}/32 dev lo", "echo ready", "exec sleep infinity"])
        holder = subprocess.Popen(["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c", script],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                  start_new_session=True)
        machine = NsMachine(name, address, root, holder)
        assert holder.stdout is not None
        line = holder.stdout.readline()
        if line.strip() != b"ready":
            err = holder.stderr.read().decode(errors="replace").strip() if holder.stderr else ""
            holder.kill()
            holder.wait()
            raise TestbedError(f"machine {name}: namespaces not made: {err or line!r}")
        return machine

    def _link(self, n: int, a: NsMachine, b: NsMachine) -> None:
        """A veth pair between ``a`` and ``b``, 10.77.N+1.1 and .2, and routes to each other's own address."""
        ifa, ifb = f"{self._tag}{n}a", f"{self._tag}{n}b"
        subprocess.run(["ip", "link", "add", ifa, "netns", str(a.pid), "type", "veth", "peer", "name", ifb,
                        "netns", str(b.pid)], check=True, capture_output=True)
        net = f"10.77.{n + 1}"
        for m, ifname, mine, peer in ((a, ifa, f"{net}.1", f"{net}.2"), (b, ifb, f"{net}.2", f"{net}.1")):
            other = b if m is a else a
            m.run(["ip", "addr", "add", f"{mine}/24", "dev", ifname])
            m.run(["ip", "link", "set", ifname, "up"])
            m.run(["ip", "route", "add", f"{other.address}/32", "via", peer, "src", m.address])
            m.links[other.name] = ifname

    def _pki(self) -> None:
        """libvirt's migration TLS directory per machine: one CA for the testbed, each machine's
        server and client certificates naming its own address (QEMU's file names)."""
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _cert(_name("qemu-mktme testbed CA"), ca_key.public_key(), ca_key, _name("qemu-mktme testbed CA"), ca=True)
        self.ca = self.top / "ca-cert.pem"
        self.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        for m in self.machines.values():
            d = m.etc / "pki/qemu"
            d.mkdir(parents=True, mode=0o700)
            (d / "ca-cert.pem").write_bytes(self.ca.read_bytes())
            for role, eku in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
                key = ec.generate_private_key(ec.SECP256R1())
                cert = _cert(_name(m.address), key.public_key(), ca_key, ca.subject, eku=eku, address=m.address)
                fd = os.open(d / f"{role}-key.pem", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
                (d / f"{role}-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def _configure(self, m: NsMachine) -> None:
        with open(m.etc / "libvirtd.conf", "a") as f:
            f.write(f'\n# qemu-mktme testbed machine {m.name}\nlisten_tls = 0\nlisten_tcp = 1\n'
                    f'listen_addr = "{m.address}"\nauth_tcp = "none"\nauth_unix_rw = "none"\n'
                    'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
                    'keepalive_interval = 1\nkeepalive_count = 3\n')
        with open(m.etc / "qemu.conf", "a") as f:
            f.write(f'\n# qemu-mktme testbed machine {m.name}\nuser = "root"\ngroup = "root"\n'
                    'dynamic_ownership = 0\nremember_owner = 0\nstdio_handler = "file"\n'
                    'cgroup_controllers = [ ]\nnamespaces = [ ]\nsecurity_driver = "none"\n'
                    f'migration_address = "{m.address}"\nmigration_host = "{m.address}"\n'
                    'migrate_tls_x509_cert_dir = "/etc/libvirt/pki/qemu"\nmigrate_tls_x509_verify = 1\n'
                    'keepalive_interval = 1\nkeepalive_count = 3\n')
        if self.hook:
            from .hooks import install
            install(m.etc)

    def _libvirtd(self, m: NsMachine) -> subprocess.Popen[bytes]:
        with open(m.root / "libvirtd.stderr", "ab") as err:
            proc = m.popen(["libvirtd", "--listen", "--pid-file", "/run/libvirtd.pid"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        m.libvirtd = proc.pid               # nsenter execs libvirtd: the same process
        m.started = [p for p in m.started if p.poll() is None] + [proc]      # a killed one is reaped here
        return proc

    def _wait_libvirtd(self, m: NsMachine, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        sock = m.run_dir / "libvirt/libvirt-sock"
        while not sock.exists():
            if proc.poll() is not None:
                err = (m.root / "libvirtd.stderr").read_text(errors="replace").strip()
                raise TestbedError(f"machine {m.name}: libvirtd exited ({proc.returncode}): {err}")
            if time.monotonic() > deadline:
                raise TestbedError(f"machine {m.name}: libvirtd did not listen within {START_TIMEOUT:g} s")
            time.sleep(0.02)
        while (r := m.virsh("version", timeout=START_TIMEOUT)).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise TestbedError(f"machine {m.name}: libvirtd does not answer on {m.uri}: {r.stderr.strip()}")
            time.sleep(0.05)
        self._keep_caps(m)

    def start_libvirtd(self, name: str) -> None:
        """(Re)start machine ``name``'s libvirtd (after a test killed it) and wait until it answers."""
        m = self.machines[name]
        self._wait_libvirtd(m, self._libvirtd(m))

    # QEMU's capabilities, probed once by a machine's libvirtd, are kept for the next machines
    # (libvirt checks them against the binary and itself, and probes again when stale).

    def _caps_dir(self) -> Path:
        from ..files.cache import cache_root
        return cache_root() / "libvirt-capabilities"

    def _seed_caps(self, root: Path) -> None:
        src = self._caps_dir()
        if src.is_dir():
            shutil.copytree(src, root / "cache" / CAPS_CACHE, dirs_exist_ok=True)

    def _keep_caps(self, m: NsMachine) -> None:
        made = m.root / "cache" / CAPS_CACHE
        if made.is_dir() and any(made.iterdir()):
            dest = self._caps_dir()
            with contextlib.suppress(OSError):
                tmp = Path(tempfile.mkdtemp(dir=dest.parent if dest.parent.is_dir() else None))
                shutil.copytree(made, tmp, dirs_exist_ok=True)
                shutil.rmtree(dest, ignore_errors=True)
                os.replace(tmp, dest)

    # ------------------------------------------------------------------ removing

    def close(self) -> None:
        """Stop everything in every machine (by pid), end the namespaces, remove the directories."""
        for m in self.machines.values():
            if m.holder is None or m.holder.poll() is not None:
                continue
            _stop(m.processes())
        for m in self.machines.values():
            for proc in m.started:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(1)
            if m.holder is not None and m.holder.poll() is None:
                m.holder.kill()
                m.holder.wait()
            if m.holder is not None:
                for stream in (m.holder.stdout, m.holder.stderr):
                    if stream is not None:
                        stream.close()
        self.machines.clear()
        shutil.rmtree(self.top, ignore_errors=True)


def _stop(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM ``pids``, then SIGKILL what is left after ``grace`` seconds; wait until all are gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    left = list(pids)
    while left:
        left = [p for p in left if _alive(p)]
        if left and time.monotonic() > deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + grace
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError, OSError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "qemu-mktme testbed"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: x509.Name, public: ec.EllipticCurvePublicKey, signer: ec.EllipticCurvePrivateKey,
          issuer: x509.Name, *, ca: bool = False, eku: x509.ObjectIdentifier | None = None,
          address: str | None = None, names: Sequence[str] = (), extra: Sequence[str] = ()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public)
         .serial_number(x509.random_serial_number()).not_valid_before(now)
         .not_valid_after(now + datetime.timedelta(days=7))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                          crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    if address is not None:
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in (address, *extra)]
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(signer, hashes.SHA256())


# ---------------------------------------------------------------------------------- the tenant machine


@dataclass
class TenantService:
    """The tenant's key server (PyKMIP + broker) running inside a machine of the testbed."""

    machine: NsMachine
    directory: Path
    url: str
    port: int

    @property
    def ca(self) -> Path:
        return self.directory / "pki" / "ca-cert.pem"


def serve_tenant(machine: NsMachine, directory: Path, *, name: str = "pytest", keys: Sequence[str] = ("vm",)) -> TenantService:
    """A tenant ``name`` in ``directory`` with its key server (``keyserver start --listen``) inside
    ``machine`` on the machine's own address (its certificate names it), and memory keys ``keys``."""
    import sys
    from ..tenant.store import TenantDir
    TenantDir(directory).init(name, server_names=[machine.address])
    script = ("from qemu_mktme.tenant import admin, keyserver; from qemu_mktme.tenant.store import TenantDir; "
              f"t = TenantDir({str(directory)!r}); info = keyserver.start(t, {machine.address!r}); "
              f"[admin.add_key(t, k) for k in {list(keys)!r}]; print(info.url)")
    url = machine.run([sys.executable, "-c", script], timeout=120).stdout.strip().splitlines()[-1]
    return TenantService(machine, directory, url, int(url.rsplit(":", 1)[1]))
