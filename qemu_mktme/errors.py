"""The one exception tree of qemu-mktme.

Users catch by meaning, not by cause::

    MktmeError                      root of everything this package raises on purpose
    ├── ArchitecturalFault          the modelled CPU faulted, as hardware would (not our bug)
    │   ├── GeneralProtection       #GP(0)
    │   ├── InvalidOpcode           #UD
    │   └── MachineCheck            #MC: a CPU access consumed a poisoned line (integrity mode)
    ├── ImageError                  a guest image is missing, corrupt or cannot be built
    ├── QemuError                   the live side: launching and driving QEMU
    │   ├── QemuNotFound            no usable qemu-system-x86_64
    │   ├── LaunchError             QEMU did not come up (carries stderr_tail)
    │   │   └── QemuExited          QEMU went away while we needed it
    │   ├── ConsoleTimeout          a console pattern did not appear in time
    │   ├── AttachError             no QEMU (or no running host) to attach to at the given socket
    │   ├── QmpCommandError         QEMU refused a QMP command
    │   └── ShimError               the TCG plugin shim or its tracer: cannot build, load, read
    │       └── AccessTimeout       a watched guest access did not happen in time
    ├── AddressError                an address outside the memory it was used on (also a ValueError)
    ├── KeyMaterialError            a key refused at the door: spec, file, KEK (also a ValueError)
    │   └── KeyFileError            a key file that cannot be used (names the file, never its content)
    ├── HostError                   the host software model
    │   └── KeyServiceError         the mktme key service, with the kernel's errno (EINVAL, ...)
    ├── SnapshotError               dumps and snapshots
    │   └── IntegrityError          a dump or snapshot failed authentication or is malformed
    ├── MigrationError              a live migration was refused or failed (the source runs on)
    ├── NvdimmError                 an NVDIMM media image: not one, tampered, in use, misplaced
    ├── TenantError                 the tenant's side: key server, TPM, attestation, image at rest
    │   ├── KeyServerError          the KMIP key server or the broker is down, slow or refuses
    │   ├── TpmError                the host's TPM (swtpm) cannot start or refuses a command
    │   └── AttestationError        the broker refused a host (says why: signature, nonce, PCR)
    └── RemoteError                 a running host's answer on its control socket: also an instance
                                    of the error's own class there (:func:`remote_error`)

Misuse of the Python API (a wrong type, a negative size) is ``ValueError`` / ``TypeError``
naming the parameter, not part of this tree. ``OSError`` and asyncio failures that cross a
public boundary are re-raised as one of these with ``raise ... from err``; cancellation passes
through untouched. Other layers may derive their own (``attack.bus.AttackError``); the tree
above draws this module's classes, and ``tests/test_errors.py`` checks it against them.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import logging
from collections.abc import Iterator


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


class NvdimmError(MktmeError):
    """An NVDIMM media image cannot be used: not a media image, tampered, the wrong size, in use
    by another VM, or (strict) written at another host physical address."""


class IntegrityError(SnapshotError):
    """Authentication or format check failed: tampered, truncated, reordered or wrong key."""


# --- key material ------------------------------------------------------------------------------


class KeyMaterialError(MktmeError, ValueError):
    """A key that cannot be used (:mod:`qemu_mktme.keymaterial`); ``reason`` names the check that
    failed, the same through every door. The message never repeats key material."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class KeyFileError(KeyMaterialError):
    """A key file that cannot be used; the message names the file, never its content."""

    def __init__(self, message: str, reason: str = "file") -> None:
        super().__init__(message, reason)


# --- the tenant's side ------------------------------------------------------------------------


class TenantError(MktmeError):
    """The tenant's side: PKI, key server, TPM, attestation, encrypted images."""


class KeyServerError(TenantError):
    """The KMIP server or the key broker cannot be reached, is too slow, or refuses a request."""


class TpmError(TenantError):
    """The emulated host's TPM cannot start, or refuses a command (e.g. unseal under other PCRs)."""


class AttestationError(TenantError):
    """The key broker refused to release a key to a host; the message says why."""


# --- errors from a running host ---------------------------------------------------------------


class RemoteError(MktmeError):
    """A running host (over its control socket) answered a request with an error.

    ``remote_type`` is the class name the host raised; :func:`remote_error` makes the exception
    an instance of that class too when it is known here (any :class:`MktmeError`, or a builtin
    such as ``ValueError``), so callers catch a refused snapshot as ``SnapshotError`` and a dead
    host (``AttachError``) apart.
    """

    def __init__(self, message: str, *, remote_type: str = "", host: str = "") -> None:
        Exception.__init__(self, message)       # the remote class's own constructor does not apply
        self.remote_type = remote_type
        self.host = host

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


_BUILTIN: dict[str, type[Exception]] = {c.__name__: c for c in (ValueError, TypeError, OSError, LookupError,
                                                               RuntimeError, TimeoutError)}
_REMOTE: dict[str, type[RemoteError]] = {}


def _subclasses(cls: type[Exception]) -> list[type[Exception]]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def remote_error(remote_type: str, message: str, *, host: str = "") -> RemoteError:
    """The client's side of an error answer: a :class:`RemoteError` that is also an instance of
    the class named ``remote_type`` (an :class:`MktmeError` of any layer, or a builtin such as
    ``ValueError``), or a plain ``RemoteError`` for a name not known here."""
    cls = _REMOTE.get(remote_type)
    if cls is None:
        known = {c.__name__: c for c in reversed(_subclasses(MktmeError)) if not issubclass(c, RemoteError)}
        base = known.get(remote_type) or _BUILTIN.get(remote_type)
        if base is None:
            cls = RemoteError
        else:
            cls = _REMOTE[remote_type] = type(f"Remote{remote_type}", (RemoteError, base), {"__module__": __name__})
    err = cls(message, remote_type=remote_type, host=host)
    if isinstance(err, KeyServiceError):
        err.errno = 0                           # the remote errno is in the message
    return err


# --- clean-up whose failure changes nothing for the caller --------------------------------------


@contextlib.contextmanager
def logged(logger: str, what: str, *kinds: type[BaseException]) -> Iterator[None]:
    """``contextlib.suppress(*kinds)`` (default: ``Exception``) that says what it swallowed:
    the error goes to logger ``logger`` (a module's ``__name__``) at debug level, with ``what``
    was being done. For clean-up that must not mask the error or result that matters."""
    caught: tuple[type[BaseException], ...] = kinds or (Exception,)
    try:
        yield
    except caught as err:
        logging.getLogger(logger).debug("%s: %s: %s", what, type(err).__name__, err)
