"""Guest images: built from the recipes in ``guest_images/`` into a cache, pinned by a manifest.

Two images exist:

- ``baremetal``: our own tiny long-mode guest, compiled here with the system gcc/binutils from
  ``guest_images/baremetal``. Boots in a fraction of a second; the fast test guest.
- ``linux``: the **stock** Debian cloud kernel and **stock** ``busybox-static``, fetched with
  ``apt-get download`` and never modified, plus an initramfs generated around them from
  ``guest_images/linux`` (an ``/init`` script and workloads chosen on the kernel command line).

Each image directory holds ``manifest.json`` with the sha256 of every artifact (and, for Linux,
the package names, versions and .deb hashes as apt's index gives them). Loading an image
re-checks those hashes, so a corrupt or edited image is an ``ImageError``, not a strange boot.
Builds go to a temporary directory and are renamed into place under a lock: a concurrent or
interrupted build never leaves half an image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from ..errors import ImageError
from ..files.cache import cache_root
from ..qemu.boot import BootSpec
from . import cpio

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
ENV_RECIPES = "QEMU_MKTME_RECIPES"

# The Linux guest reserves this guest-physical region with memmap= so that workloads can place
# data at known addresses with /dev/mem (the Debian kernel has CONFIG_STRICT_DEVMEM=y).
LINUX_RESERVED_GPA = 0x1000_0000
LINUX_RESERVED_SIZE = 64 << 20
LINUX_MIN_MEMORY = 512 << 20
BAREMETAL_MIN_MEMORY = 4 << 20
"""The bare-metal image loads at 1 MiB and ends below 1.5 MiB; its commands' examples use 2 MiB up."""
MIN_MEMORY = {"baremetal": BAREMETAL_MIN_MEMORY, "linux": LINUX_MIN_MEMORY}
"""Per image, for manifests written before they recorded ``min_memory``."""
LINUX_BASE_APPEND = (
    "console=ttyS0 panic=-1 quiet "
    f"memmap={LINUX_RESERVED_SIZE >> 20}M${LINUX_RESERVED_GPA:#x} "
    f"mktme.reserved={LINUX_RESERVED_GPA:#x} mktme.reserved_size={LINUX_RESERVED_SIZE:#x}"
)
LINUX_KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
LINUX_BUSYBOX_PACKAGE = "busybox-static"

Say = Callable[[str], None]
"""say(message): what a build is doing now, one line."""


def _uint(text: str) -> str | None:
    return None if re.fullmatch(r"\d+", text) else "a whole number"


def _positive(text: str) -> str | None:
    return None if re.fullmatch(r"\d+", text) and int(text) > 0 else "a positive whole number"


def _address(text: str) -> str | None:
    return None if re.fullmatch(r"\d+|0[xX][0-9a-fA-F]+", text) else "an address (decimal or 0x hex)"


def _seconds(text: str) -> str | None:
    return None if re.fullmatch(r"\d*\.?\d+", text) and float(text) > 0 else "a positive number of seconds"


def _flag(text: str) -> str | None:
    return None if text in ("0", "1") else "0 or 1"


LINUX_PARAMS: dict[str, Callable[[str], str | None]] = {
    "size_mb": _positive, "count": _uint, "period": _seconds, "addr": _address, "len": _positive,
    "wait": _flag, "secret": lambda text: None, "hold": _flag,
}
"""What each ``mktme.NAME=`` parameter of the Linux guest accepts (the scripts' ``$MKTME_NAME``)."""
LINUX_WORKLOAD_PARAMS: dict[str, tuple[str, ...]] = {
    "checksum": ("size_mb",), "compress": ("size_mb",), "counter": ("count", "period"), "hello": (),
    "memstress": ("size_mb",), "region": ("addr", "len", "wait"), "secret": ("addr", "secret", "wait"),
    "shell": (),
}
"""The parameters each workload script reads; every workload also takes ``hold`` (``/init``'s hook)."""


def recipes_root() -> Path:
    """The ``guest_images/`` recipe tree of this checkout (or ``$QEMU_MKTME_RECIPES``)."""
    if os.environ.get(ENV_RECIPES):
        return Path(os.environ[ENV_RECIPES])
    return Path(__file__).resolve().parents[2] / "guest_images"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tree_digest(root: Path) -> str:
    """sha256 over the relative names and contents of every file under ``root``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


@dataclass(frozen=True)
class Image:
    """A built, verified guest image."""

    name: str
    directory: Path
    manifest: Mapping[str, object]

    @property
    def kernel(self) -> Path:
        return self.directory / str(self.manifest["kernel"])

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
        return list(self.manifest.get("workloads", []))  # type: ignore[arg-type]


def _kernel_word(value: str) -> str:
    if not value or re.search(r"[\s\"']", value):
        raise ValueError(f"kernel command-line value must be one word without quotes: {value!r}")
    return value


# ---------------------------------------------------------------------------------- recipes


class Recipe:
    """How to build one image; subclasses fill ``build``."""

    name: str = ""
    description: str = ""
    default_memory: int = 512 << 20        # guest RAM unless told otherwise (also: a kernel given by path)

    def source(self) -> Path:
        return recipes_root() / self.name

    def digest(self) -> str:
        src = self.source()
        if not src.is_dir():
            raise ImageError(f"recipe directory {src} is missing (set {ENV_RECIPES}?)", image=self.name)
        return _tree_digest(src)

    def build(self, work: Path, cache: Path, progress: Say) -> dict[str, object]:
        """Build into ``work``; return the manifest fields (``artifacts`` filled in by caller)."""
        raise NotImplementedError


def _run(argv: Sequence[str], *, image: str, cwd: Path | None = None, what: str = "") -> str:
    try:
        out = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise ImageError(f"{argv[0]} not found: needed to {what or 'build'} the {image} image",
                         image=image) from err
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip()[-1500:]
        raise ImageError(f"{shlex.join(argv)} failed ({out.returncode}):\n{tail}", image=image)
    return out.stdout


class BaremetalRecipe(Recipe):
    name = "baremetal"
    description = "tiny long-mode multiboot guest built from source (fast test guest)"
    CFLAGS = ["-m64", "-ffreestanding", "-fno-pie", "-fno-stack-protector", "-mno-red-zone",
              "-mgeneral-regs-only", "-fno-builtin", "-fno-tree-loop-distribute-patterns",
              "-fno-asynchronous-unwind-tables", "-O2", "-Wall", "-Wextra", "-Werror", "-nostdlib"]

    def build(self, work: Path, cache: Path, progress: Say) -> dict[str, object]:
        src = self.source()
        gcc = shutil.which("gcc") or "gcc"
        progress(f"compiling {src} with {gcc}")
        objs = []
        for unit in ("boot.S", "main.c"):
            obj = work / (unit.rsplit(".", 1)[0] + ".o")
            _run([gcc, *self.CFLAGS, "-c", str(src / unit), "-o", str(obj)], image=self.name, what="compile")
            objs.append(str(obj))
        elf = work / "baremetal.elf"
        _run(["ld", "-m", "elf_x86_64", "-nostdlib", "-static", "-z", "noexecstack",
              "--no-warn-rwx-segments", "-T", str(src / "link.ld"), "-o", str(elf), *objs],
             image=self.name, what="link")
        _run(["objcopy", "-O", "binary", str(elf), str(work / "baremetal.bin")], image=self.name)
        for obj in objs:
            os.unlink(obj)
        nm = _run(["nm", str(elf)], image=self.name)
        symbols = {m[2]: int(m[1], 16) for m in re.finditer(r"^([0-9a-f]+) \w (\w+)$", nm, re.M)}
        compiler = _run([gcc, "--version"], image=self.name).splitlines()[0]
        return {
            "kernel": "baremetal.bin",
            "append": "",
            "symbols": {k: hex(symbols[k]) for k in ("mailbox", "_image_end") if k in symbols},
            "toolchain": compiler,
        }


class LinuxRecipe(Recipe):
    name = "linux"
    description = "stock Debian cloud kernel + stock busybox-static, generated initramfs"
    default_memory = 1 << 30

    def build(self, work: Path, cache: Path, progress: Say) -> dict[str, object]:
        debs = cache / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        meta = _apt_download(LINUX_KERNEL_METAPACKAGE, debs, progress)
        depends = _deb_field(meta.path, "Depends")
        kernel_pkg = depends.split(",")[0].split("|")[0].split("(")[0].strip()
        if not kernel_pkg.startswith("linux-image-"):
            raise ImageError(f"{LINUX_KERNEL_METAPACKAGE} depends on {depends!r}, not a kernel", image=self.name)
        kernel = _apt_download(kernel_pkg, debs, progress)
        busybox = _apt_download(LINUX_BUSYBOX_PACKAGE, debs, progress)

        progress(f"extracting the kernel from {kernel.path.name}")
        release = kernel_pkg.removeprefix("linux-image-")
        vmlinuz = _deb_member(kernel.path, f"./boot/vmlinuz-{release}", image=self.name)
        (work / "vmlinuz").write_bytes(vmlinuz)
        progress(f"extracting busybox from {busybox.path.name}")
        busybox_bin = _deb_member(busybox.path, "./bin/busybox", image=self.name)

        progress("generating the initramfs")
        src = self.source()
        entries = [cpio.directory(d) for d in ("bin", "dev", "proc", "sys", "tmp", "sbin", "usr",
                                               "usr/bin", "usr/sbin", "workloads")]
        entries.append(cpio.file("bin/busybox", busybox_bin, 0o755))
        entries.append(cpio.file("init", (src / "init").read_bytes(), 0o755))
        workloads = sorted(p.stem for p in (src / "workloads").glob("*.sh"))
        for name in workloads:
            entries.append(cpio.file(f"workloads/{name}.sh", (src / "workloads" / f"{name}.sh").read_bytes()))
        with open(work / "initrd.cpio", "wb") as out:
            cpio.write(out, entries)
        return {
            "kernel": "vmlinuz",
            "initrd": "initrd.cpio",
            "append": LINUX_BASE_APPEND,
            "min_memory": LINUX_MIN_MEMORY,
            "kernel_release": release,
            "reserved": {"gpa": hex(LINUX_RESERVED_GPA), "size": hex(LINUX_RESERVED_SIZE)},
            "workloads": workloads,
            "packages": [dataclasses.asdict(p) | {"path": None} for p in (meta, kernel, busybox)],
            "stock_files": {
                "vmlinuz": {"package": kernel.name, "member": f"./boot/vmlinuz-{release}",
                            "sha256": hashlib.sha256(vmlinuz).hexdigest()},
                "bin/busybox": {"package": busybox.name, "member": "./bin/busybox",
                                "sha256": hashlib.sha256(busybox_bin).hexdigest()},
            },
        }


RECIPES: dict[str, Recipe] = {r.name: r for r in (BaremetalRecipe(), LinuxRecipe())}


def default_memory(guest: str) -> int:
    """Bytes of RAM ``guest`` (an image name, or a kernel path) boots with unless told otherwise."""
    recipe = RECIPES.get(guest)
    return recipe.default_memory if recipe is not None else Recipe.default_memory


def default_memory_help() -> str:
    """The defaults for a help text: ``512M baremetal, 1G linux``."""
    def size(n: int) -> str:
        return f"{n >> 30}G" if n % (1 << 30) == 0 else f"{n >> 20}M"
    return ", ".join(f"{size(r.default_memory)} {name}" for name, r in RECIPES.items())


# ---------------------------------------------------------------------------------- Debian packages


@dataclass
class DebPackage:
    """A .deb fetched with ``apt-get download``; ``index_sha256`` is what apt's index says."""

    name: str
    version: str
    sha256: str
    index_sha256: str
    path: Path | None = field(default=None)


def _apt_download(package: str, dest: Path, progress: Say) -> DebPackage:
    show = _run(["apt-cache", "show", "--no-all-versions", package], image="linux", what="look up packages")
    fields = dict(re.findall(r"^(Version|SHA256|Filename): (.+)$", show, re.M))
    if "Version" not in fields:
        raise ImageError(f"apt knows no package {package} (run 'apt-get update' as root)", image="linux")
    version = fields["Version"]
    deb = dest / os.path.basename(fields.get("Filename", f"{package}_{version}_amd64.deb"))
    if not deb.exists() or sha256_file(deb) != fields.get("SHA256"):
        progress(f"apt-get download {package}={version}")
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            os.chmod(tmp, 0o755)  # apt's _apt sandbox user must be able to write here
            _run(["apt-get", "download", "-q", f"{package}={version}"], cwd=Path(tmp), image="linux",
                 what="download packages")
            got = list(Path(tmp).glob("*.deb"))
            if len(got) != 1:
                raise ImageError(f"apt-get download {package} gave {len(got)} files", image="linux")
            os.replace(got[0], deb)
    digest = sha256_file(deb)
    if fields.get("SHA256") and digest != fields["SHA256"]:
        raise ImageError(f"{deb.name}: sha256 {digest} differs from apt's index {fields['SHA256']}",
                         image="linux")
    return DebPackage(package, version, digest, fields.get("SHA256", ""), deb)


def _deb_field(deb: Path | None, name: str) -> str:
    assert deb is not None
    return _run(["dpkg-deb", "-f", str(deb), name], image="linux", what="read packages").strip()


def _deb_member(deb: Path | None, member: str, *, image: str) -> bytes:
    """One file out of a .deb's data archive, without unpacking the rest."""
    assert deb is not None
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for info in tar:
                if info.name == member and info.isfile():
                    extracted = tar.extractfile(info)
                    assert extracted is not None
                    return extracted.read()
    finally:
        proc.kill()
        proc.wait()
    raise ImageError(f"{deb.name} has no {member}", image=image)


# ---------------------------------------------------------------------------------- cache


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _verify(name: str, directory: Path) -> dict[str, object]:
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


def build(name: str, *, cache: Path | None = None, force: bool = False,
          progress: Say | None = None) -> Image:
    """Build ``name`` unless an intact image of the current recipe exists (or ``force``)."""
    if name not in RECIPES:
        raise ImageError(f"unknown image {name!r} (known: {', '.join(RECIPES)})", image=name)
    recipe = RECIPES[name]
    root = cache or cache_root()
    say = progress or (lambda _msg: None)
    images = root / "images"
    with _locked(root):
        if not force and is_current(name, cache=root):
            return load(name, cache=root)
        images.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=images))
        try:
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
            os.chmod(work, 0o755)
            final = images / name
            if final.exists():
                stale = images / f".{name}-old-{os.getpid()}"
                os.replace(final, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        say(f"built {name} in {time.monotonic() - started:.1f} s into {final}")
        return load(name, cache=root)


@dataclass(frozen=True)
class ImageStatus:
    name: str
    description: str
    directory: Path
    state: str            # "ok", "stale" (recipe changed), "missing" or "corrupt"
    detail: str
    manifest: Mapping[str, object] | None


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
        detail = ", ".join(f"{p['name']} {p['version']}" for p in manifest.get("packages", [])  # type: ignore[union-attr]
                           if isinstance(p, dict)) or str(manifest.get("toolchain", ""))
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


def read_stock_file(image: Image, name: str) -> bytes:
    """The bytes of a stock file as the guest gets them (``vmlinuz``, or an initramfs member)."""
    if name == "vmlinuz":
        return image.kernel.read_bytes()
    initrd = image.initrd
    if initrd is None:
        raise ImageError(f"image {image.name!r} has no initramfs", image=image.name)
    return cpio.read_member(io.BytesIO(initrd.read_bytes()), name)
