"""One C source compiled with the system gcc into a shared library in the cache, once per key.

Both of our C parts are built this way on first use: the XTS helper (``engine.native``) and the
TCG plugin shim (``trace.shim``). The caller names the directory from a digest of what the
library depends on (source, flags, headers); the compiler writes a temporary file in it that is
renamed into place, so concurrent and interrupted builds never leave half a library. It sits
beside ``errors`` at the bottom: the engine, below ``files``, builds too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

ENV_CACHE = "QEMU_MKTME_CACHE"


def cache_root() -> Path:
    """Where built things live: ``$QEMU_MKTME_CACHE``, else ``$XDG_CACHE_HOME/qemu-mktme``."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "qemu-mktme"


class CompileFailed(Exception):
    """The compiler could not be run (``output`` says why) or failed (its output)."""

    def __init__(self, output: str) -> None:
        super().__init__(output)
        self.output = output


def compile_library(library: Path, compiler: str, source: Path, flags: Sequence[str],
                    libs: Sequence[str] = (), *, force: bool = False) -> Path:
    """``library``, compiled from ``source`` unless it is there already (``force``: again).

    ``OSError`` if its directory cannot be written, :class:`CompileFailed` if the compiler cannot
    run or fails; nothing is left behind then."""
    if library.is_file() and not force:
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=library.suffix, dir=library.parent)
    os.close(fd)
    try:
        try:
            proc = subprocess.run([compiler, *flags, "-o", tmp, str(source), *libs], capture_output=True,
                                  text=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise CompileFailed(f"cannot run {compiler}: {err}") from err
        if proc.returncode != 0:
            raise CompileFailed((proc.stderr or proc.stdout).strip() or f"exit status {proc.returncode}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, library)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return library


class BuildUnavailable(Exception):
    """A library cannot be built here (one line saying why: no gcc, the compiler's last words)."""


def build_cached(kind: str, source: Path, flags: Sequence[str], libs: Sequence[str] = (), *,
                 key_extra: bytes = b"", cache: Path | None = None, cc: str | None = None,
                 force: bool = False, hint: str = "apt-get install gcc") -> Path:
    """``<cache>/<kind>/<key>/<source stem>.so`` built from ``source`` (:func:`compile_library`),
    the key a digest of the source, the flags and ``key_extra`` (headers it depends on);
    :class:`BuildUnavailable` if it cannot be."""
    try:
        text = source.read_bytes()
    except OSError as err:
        raise BuildUnavailable(f"cannot read {source}: {err.strerror}") from err
    compiler = cc or shutil.which("gcc")
    if compiler is None:
        raise BuildUnavailable(f"gcc not found ({hint})")
    key = hashlib.sha256(text + b"\0" + " ".join((*flags, *libs)).encode() + b"\0" + key_extra).hexdigest()[:24]
    library = (cache or cache_root()) / kind / key / f"{source.stem}.so"
    try:
        return compile_library(library, compiler, source, flags, libs, force=force)
    except OSError as err:
        raise BuildUnavailable(f"cannot write to {library.parent}: {err.strerror}") from err
    except CompileFailed as err:
        last = err.output.splitlines()
        raise BuildUnavailable(f"{compiler} failed on {source.name}: {last[-1] if last else err}") from None
