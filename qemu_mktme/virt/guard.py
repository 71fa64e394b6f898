"""The guard of an incoming domain on a migration's destination (started by the host model).

libvirt runs the destination's hooks (``migrate``, ``prepare``, ``start``, ``started``) before the
migration stream flows, and none after it: at the end, libvirt resumes the guest there without
asking anyone. A host model killed (-9) while the stream flows would leave its QEMU to be resumed
unbound. So when the host model binds a QEMU that waits for a stream (``inmigrate``), it starts
this process, its own (it outlives the host model), with a pipe on its standard input:

- ``done`` on the pipe: the guest resumed here bound, or its QEMU exited: nothing to guard; exit.
- end of file without ``done``: the host model is gone (or stopped). The guard connects to the
  domain's own QMP monitor (free once the host model's connection closed) and asks QEMU's state:
  still ``inmigrate`` (no vCPU has run here, libvirt resumes only after the stream ends): ``quit``.
  The incoming QEMU ends, libvirt's migration fails and the source keeps running the guest (its
  host model still binds it). Any other state is left alone: the stream ended and libvirt may be
  resuming the guest, whose only copy may then be this one (the host model adopts it when it
  starts again). The window left is the milliseconds between the stream's end and libvirt's
  resume, against the whole stream's seconds or minutes.

Standard library only, run by path in isolated mode (like the hook); what it did goes to its
standard error, the host model's log.
"""

import contextlib
import json
import os
import socket
import sys
import time

CONNECT_WAIT = 10.0
"""Seconds to wait for QEMU's monitor to take the guard's connection (it frees as the host model's closes)."""
ANSWER_WAIT = 10.0


def _say(name, text):
    print(f"qemu-mktme guard: domain {name}: {text}", file=sys.stderr, flush=True)


def _start_time(pid):
    """Field 22 of /proc/PID/stat (tells a reused pid from the QEMU guarded); None: no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _connect(path, alive):
    """A connection to QEMU's monitor at ``path``, while ``alive()``; None once QEMU is gone."""
    deadline = time.monotonic() + CONNECT_WAIT
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(ANSWER_WAIT)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
            if not alive():
                return None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _reader(s):
    """QMP messages (one JSON object a line) from ``s``."""
    buf = b""
    while True:
        while b"\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise EOFError("QEMU closed its monitor")
            buf += chunk
        line, buf = buf.split(b"\n", 1)
        if line.strip():
            yield json.loads(line)


def _execute(s, messages, command):
    s.sendall(json.dumps({"execute": command}).encode() + b"\n")
    for msg in messages:
        if "return" in msg:
            return msg["return"]
        if "error" in msg:
            raise RuntimeError(msg["error"].get("desc", "error"))
    raise EOFError("QEMU closed its monitor")


def guard(qmp, name, pid, started, said):
    """What the guard does once its pipe closed with ``said`` on it; its exit status. ``pid``,
    ``started``: the guarded QEMU and its start time."""
    if said.strip() == b"done":
        return 0
    try:
        s = _connect(qmp, lambda: _start_time(pid) == started)
    except OSError as err:
        _say(name, f"its QEMU (pid {pid}) runs, but its monitor {qmp} does not answer ({err.strerror})")
        return 1
    if s is None:
        return 0                                        # QEMU is gone: nothing to end
    try:
        messages = _reader(s)
        next(messages)                                  # the greeting
        _execute(s, messages, "qmp_capabilities")
        status = _execute(s, messages, "query-status").get("status")
        if status != "inmigrate":
            _say(name, f"the host model is gone, but its QEMU is {status!r}, past the migration stream: "
                       "left to the host model's next start")
            return 0
        with contextlib.suppress(EOFError):     # (it exited before answering)
            _execute(s, messages, "quit")       # its answer: QEMU drops what a closed connection asked
        _say(name, "the host model is gone before the guest ran here: its incoming QEMU ended (the "
                   "migration fails; the guest stays on its source)")
        return 0
    except (OSError, EOFError, ValueError, RuntimeError) as err:
        _say(name, f"could not ask its QEMU ({err})")
        return 1
    finally:
        s.close()


def main(argv):
    if len(argv) != 4 or not argv[3].isdigit():
        print("usage: guard.py QMP-SOCKET DOMAIN QEMU-PID (the host model starts it)", file=sys.stderr)
        return 2
    pid = int(argv[3])
    started = _start_time(pid)
    said = os.read(0, 64)
    while said and not said.endswith(b"\n"):
        more = os.read(0, 64)
        if not more:
            break
        said += more
    return guard(argv[1], argv[2], pid, started, said) if started is not None else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
