"""qemu-mktme's libvirt ``qemu`` hook (installed by ``qemu-mktme libvirt hook install``).

libvirt runs it synchronously for each domain operation with the domain's XML on stdin and
waits for it. It does not call back into libvirt: for a domain that opts into MKTME (our
metadata namespace in its XML) it hands the operation to the host model of this machine
(``qemu-mktme host --libvirt``) over the unix socket in this machine's /run and waits for its
answer. A refusal is one line on stderr and exit status 1: libvirt puts it in virsh's error and
does not go on (``prepare``: QEMU never starts; ``started``: libvirt stops the domain). Domains
that do not opt in pass untouched. Standard library only: it runs on every domain operation, so
what only an opted-in domain needs (XML parser, JSON, socket) is imported only for one.
"""

import os
import sys

MARKER = "qemu-mktme libvirt hook"
SOCKET = "/run/qemu-mktme/libvirt/host.sock"
NS = "http://qemu-mktme.org/xmlns/libvirt/1"
OPS = ("migrate", "prepare", "start", "started", "stopped", "release", "reconnect", "restore", "attach")
RELEASING = ("stopped", "release")
TIMEOUT = float(os.environ.get("QEMU_MKTME_HOOK_TIMEOUT", "300"))


def opts_in(xml):
    """The domain carries our metadata element (not merely our namespace's URL somewhere, e.g. in
    its <description>); XML that does not parse goes to the host model, which says what is wrong."""
    if NS not in xml:
        return False
    from xml.etree import ElementTree
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return True
    return root.find(f"metadata/{{{NS}}}mktme") is not None


def main(argv):
    if len(argv) < 3:
        return 0
    name, op = argv[1], argv[2]
    sub = argv[3] if len(argv) > 3 else "-"
    xml = sys.stdin.read()
    if op not in OPS or not opts_in(xml):
        return 0                                  # not ours: libvirt goes on with the original XML
    import json
    import socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    try:
        s.connect(SOCKET)
    except OSError as err:
        s.close()
        if op in RELEASING:
            return 0                              # no host model here: nothing of it to release
        print(f"qemu-mktme: domain {name} opts into MKTME, but no host model runs on this machine ({SOCKET}: "
              f"{err.strerror}): start 'qemu-mktme host --libvirt qemu:///system' first", file=sys.stderr)
        return 1
    try:
        s.sendall(json.dumps({"cmd": "hook", "domain": name, "op": op, "sub": sub, "xml": xml}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as err:
        if op in RELEASING:
            return 0
        print(f"qemu-mktme: domain {name}: the host model did not answer ({err}): see its log", file=sys.stderr)
        return 1
    finally:
        s.close()
    try:
        answer = json.loads(data)
    except ValueError:
        if op in RELEASING:
            return 0
        print(f"qemu-mktme: domain {name}: the host model ended before answering ({op}): see its log",
              file=sys.stderr)
        return 1
    if answer.get("ok"):
        return 0
    print(f"qemu-mktme: {answer.get('error')}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
