"""The one exception tree of qemu-mktme.

Users catch by meaning, not by cause::

    MktmeError                      root of everything this package raises on purpose
    ├── ArchitecturalFault          the modelled CPU faulted, as hardware would (not our bug)
    │   ├── GeneralProtection       #GP(0)
    │   └── InvalidOpcode           #UD
    ├── ImageError                  a guest image is missing, corrupt or cannot be built
    ├── QemuError                   the live side: launching and driving QEMU
    │   ├── QemuNotFound            no usable qemu-system-x86_64
    │   ├── LaunchError             QEMU did not come up (carries stderr_tail)
    │   ├── QemuExited              QEMU went away while we needed it
    │   ├── ConsoleTimeout          a console pattern did not appear in time
    │   ├── AttachError             no QEMU to attach to at the given socket / backend
    │   ├── QmpCommandError         QEMU refused a QMP command
    │   └── ShimError               the TCG plugin shim or its tracer: cannot build, load, read
    │       └── AccessTimeout       a watched guest access did not happen in time
    ├── RemoteError                 a running host refused a control request (carries its class:
    │                               a remote SnapshotError is also a SnapshotError here)
    ├── AddressError                an address outside the memory it was used on (carries gpa/hpa)
    ├── HostError                   the host software model
    │   └── KeyServiceError         the mktme key service, with the kernel's errno (EINVAL, ...)
    ├── SnapshotError               dumps and snapshots
    │   └── IntegrityError          a dump or snapshot failed authentication or is malformed
    └── TenantError                 the tenant's side: key server, TPM, attestation, image at rest
        ├── KeyServerError          the KMIP key server or the broker is down, slow or refuses
        ├── TpmError                the host's TPM (swtpm) cannot start or refuses a command
        └── AttestationError        the broker refused a host (says why: signature, nonce, PCR)

Misuse of the Python API (a wrong type, a negative size) is ``ValueError`` / ``TypeError``
naming the parameter, not part of this tree. ``OSError`` and asyncio failures that cross a
public boundary are re-raised as one of these with ``raise ... from err``; cancellation passes
through untouched.
"""

from __future__ import annotations

import errno as _errno
import sys as _sys


class MktmeError(Exception):
    """Root of every error qemu-mktme raises on purpose."""


# --- architectural outcomes -------------------------------------------------------------------


class ArchitecturalFault(MktmeError):
    """The modelled processor raised an exception, exactly as the hardware would.

    Tests tell "the model raised #GP" from "our code broke" by catching this branch.
    """

    vector: str = "?"

    def __init__(self, reason: str, code: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code

    def __str__(self) -> str:
        return f"{self.vector}: {self.reason}"


class GeneralProtection(ArchitecturalFault):
    """#GP(code): e.g. WRMSR of a reserved bit, PCONFIG with a misaligned struct."""

    vector = "#GP(0)"


class InvalidOpcode(ArchitecturalFault):
    """#UD: e.g. PCONFIG when CPUID does not enumerate it, or at CPL > 0."""

    vector = "#UD"


class MachineCheck(ArchitecturalFault):
    """#MC: a CPU access consumed a poisoned line (its integrity MAC did not match).

    ``hpa`` is the line's host-physical address, ``keyid`` the KeyID of the access.
    """

    vector = "#MC"

    def __init__(self, reason: str, *, hpa: int, keyid: int) -> None:
        super().__init__(reason)
        self.hpa = hpa
        self.keyid = keyid


# --- guest images -----------------------------------------------------------------------------


class ImageError(MktmeError):
    """A guest image is missing, corrupt (hash mismatch) or failed to build."""

    def __init__(self, message: str, *, image: str | None = None) -> None:
        super().__init__(message)
        self.image = image


# --- the live side ----------------------------------------------------------------------------


class QemuError(MktmeError):
    """Launching or driving a QEMU process failed."""


class QemuNotFound(QemuError):
    """No usable ``qemu-system-x86_64`` binary."""


class LaunchError(QemuError):
    """QEMU did not come up; ``stderr_tail`` holds the last lines it printed."""

    def __init__(self, message: str, *, stderr_tail: str = "") -> None:
        super().__init__(message)
        self.stderr_tail = stderr_tail

    def __str__(self) -> str:
        msg = super().__str__()
        if self.stderr_tail.strip():
            msg += "\nQEMU said:\n" + self.stderr_tail.rstrip()
        return msg


class QemuExited(LaunchError):
    """QEMU exited while we were waiting on it (``returncode``, ``stderr_tail``)."""

    def __init__(self, message: str, *, returncode: int | None = None, stderr_tail: str = "") -> None:
        super().__init__(message, stderr_tail=stderr_tail)
        self.returncode = returncode


class ConsoleTimeout(QemuError):
    """``pattern`` did not appear on the console within ``timeout`` seconds."""

    def __init__(self, pattern: str, timeout: float, transcript_tail: str) -> None:
        super().__init__(f"console pattern {pattern!r} did not appear within {timeout:g} s")
        self.pattern = pattern
        self.timeout = timeout
        self.transcript_tail = transcript_tail

    def __str__(self) -> str:
        tail = self.transcript_tail.rstrip()
        return super().__str__() + ("\nlast console output:\n" + tail if tail else " (console silent)")


class AttachError(QemuError):
    """Nothing usable to attach to: dead QMP socket, unknown or unmappable RAM backend."""


class QmpCommandError(QemuError):
    """QEMU answered a QMP command with an error (``command``, ``error_class``)."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP {command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class ShimError(QemuError):
    """The TCG plugin shim cannot be built for this QEMU, loaded, or its shared region read."""


class AccessTimeout(ShimError):
    """No guest access to ``[gpa, gpa + nbytes)`` of kind ``on`` within ``timeout`` seconds.

    >>> str(AccessTimeout(0x200000, 16, "store", 5))
    'no guest store to 0x200000+16 within 5 s'
    """

    def __init__(self, gpa: int, nbytes: int, on: str, timeout: float) -> None:
        what = {"both": "load or store"}.get(on, on)
        super().__init__(f"no guest {what} to {gpa:#x}+{nbytes} within {timeout:g} s")
        self.gpa = gpa
        self.nbytes = nbytes
        self.on = on
        self.timeout = timeout


# --- addresses --------------------------------------------------------------------------------


class AddressError(MktmeError, ValueError):
    """An address range outside the memory it was used on.

    Also a ``ValueError``, since passing such an address is usually a caller's mistake.
    """

    def __init__(self, message: str, *, address: int | None = None, nbytes: int | None = None) -> None:
        super().__init__(message)
        self.address = address
        self.nbytes = nbytes


# --- host software model ----------------------------------------------------------------------


class HostError(MktmeError):
    """The host software model (key service, KeyIDs, translation structures, VMs) refused."""


class KeyServiceError(HostError):
    """A ``mktme`` key operation failed with the errno the kernel would return."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(f"{_errno.errorcode.get(err, str(err))}: {message}")
        self.errno = err


# --- dumps and snapshots ----------------------------------------------------------------------


class SnapshotError(MktmeError):
    """A dump or snapshot cannot be written, read or restored."""


class MigrationError(MktmeError):
    """A live migration was refused or failed (the source VM runs on unharmed)."""


class IntegrityError(SnapshotError):
    """Authentication or format check failed: tampered, truncated, reordered or wrong key."""


# --- the tenant's side ------------------------------------------------------------------------


class TenantError(MktmeError):
    """The tenant's side: PKI, key server, TPM, attestation, encrypted images."""


class KeyServerError(TenantError):
    """The KMIP server or the key broker cannot be reached, is too slow, or refuses a request."""


class TpmError(TenantError):
    """The emulated host's TPM cannot start, or refuses a command (e.g. unseal under other PCRs)."""


class AttestationError(TenantError):
    """The key broker refused to release a key to a host; the message says why."""


# --- answers of a running host ----------------------------------------------------------------


class RemoteError(MktmeError):
    """A running host (over its control socket) answered a request with an error.

    ``remote_type`` is the class name the host raised; :func:`remote_error` makes the exception
    an instance of that class too when it is one of this tree (or ``ValueError``), so callers
    catch a refused snapshot as ``SnapshotError`` and a dead host (``AttachError``) apart.
    """

    def __init__(self, message: str, *, remote_type: str = "", host: str = "") -> None:
        Exception.__init__(self, message)       # the remote class's own constructor does not apply
        self.remote_type = remote_type
        self.host = host

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


_REMOTE: dict[str, type[RemoteError]] = {}


def remote_error(remote_type: str, message: str, *, host: str = "") -> RemoteError:
    """A :class:`RemoteError` that is also an instance of the class named ``remote_type`` (a
    class of this module, or ``ValueError``), as a host's control socket reported it."""
    cls = _REMOTE.get(remote_type)
    if cls is None:
        base = getattr(_sys.modules[__name__], remote_type, None)
        if remote_type == "ValueError":
            base = ValueError
        if isinstance(base, type) and issubclass(base, Exception) and base is not RemoteError and \
                (issubclass(base, MktmeError) or base is ValueError):
            cls = type(f"Remote{remote_type}", (RemoteError, base), {"__module__": __name__})
        else:
            cls = RemoteError
        _REMOTE[remote_type] = cls
    err = cls(message, remote_type=remote_type, host=host)
    if isinstance(err, KeyServiceError):
        err.errno = 0
    return err
