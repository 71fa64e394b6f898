"""A libvirt domain that opts into MKTME: our metadata element, and what the host model needs.

    <domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
      <metadata>
        <mktme:mktme xmlns:mktme='http://qemu-mktme.org/xmlns/libvirt/1'>
          <mktme:tenant>acme</mktme:tenant>
          <mktme:key>vm</mktme:key>
          <mktme:broker>https://10.77.0.1:8443</mktme:broker>
          <mktme:keyid policy='shared'/>
        </mktme:mktme>
      </metadata>
      <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
      <os><kernel>...</kernel><initrd>...</initrd><cmdline>...</cmdline></os>
      <qemu:commandline>     <!-- the host model's own QMP monitor, in the machine's /run -->
        <qemu:arg value='-chardev'/><qemu:arg value='socket,id=mktmeqmp,path=/run/qemu-mktme/libvirt/NAME.qmp,server=on,wait=off'/>
        <qemu:arg value='-mon'/><qemu:arg value='chardev=mktmeqmp,mode=control'/>
      </qemu:commandline>
    </domain>

What the host model needs, checked by :func:`check` (each problem one line saying what to change):
guest RAM in a shared memfd (the host model maps it: the CPU view of the VM's HPA range), a direct
kernel boot (what the host measures for the tenant's broker: the kernel and initrd, PCR 12), and
its own QMP monitor (libvirt holds its own; the binding runs while libvirt waits for the hook, so
it cannot go through libvirt). ``xml.etree`` only: a domain is small and comes from libvirt.
"""

from __future__ import annotations

import os
import urllib.parse
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from ..errors import MktmeError
from ..files.regular import open_regular
from ..qemu.boot import BootSpec

NS = "http://qemu-mktme.org/xmlns/libvirt/1"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
RUN_DIR = Path("/run/qemu-mktme/libvirt")
"""The host model's runtime directory on each machine: its socket, each domain's QMP monitor."""
POLICIES = ("shared", "dedicated")
QMP_ID = "mktmeqmp"

ET.register_namespace("mktme", NS)
ET.register_namespace("qemu", QEMU_NS)


class DomainError(MktmeError):
    """A domain that cannot run under the MKTME host model, or whose XML is not a domain."""


@dataclass(frozen=True)
class Opt:
    """A domain's opt-in: whose key, from which broker, and the KeyID policy (``shared``: the
    tenant's domains with the same key share one KeyID here, as the key service's table does;
    ``dedicated``: a KeyID no other domain uses, or the domain does not start)."""

    tenant: str
    key: str
    broker: str
    policy: str = "shared"


@dataclass(frozen=True)
class Domain:
    """What the host model reads from a domain's XML."""

    name: str
    uuid: str | None
    opt: Opt | None
    emulator: str | None
    boot: BootSpec | None
    memory: int
    memfd_shared: bool
    qmp: str | None

    @property
    def opted_in(self) -> bool:
        return self.opt is not None


def qmp_path(name: str) -> Path:
    return RUN_DIR / f"{name}.qmp"


def _https_url(text: str) -> bool:
    """``https://HOST[:PORT]`` with a host and, when given, a port in 1..65535."""
    try:
        url = urllib.parse.urlsplit(text)
        port = url.port
    except ValueError:
        return False
    return url.scheme == "https" and bool(url.hostname) and (port is None or port > 0)


MAX_XML = 16 << 20
"""A domain's XML is kilobytes; more is not a domain (``/dev/zero`` behind a symlink)."""


def read_xml(path: str | os.PathLike[str]) -> str:
    """The text of the domain XML file at ``path``; ``DomainError`` (one line) for a FIFO, a
    device, a directory, a missing file, more than :data:`MAX_XML` bytes or no UTF-8."""
    fd = open_regular(path, DomainError, f"domain XML {path}")
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_XML + 1)
    if len(data) > MAX_XML:
        raise DomainError(f"domain XML {path}: larger than {MAX_XML >> 20} MiB: not a domain")
    try:
        return data.decode()
    except UnicodeDecodeError as err:
        raise DomainError(f"domain XML {path}: not UTF-8 ({err.reason} at byte {err.start})") from None


def parse(xml: str) -> Domain:
    """The parts of a domain's XML the host model uses (``DomainError`` if it is not a domain)."""
    root = _root(xml)
    name = root.findtext("name")
    if not name:
        raise DomainError("the domain has no <name>")
    opt = None
    meta = root.find(f"metadata/{{{NS}}}mktme")
    if meta is not None:
        keyid = meta.find(f"{{{NS}}}keyid")
        opt = Opt(tenant=(meta.findtext(f"{{{NS}}}tenant") or "").strip(),
                  key=(meta.findtext(f"{{{NS}}}key") or "").strip(),
                  broker=(meta.findtext(f"{{{NS}}}broker") or "").strip(),
                  policy=keyid.get("policy", "shared") if keyid is not None else "shared")
    kernel = root.findtext("os/kernel")
    initrd = root.findtext("os/initrd")
    boot = BootSpec(Path(kernel), Path(initrd) if initrd else None, root.findtext("os/cmdline") or "") if kernel else None
    backing = root.find("memoryBacking")
    memfd_shared = (backing is not None and backing.find("source") is not None
                    and backing.find("source").get("type") == "memfd"  # type: ignore[union-attr]
                    and backing.find("access") is not None
                    and backing.find("access").get("mode") == "shared")  # type: ignore[union-attr]
    qmp = None
    args = [a.get("value", "") for a in root.findall(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")]
    for value in args:
        if value.startswith("socket,") and f"id={QMP_ID}" in value.split(","):
            qmp = next((p[5:] for p in value.split(",") if p.startswith("path=")), None)
    return Domain(name=name, uuid=root.findtext("uuid"), opt=opt, emulator=root.findtext("devices/emulator"),
                  boot=boot, memory=_memory(root), memfd_shared=memfd_shared, qmp=qmp)


def _root(xml: str) -> ET.Element:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        raise DomainError(f"not XML: {err}") from None
    if root.tag != "domain":
        raise DomainError(f"not a libvirt domain: the root element is <{root.tag}>")
    return root


def _memory(root: ET.Element) -> int:
    mem = root.find("memory")
    if mem is None or not (mem.text or "").strip().isdigit():
        return 0
    units = {"b": 1, "bytes": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30,
             "gib": 1 << 30}
    return int(mem.text.strip()) * units.get(mem.get("unit", "KiB").lower(), 1 << 10)  # type: ignore[union-attr]


def problems(d: Domain) -> list[str]:
    """Why domain ``d`` cannot run under the host model (empty: it can)."""
    out = []
    if d.opt is None:
        out.append(f"domain {d.name} has no <mktme:mktme> metadata element (namespace {NS}): it does not opt in")
    else:
        if not d.opt.tenant or not d.opt.key:
            out.append(f"domain {d.name}: <mktme:mktme> needs <mktme:tenant> and <mktme:key>")
        if not _https_url(d.opt.broker):
            out.append(f"domain {d.name}: <mktme:broker> must be the tenant's broker URL (https://HOST:PORT), "
                       f"got {d.opt.broker!r}")
        if d.opt.policy not in POLICIES:
            out.append(f"domain {d.name}: <mktme:keyid policy=...> must be one of {', '.join(POLICIES)}, "
                       f"got {d.opt.policy!r}")
    if not d.memfd_shared:
        out.append(f"domain {d.name}: guest RAM must be a shared memfd (the host model maps it): add "
                   "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>")
    if d.boot is None:
        out.append(f"domain {d.name}: needs a direct kernel boot (<os><kernel>...</kernel>): the host measures "
                   "the kernel and initrd for the tenant's broker")
    if d.qmp is None:
        out.append(f"domain {d.name}: needs the host model's QMP monitor: <qemu:commandline> with -chardev "
                   f"socket,id={QMP_ID},path={qmp_path(d.name)},server=on,wait=off -mon chardev={QMP_ID},mode=control "
                   "('qemu-mktme libvirt domain-xml --check' can add it)")
    return out


def check(xml: str) -> Domain:
    """The domain, or ``DomainError`` listing every problem."""
    d = parse(xml)
    found = problems(d)
    if found:
        raise DomainError("\n".join(found))
    return d


def opt_in(xml: str, opt: Opt) -> str:
    """``xml`` made to opt in: our metadata (replacing any), shared memfd RAM, the host model's QMP
    monitor. Everything else of the user's domain is kept. ``DomainError`` when it has no direct
    kernel boot (that cannot be added for them)."""
    root = _root(xml)
    name = root.findtext("name") or ""
    meta = root.find("metadata")
    if meta is None:
        meta = _insert_after(root, "metadata", ("uuid", "name"))
    for old in meta.findall(f"{{{NS}}}mktme"):
        meta.remove(old)
    meta.append(_opt_element(opt))
    backing = root.find("memoryBacking")
    if backing is None:
        backing = _insert_after(root, "memoryBacking", ("currentMemory", "memory"))
    for tag, attr, value in (("source", "type", "memfd"), ("access", "mode", "shared")):
        el = backing.find(tag)
        if el is None:
            el = ET.SubElement(backing, tag)
        el.set(attr, value)
    cmd = root.find(f"{{{QEMU_NS}}}commandline")
    if cmd is None:
        cmd = ET.SubElement(root, f"{{{QEMU_NS}}}commandline")
    values = [a.get("value", "") for a in cmd.findall(f"{{{QEMU_NS}}}arg")]
    if not any(f"id={QMP_ID}" in v.split(",") for v in values):
        for value in ("-chardev", f"socket,id={QMP_ID},path={qmp_path(name)},server=on,wait=off",
                      "-mon", f"chardev={QMP_ID},mode=control"):
            ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", value=value)
    ET.indent(root)
    out = ET.tostring(root, encoding="unicode")
    d = parse(out)
    if d.boot is None:
        raise DomainError(problems(d)[0] if problems(d) else f"domain {name}: no direct kernel boot")
    return out


def _opt_element(opt: Opt) -> ET.Element:
    el = ET.Element(f"{{{NS}}}mktme")
    for tag, text in (("tenant", opt.tenant), ("key", opt.key), ("broker", opt.broker)):
        ET.SubElement(el, f"{{{NS}}}{tag}").text = text
    ET.SubElement(el, f"{{{NS}}}keyid", policy=opt.policy)
    return el


def _insert_after(root: ET.Element, tag: str, after: tuple[str, ...]) -> ET.Element:
    el = ET.Element(tag)
    children = list(root)
    for name in after:
        found = [i for i, c in enumerate(children) if c.tag == name]
        if found:
            root.insert(found[-1] + 1, el)
            return el
    root.insert(0, el)
    return el


def guest_domain(name: str, boot: BootSpec, *, memory: int, opt: Opt | None, emulator: str,
                 serial_log: str | None = None, vcpus: int = 1) -> str:
    """A domain for one of the guests we ship (``boot``), opted in when ``opt`` is given. The
    serial console goes to ``serial_log`` (a file on the machine that runs it) or a pty."""
    serial = (f"<serial type='file'><source path='{_attr(serial_log)}' append='on'/><target port='0'/></serial>"
              if serial_log else "<serial type='pty'><target port='0'/></serial>")
    initrd = f"<initrd>{_text(str(boot.initrd))}</initrd>" if boot.initrd else ""
    xml = (f"<domain type='qemu' xmlns:qemu='{QEMU_NS}'><name>{_text(name)}</name>"
           f"<memory unit='MiB'>{memory >> 20}</memory><vcpu>{vcpus}</vcpu>"
           "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>"
           f"<os><type arch='x86_64' machine='q35'>hvm</type><kernel>{_text(str(boot.kernel))}</kernel>{initrd}"
           f"<cmdline>{_text(boot.append)}</cmdline></os>"
           "<on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>"
           f"<devices><emulator>{_text(emulator)}</emulator>{serial}<memballoon model='none'/></devices></domain>")
    return opt_in(xml, opt) if opt is not None else xml


def _text(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _attr(s: str | None) -> str:
    return _text(s or "").replace("'", "&apos;")
