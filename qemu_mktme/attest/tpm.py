"""Each emulated host's TPM 2.0: a ``swtpm`` process, driven through tpm2-pytss (ESAPI).

The TPM does what only it can: hold PCRs that measured launch extends, sign quotes over them with
an attestation key (AK) that never leaves it, unwrap keys released to it (ECDH with a key that
never leaves it) and seal the node key to PCR values. Everything here is the TCG's, done by
swtpm and tpm2-tss; this module only chooses templates and flushes what it loads (there is no
resource manager: a transient object left behind fills the TPM's three object slots).

Keys are *primary* keys: derived from the hierarchy seed (kept in the swtpm state directory) and
the template, so the same AK and binding key come back at every start without storing anything.
swtpm starts with ``startup-clear``: PCRs are reset at every host boot, as on a real machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TpmError
from ..files import runtime
from ..qemu.machine import set_pdeathsig

log = logging.getLogger(__name__)

PCRS = (8, 9, 10, 11, 12)
"""PCRs measured launch extends (8-15 are free for OS use; 16 is the resettable debug PCR)."""
PCR_SELECTION = "sha256:" + ",".join(map(str, PCRS))
START_TIMEOUT = 5.0

# noda: these keys have no password to guess, and a host killed without TPM2_Shutdown would
# otherwise count as a failed authorization at each restart until the TPM locks out (DA lockout).
_AK_ATTRS = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign|noda"
_BIND_ATTRS = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|decrypt|noda"
_SRK_ATTRS = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|decrypt|noda"


def pytss():
    """tpm2-pytss, imported on first use (it loads libtss2 and is only needed by TPM users)."""
    os.environ.setdefault("TSS2_LOG", "all+NONE")     # tpm2-tss logs refusals we report ourselves
    try:
        import tpm2_pytss
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise TpmError(f"tpm2-pytss is not usable ({err}); run scripts/setup-host.sh, then pip install 'qemu-mktme[tenant]'") from None
    return tpm2_pytss


_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def _spawn(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """``Popen`` with PR_SET_PDEATHSIG, from one thread that lives as long as this process.

    The kernel sends the death signal when the *thread* that forked the child exits, so a
    swtpm started from a short-lived worker thread would die with it; started from here, it
    dies only with the host process (kill -9 included) and never outlives it holding its
    state directory's lock. (swtpm's own ``--terminate`` does not fit: tpm2-tss's swtpm TCTI
    reconnects for every command.)
    """
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(1, thread_name_prefix="swtpm-spawner")
    setpriv = shutil.which("setpriv")
    if setpriv:
        # util-linux's setpriv sets the death signal and execs swtpm: no Python code between fork
        # and exec, so subprocess can vfork (a fork of this large process, GIL held, costs 10-40 ms
        # on a busy machine, on the attested launch's critical path)
        return _spawner.submit(_popen, [setpriv, "--pdeathsig", "KILL", "--", *argv], **kwargs).result()
    return _spawner.submit(_popen, argv, preexec_fn=set_pdeathsig, **kwargs).result()


def _popen(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, **kwargs)


class Swtpm:
    """A ``swtpm socket --tpm2`` process with its state in ``state_dir`` (created 0700).

    ``with Swtpm(dir) as s: Tpm(s.socket)``. The sockets live in a private runtime directory;
    the state directory keeps the TPM's seeds, so keys derived from them survive restarts.
    """

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.state_dir = Path(state_dir)
        self.proc: subprocess.Popen[bytes] | None = None
        self._rundir: Path | None = None
        self._lock_fd: int | None = None

    def _lock(self) -> None:
        """One running TPM per state directory, decided before swtpm starts: swtpm's own lock is
        taken only after it listens, so a second one could look started and fail later."""
        fd = os.open(self.state_dir / "host.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TpmError(f"the TPM state in {self.state_dir} is in use by another running host "
                           "(one swtpm per host directory)") from None
        self._lock_fd = fd

    @property
    def socket(self) -> Path:
        assert self._rundir is not None, "swtpm not started"
        return self._rundir / "tpm.sock"

    def start(self) -> Swtpm:
        binary = shutil.which("swtpm")
        if binary is None:
            raise TpmError("swtpm is not installed (Debian package swtpm); run scripts/setup-host.sh")
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock()
        try:
            self._rundir = runtime.make_runtime_dir("swtpm")
        except BaseException:
            self.stop()
            raise
        sock = self.socket
        self.proc = _spawn(
            [binary, "socket", "--tpm2", "--tpmstate", f"dir={self.state_dir},mode=0600",
             "--server", f"type=unixio,path={sock}", "--ctrl", f"type=unixio,path={sock}.ctrl",
             "--flags", "not-need-init,startup-clear"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace").strip() if self.proc.stderr else ""
                self.stop()
                if "lock" in err:
                    raise TpmError(f"the TPM state in {self.state_dir} is in use by another running host "
                                   "(one swtpm per host directory)")
                raise TpmError(f"swtpm exited at start ({err.splitlines()[-1] if err else 'no message'})")
            if sock.exists() and Path(f"{sock}.ctrl").exists():   # bound; Tpm retries its first connect
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise TpmError(f"swtpm did not listen on {sock} within {START_TIMEOUT:g} s")
            time.sleep(0.002)            # swtpm listens within ~5 ms: a coarse poll would double that

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            if self.proc.stderr:
                self.proc.stderr.close()
            self.proc = None
        if self._rundir is not None:
            shutil.rmtree(self._rundir, ignore_errors=True)
            self._rundir = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)                # releases the flock
            self._lock_fd = None

    def __enter__(self) -> Swtpm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class Quote:
    """A TPM2_Quote: the marshalled TPMS_ATTEST the TPM signed and its DER ECDSA signature."""

    attest: bytes
    signature: bytes


@dataclass(frozen=True)
class SealedBlob:
    """A sealed object as the TPM exports it (TPM2B_PUBLIC, TPM2B_PRIVATE marshalled): useless
    without this TPM and its PCRs in the sealed state."""

    public: bytes
    private: bytes

    def to_bytes(self) -> bytes:
        return len(self.public).to_bytes(2, "big") + self.public + self.private

    @classmethod
    def from_bytes(cls, data: bytes) -> SealedBlob:
        if len(data) < 2 or len(data) < 2 + int.from_bytes(data[:2], "big"):
            raise TpmError("sealed blob is truncated")
        n = int.from_bytes(data[:2], "big")
        return cls(data[2:2 + n], data[2 + n:])


class Tpm:
    """ESAPI over one swtpm socket. Every method loads what it needs and flushes it again."""

    def __init__(self, socket_path: str | os.PathLike[str]) -> None:
        t = pytss()
        self._publics: dict[str, tuple[bytes, bytes]] = {}   # AK and binding key: public area, name
        for _attempt in range(100):              # the data channel may listen a moment after ctrl
            try:
                self._esys = t.ESAPI(t.TCTILdr("swtpm", f"path={socket_path}"))
                return
            except Exception as err:  # noqa: BLE001 - tpm2-tss raises its own types
                last = err
                time.sleep(0.002)
        raise TpmError(f"cannot open the TPM at {socket_path}: {last}")

    def close(self) -> None:
        """TPM2_Shutdown (an orderly shutdown, as a host's firmware does), then release the TCTI."""
        t = pytss()
        try:
            self._esys.shutdown(t.TPM2_SU.CLEAR)
        except Exception as err:  # noqa: BLE001 - a TPM already gone needs no shutdown
            log.debug("TPM2_Shutdown: %s", err)
        self._esys.close()

    def __enter__(self) -> Tpm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ PCRs

    def extend(self, pcr: int, digest: bytes) -> None:
        t = pytss()
        values = t.TPML_DIGEST_VALUES([t.TPMT_HA(hashAlg=t.TPM2_ALG.SHA256, digest=t.TPMU_HA(sha256=digest))])
        self._call("PCR_Extend", self._esys.pcr_extend, t.ESYS_TR.parse(f"pcr{pcr}"), values)

    def read(self, pcrs: Sequence[int] = PCRS) -> dict[int, bytes]:
        _, _, digests = self._call("PCR_Read", self._esys.pcr_read, "sha256:" + ",".join(map(str, pcrs)))
        return {p: bytes(d) for p, d in zip(pcrs, digests)}

    # ------------------------------------------------------------------ keys

    @contextlib.contextmanager
    def _primary(self, template: str, attrs: str, hierarchy: str) -> Iterator[tuple[object, object]]:
        t = pytss()
        public = t.TPM2B_PUBLIC.parse(template, objectAttributes=attrs)
        handle, out_public, *_ = self._call("CreatePrimary", self._esys.create_primary, t.TPM2B_SENSITIVE_CREATE(),
                                             public, getattr(t.ESYS_TR, hierarchy))
        try:
            yield handle, out_public
        finally:
            self._esys.flush_context(handle)

    def _ak(self):
        return self._primary("ecc256:ecdsa-sha256:null", _AK_ATTRS, "ENDORSEMENT")

    def _binding(self):
        return self._primary("ecc256:null:null", _BIND_ATTRS, "OWNER")

    def _public(self, which: str) -> tuple[bytes, bytes]:
        """A primary key's public area and name; kept (a primary from the same template and seed
        is the same key for as long as this TPM runs, and a seed changes only with TPM2_Clear)."""
        if which not in self._publics:
            with (self._ak() if which == "ak" else self._binding()) as (_, public):
                self._publics[which] = (bytes(public.marshal()), bytes(public.get_name()))
        return self._publics[which]

    def ak_public(self) -> bytes:
        """The attestation key's TPM2B_PUBLIC, marshalled (what a verifier enrols)."""
        return self._public("ak")[0]

    def binding_public(self) -> bytes:
        """The key-release (binding) key's TPM2B_PUBLIC, marshalled: keys are released to it."""
        return self._public("binding")[0]

    def binding_name(self) -> bytes:
        """The binding key's TPM name (nameAlg || digest of its public area)."""
        return self._public("binding")[1]

    def quote(self, nonce: bytes, pcrs: str = PCR_SELECTION) -> Quote:
        """TPM2_Quote over ``pcrs`` with ``nonce`` as qualifying data, signed by the AK."""
        t = pytss()
        with self._ak() as (ak, _):
            attest, sig = self._call("Quote", self._esys.quote, ak, pcrs, t.TPM2B_DATA(nonce))
        return Quote(bytes(attest.marshal())[2:], _der_signature(sig))

    def certify_binding(self, nonce: bytes) -> Quote:
        """TPM2_Certify of the binding key by the AK: proof that the binding key lives in this TPM."""
        t = pytss()
        with self._ak() as (ak, _), self._binding() as (bind, _):
            attest, sig = self._call("Certify", self._esys.certify, bind, ak, t.TPM2B_DATA(nonce),
                                     t.TPMT_SIG_SCHEME(scheme=t.TPM2_ALG.NULL))
        return Quote(bytes(attest.marshal())[2:], _der_signature(sig))

    def quote_and_certify(self, nonce: bytes, pcrs: str = PCR_SELECTION) -> tuple[Quote, Quote]:
        """:meth:`quote` and :meth:`certify_binding` for one nonce, the AK created once for both."""
        t = pytss()
        with self._ak() as (ak, _):
            attest, sig = self._call("Quote", self._esys.quote, ak, pcrs, t.TPM2B_DATA(nonce))
            quote = Quote(bytes(attest.marshal())[2:], _der_signature(sig))
            with self._binding() as (bind, _):
                attest, sig = self._call("Certify", self._esys.certify, bind, ak, t.TPM2B_DATA(nonce),
                                         t.TPMT_SIG_SCHEME(scheme=t.TPM2_ALG.NULL))
        return quote, Quote(bytes(attest.marshal())[2:], _der_signature(sig))

    def ecdh(self, x: bytes, y: bytes) -> bytes:
        """TPM2_ECDH_ZGen with the binding key: the shared secret's x coordinate."""
        return self.ecdh_all([(x, y)])[0]

    def ecdh_all(self, points: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
        """:meth:`ecdh` for several points, with the binding key loaded once."""
        t = pytss()
        out = []
        with self._binding() as (bind, _):
            for x, y in points:
                z = self._call("ECDH_ZGen", self._esys.ecdh_zgen, bind, t.TPM2B_ECC_POINT(t.TPMS_ECC_POINT(x=x, y=y)))
                out.append(bytes(z.point.x))     # z stays referenced: .point.x points into its memory
        return out

    # ------------------------------------------------------------------ sealing

    def _pcr_policy_digest(self, pcrs: str, trial: bool) -> tuple[object, bytes]:
        t = pytss()
        kind = t.TPM2_SE.TRIAL if trial else t.TPM2_SE.POLICY
        session = self._esys.start_auth_session(t.ESYS_TR.NONE, t.ESYS_TR.NONE, kind,
                                                t.TPMT_SYM_DEF(algorithm=t.TPM2_ALG.NULL), t.TPM2_ALG.SHA256)
        try:
            self._call("PolicyPCR", self._esys.policy_pcr, session, t.TPM2B_DIGEST(), pcrs)
            digest = bytes(self._esys.policy_get_digest(session))
        except BaseException:
            self._esys.flush_context(session)
            raise
        return session, digest

    def seal(self, secret: bytes, pcrs: str = PCR_SELECTION) -> SealedBlob:
        """Seal ``secret`` (<= 128 bytes) to the current values of ``pcrs`` under the storage key."""
        t = pytss()
        session, policy = self._pcr_policy_digest(pcrs, trial=True)
        self._esys.flush_context(session)
        public = t.TPM2B_PUBLIC(t.TPMT_PUBLIC(
            type=t.TPM2_ALG.KEYEDHASH, nameAlg=t.TPM2_ALG.SHA256,
            objectAttributes=t.TPMA_OBJECT.FIXEDTPM | t.TPMA_OBJECT.FIXEDPARENT | t.TPMA_OBJECT.NODA,
            authPolicy=policy,
            parameters=t.TPMU_PUBLIC_PARMS(keyedHashDetail=t.TPMS_KEYEDHASH_PARMS(
                scheme=t.TPMT_KEYEDHASH_SCHEME(scheme=t.TPM2_ALG.NULL)))))
        sensitive = t.TPM2B_SENSITIVE_CREATE(t.TPMS_SENSITIVE_CREATE(data=t.TPM2B_SENSITIVE_DATA(secret)))
        with self._primary("ecc256:aes128cfb", _SRK_ATTRS, "OWNER") as (srk, _):
            private, out_public, *_ = self._call("Create", self._esys.create, srk, sensitive, public)
        return SealedBlob(bytes(out_public.marshal()), bytes(private.marshal()))

    def unseal(self, blob: SealedBlob, pcrs: str = PCR_SELECTION) -> bytes:
        """The sealed secret, or ``TpmError`` when the PCRs differ from the sealed state."""
        t = pytss()
        try:
            public, _ = t.TPM2B_PUBLIC.unmarshal(blob.public)
            private, _ = t.TPM2B_PRIVATE.unmarshal(blob.private)
        except Exception:  # noqa: BLE001
            raise TpmError("sealed blob is corrupt") from None
        with self._primary("ecc256:aes128cfb", _SRK_ATTRS, "OWNER") as (srk, _):
            handle = self._call("Load", self._esys.load, srk, private, public)
        try:
            session, _ = self._pcr_policy_digest(pcrs, trial=False)
            try:
                return bytes(self._call("Unseal", self._esys.unseal, handle, session))
            finally:
                self._esys.flush_context(session)
        finally:
            self._esys.flush_context(handle)

    def _call(self, name: str, fn, *args):
        try:
            return fn(*args)
        except TpmError:
            raise
        except Exception as err:  # noqa: BLE001 - tpm2-tss raises TSS2_Exception and friends
            raise TpmError(f"TPM2_{name}: {err}") from None


def _der_signature(sig) -> bytes:
    """A TPMT_SIGNATURE (ECDSA) as the DER that ``cryptography`` verifies."""
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    ecdsa = sig.signature.ecdsa
    return encode_dss_signature(int.from_bytes(bytes(ecdsa.signatureR), "big"),
                                int.from_bytes(bytes(ecdsa.signatureS), "big"))
