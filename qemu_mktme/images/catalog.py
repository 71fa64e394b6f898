"""Guest images: built from the recipes in ``guest_images/`` into a cache, pinned by a manifest.

Three images exist:

- ``baremetal``: our own tiny long-mode guest, compiled here with the system gcc/binutils from
  ``guest_images/baremetal``. Boots in a fraction of a second; the fast test guest.
- ``linux``: the **stock** Debian cloud kernel and **stock** ``busybox-static``, fetched with
  ``apt-get download`` and never modified, plus an initramfs generated around them from
  ``guest_images/linux`` (an ``/init`` script and workloads chosen on the kernel command line).
- ``debian``: a full Debian system (systemd, the stock cloud kernel) installed by ``mmdebstrap``
  into an ext4 qcow2 that the guest boots from (``root=/dev/vda``); every package's version is in
  the manifest. Runs get a throwaway qcow2 overlay on it (:func:`overlay_disk`).

Each image directory holds ``manifest.json`` with the sha256 of every artifact (and, for Linux,
the package names, versions and .deb hashes as apt's index gives them). Loading an image
re-checks those hashes, so a corrupt or edited image is an ``ImageError``, not a strange boot.
Builds go to a temporary directory and are renamed into place under a lock: a concurrent or
interrupted build never leaves half an image.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..errors import ImageError
from ..files.cache import cache_root
from ..qemu.boot import BootSpec
from ..qemu.devices import DiskSpec
from . import cpio, system
from .recipes import LINUX_PARAMS, LINUX_WORKLOAD_PARAMS, MIN_MEMORY, RECIPES
from .tools import Say, sha256_file

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class Image:
    """A built, verified guest image."""

    name: str
    directory: Path
    manifest: Mapping[str, Any]

    @property
    def kernel(self) -> Path:
        return self.directory / str(self.manifest["kernel"])

    @property
    def disk(self) -> Path | None:
        """The root disk the image boots from (the Debian system), or None."""
        name = self.manifest.get("disk")
        return self.directory / str(name) if name else None

    @property
    def initrd(self) -> Path | None:
        name = self.manifest.get("initrd")
        return self.directory / str(name) if name else None

    def boot(self, *, workload: str | None = None, commands: Sequence[str] = (),
             params: Mapping[str, object] | None = None, append: str = "") -> BootSpec:
        """The boot of this image running ``workload`` (Linux) or ``commands`` (bare metal).

        ``params`` become ``mktme.NAME=VALUE`` kernel parameters, i.e. ``MKTME_NAME`` in the
        Linux workload's environment.
        """
        parts = [str(self.manifest.get("append", ""))]
        if self.name == "baremetal":
            if workload or params:
                raise ValueError("the bare-metal guest takes commands, not a workload or params")
            bad = [c for c in commands if ";" in c or "\n" in c]
            if bad:
                raise ValueError(f"bare-metal commands must not contain ';' or newlines: {bad[0]!r}")
            parts.append(";".join(commands))
        elif self.disk is not None:
            if commands or params:
                raise ValueError(f"the {self.name} system guest takes a workload (or none: the login prompt), "
                                 "not commands or params")
            if workload:
                self._check_workload(workload, {})
                parts.append(f"mktme.workload={_kernel_word(workload)}")
        else:
            if commands:
                raise ValueError("the Linux guest takes a workload and params, not commands")
            if workload:
                parts.append(f"mktme.workload={_kernel_word(workload)}")
            for key, value in (params or {}).items():
                parts.append(f"mktme.{_kernel_word(str(key))}={_kernel_word(str(value))}")
            self._check_workload(workload or "hello", params or {})
        parts.append(append)
        return BootSpec(self.kernel, self.initrd, " ".join(p for p in parts if p),
                        int(self.manifest.get("min_memory", MIN_MEMORY.get(self.name, 0))), self.name)

    def _check_workload(self, workload: str, params: Mapping[str, object]) -> None:
        """``ValueError`` for a workload the image does not have, or a parameter it does not read."""
        if self.workloads and workload not in self.workloads:
            raise ValueError(f"the {self.name} guest has no workload {workload!r} (have: {', '.join(self.workloads)})")
        if workload not in LINUX_WORKLOAD_PARAMS:
            return
        allowed = (*LINUX_WORKLOAD_PARAMS[workload], "hold")
        for key, value in params.items():
            name = str(key).lower().replace("-", "_")
            if name not in allowed:
                raise ValueError(f"workload {workload} takes no parameter {key!r} "
                                 f"(it takes: {', '.join(allowed)})")
            wrong = LINUX_PARAMS[name](str(value))
            if wrong:
                raise ValueError(f"parameter {key}={value}: {name} must be {wrong}")

    @property
    def workloads(self) -> list[str]:
        return list(self.manifest.get("workloads", []))


def _kernel_word(value: str) -> str:
    if not value or re.search(r"[\s\"']", value):
        raise ValueError(f"kernel command-line value must be one word without quotes: {value!r}")
    return value


# ---------------------------------------------------------------------------------- cache


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _verify(name: str, directory: Path) -> dict[str, Any]:
    """The manifest of an intact image; ``ImageError`` saying what is wrong otherwise."""
    hint = f"(run 'qemu-mktme images build {name}')"
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ImageError(f"image {name!r} is not built: no {path} {hint}", image=name) from None
    except (OSError, ValueError) as err:
        raise ImageError(f"image {name!r}: unreadable manifest {path}: {err} {hint}", image=name) from err
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ImageError(f"image {name!r}: manifest format {manifest.get('format')!r} is not "
                         f"{MANIFEST_FORMAT} {hint}", image=name)
    for artifact, digest in dict(manifest.get("artifacts", {})).items():
        file = directory / artifact
        if not file.is_file():
            raise ImageError(f"image {name!r} is missing {file} {hint}", image=name)
        if _cached_sha256(file) != digest:
            raise ImageError(f"image {name!r} is corrupt: {file} does not match its manifest {hint}",
                             image=name)
    return manifest


_hash_memo: dict[tuple[str, int, int, int], str] = {}


def _cached_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _hash_memo:
        _hash_memo[key] = sha256_file(path)
    return _hash_memo[key]


def load(name: str, *, cache: Path | None = None) -> Image:
    """A built and verified image; ``ImageError`` if it is unknown, missing or corrupt."""
    if name not in RECIPES:
        raise ImageError(f"unknown image {name!r} (known: {', '.join(RECIPES)})", image=name)
    directory = (cache or cache_root()) / "images" / name
    return Image(name, directory, _verify(name, directory))


def is_current(name: str, *, cache: Path | None = None) -> bool:
    """True when the image is built, intact and from the current recipe."""
    try:
        image = load(name, cache=cache)
    except ImageError:
        return False
    return image.manifest.get("recipe_sha256") == RECIPES[name].digest()


@contextlib.contextmanager
def staged_entry(parent: Path, name: str) -> Iterator[Path]:
    """A private work directory in ``parent``; when the block completes it becomes ``parent/name``
    (0755), replacing an older entry in one rename; on any failure it is removed. Callers hold
    the cache lock (:func:`locked`)."""
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=parent))
    try:
        yield work
        os.chmod(work, 0o755)
        final = parent / name
        if final.exists():
            stale = parent / f".{name}-old-{os.getpid()}"
            os.replace(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def build(name: str, *, cache: Path | None = None, force: bool = False,
          progress: Say | None = None) -> Image:
    """Build ``name`` unless an intact image of the current recipe exists (or ``force``)."""
    if name not in RECIPES:
        raise ImageError(f"unknown image {name!r} (known: {', '.join(RECIPES)})", image=name)
    recipe = RECIPES[name]
    root = cache or cache_root()
    say = progress or (lambda _msg: None)
    images = root / "images"
    with locked(root):
        if not force and is_current(name, cache=root):
            return load(name, cache=root)
        started = time.monotonic()
        with staged_entry(images, name) as work:
            fields = recipe.build(work, root, say)
            manifest = {
                "format": MANIFEST_FORMAT,
                "name": name,
                "description": recipe.description,
                "recipe_sha256": recipe.digest(),
                "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **fields,
                "artifacts": {p.name: sha256_file(p) for p in sorted(work.iterdir()) if p.is_file()},
            }
            (work / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        final = images / name
        say(f"built {name} in {time.monotonic() - started:.1f} s into {final}")
        return load(name, cache=root)


@dataclass(frozen=True)
class ImageStatus:
    name: str
    description: str
    directory: Path
    state: str            # "ok", "stale" (recipe changed), "missing" or "corrupt"
    detail: str
    manifest: Mapping[str, Any] | None


def status(*, cache: Path | None = None) -> list[ImageStatus]:
    """The state of every known image, for ``qemu-mktme images list``."""
    root = cache or cache_root()
    out = []
    for name, recipe in RECIPES.items():
        directory = root / "images" / name
        try:
            manifest = _verify(name, directory)
        except ImageError as err:
            state = "missing" if not (directory / MANIFEST).exists() else "corrupt"
            out.append(ImageStatus(name, recipe.description, directory, state, str(err), None))
            continue
        current = manifest.get("recipe_sha256") == recipe.digest()
        packages = [p for p in manifest.get("packages", []) if isinstance(p, dict)]
        if len(packages) > 5:
            detail = f"{len(packages)} packages, kernel {manifest.get('kernel_release')}"
        else:
            detail = ", ".join(f"{p['name']} {p['version']}" for p in packages) or str(manifest.get("toolchain", ""))
        out.append(ImageStatus(name, recipe.description, directory, "ok" if current else "stale",
                               detail, manifest))
    return out


def guest_boot(guest: str, *, workload: str | None = None, commands: Sequence[str] = (),
               params: Mapping[str, object] | None = None, append: str = "",
               initrd: str | os.PathLike[str] | None = None) -> BootSpec:
    """Resolve ``--guest baremetal|linux|PATH`` to a boot: a named image or a kernel file."""
    if guest in RECIPES:
        return load(guest).boot(workload=workload, commands=commands, params=params, append=append)
    path = Path(guest)
    if not path.is_file():
        raise ImageError(f"guest {guest!r} is neither an image ({', '.join(RECIPES)}) nor a kernel file",
                         image=guest)
    if initrd is not None and not Path(initrd).is_file():
        raise ImageError(f"initrd {initrd} does not exist", image=guest)
    if workload or params or commands:
        raise ValueError("a kernel file takes --append, not a workload, params or commands")
    return BootSpec(path.resolve(), Path(initrd).resolve() if initrd else None, append, 0, None)


def overlay_disk(image: Image, directory: str | os.PathLike[str], *, name: str | None = None) -> DiskSpec:
    """A fresh qcow2 overlay in ``directory`` on the image's root disk, as the disk the guest
    writes (``dma=qemu``: QEMU's own virtio-blk); the caller removes ``directory``."""
    if image.disk is None:
        raise ImageError(f"image {image.name!r} has no root disk", image=image.name)
    path = Path(directory) / f"{name or image.name}-overlay.qcow2"
    return DiskSpec(system.create_overlay(image.disk, path), format="qcow2", dma="qemu")


def read_stock_file(image: Image, name: str) -> bytes:
    """The bytes of a stock file as the guest gets them (``vmlinuz``, or an initramfs member)."""
    if name == "vmlinuz":
        return image.kernel.read_bytes()
    initrd = image.initrd
    if initrd is None:
        raise ImageError(f"image {image.name!r} has no initramfs", image=image.name)
    return cpio.read_member(io.BytesIO(initrd.read_bytes()), name)
