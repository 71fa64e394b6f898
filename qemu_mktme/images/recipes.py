"""How each image is built from ``guest_images/``: the bare-metal guest compiled with the system
gcc, the Linux guest from stock Debian packages and an initramfs around them; the Linux guest's
workloads and the parameters each accepts; each guest's default and minimum memory."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
from pathlib import Path
from collections.abc import Callable

from ..errors import ImageError
from . import cpio
from . import system
from .debian import apt_download, deb_field, deb_member, deb_members
from .tools import Say, run_tool, tree_digest

ENV_RECIPES = "QEMU_MKTME_RECIPES"

# The Linux guest reserves this guest-physical region with memmap= so that workloads can place
# data at known addresses with /dev/mem (the Debian kernel has CONFIG_STRICT_DEVMEM=y).
LINUX_RESERVED_GPA = 0x1000_0000
LINUX_RESERVED_SIZE = 64 << 20
LINUX_MIN_MEMORY = 512 << 20
BAREMETAL_MIN_MEMORY = 4 << 20
"""The bare-metal image loads at 1 MiB and ends below 1.5 MiB; its commands' examples use 2 MiB up."""
DEBIAN_MIN_MEMORY = 256 << 20
MIN_MEMORY = {"baremetal": BAREMETAL_MIN_MEMORY, "linux": LINUX_MIN_MEMORY, "debian": DEBIAN_MIN_MEMORY}
"""Per image, for manifests written before they recorded ``min_memory``."""
LINUX_BASE_APPEND = (
    "console=ttyS0 panic=-1 quiet "
    f"memmap={LINUX_RESERVED_SIZE >> 20}M${LINUX_RESERVED_GPA:#x} "
    f"mktme.reserved={LINUX_RESERVED_GPA:#x} mktme.reserved_size={LINUX_RESERVED_SIZE:#x}"
)
LINUX_KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
LINUX_BUSYBOX_PACKAGE = "busybox-static"
LINUX_MODULES = ("drivers/virtio/virtio_ring", "drivers/virtio/virtio", "drivers/virtio/virtio_pci_legacy_dev",
                 "drivers/virtio/virtio_pci_modern_dev", "drivers/virtio/virtio_pci", "drivers/block/virtio_blk",
                 "drivers/nvdimm/libnvdimm", "drivers/nvdimm/nd_btt", "drivers/nvdimm/nd_pmem", "drivers/acpi/nfit/nfit")
"""Modules of the kernel package the initramfs carries, in load order (dependencies first, as each
module's ``depends=`` says): the cloud kernel builds virtio, virtio_blk and the persistent-memory
stack (libnvdimm, nd_btt, nd_pmem, and nfit, which finds QEMU's NVDIMMs in the ACPI NFIT) as
modules. ``/init`` loads them with busybox insmod."""



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
    "width": lambda text: None if text in ("1", "2", "3", "4") else "1, 2, 3 or 4",
    "mode": lambda text: None if text in ("write", "read") else "write or read",
}
"""What each ``mktme.NAME=`` parameter of the Linux guest accepts (the scripts' ``$MKTME_NAME``)."""
LINUX_WORKLOAD_PARAMS: dict[str, tuple[str, ...]] = {
    "checksum": ("size_mb",), "compress": ("size_mb",), "counter": ("count", "period"), "hello": (),
    "memstress": ("size_mb",), "region": ("addr", "len", "wait"), "secret": ("addr", "secret", "wait"),
    "shell": (), "pin": ("addr", "secret"), "bits": ("addr", "secret", "period"),
    "table": ("addr", "secret", "width", "period"),
    "disk": ("size_mb",), "diskfs": ("size_mb",), "diskbench": ("size_mb", "count"),
    "pmem": ("mode", "size_mb", "secret"),
}
"""The parameters each workload script reads; every workload also takes ``hold`` (``/init``'s hook)."""


def recipes_root() -> Path:
    """The ``guest_images/`` recipe tree of this checkout (or ``$QEMU_MKTME_RECIPES``)."""
    if os.environ.get(ENV_RECIPES):
        return Path(os.environ[ENV_RECIPES])
    return Path(__file__).resolve().parents[2] / "guest_images"



class Recipe:
    """How to build one image; subclasses fill ``build``."""

    name: str = ""
    description: str = ""
    default_memory: int = 512 << 20        # guest RAM unless told otherwise (also: a kernel given by path)
    tag: str = ""
    """What the guest's own console lines start with: its markers (the recipe's sources print them)."""
    prompt: str = ""
    """The command prompt of a guest that takes commands on its console."""
    ready: str | None = None
    """The marker (a regex after ``tag``) that says the guest has booted; :attr:`booted` is the whole line's."""

    def marker(self, text: str) -> str:
        """The regular expression of the guest's console line ``tag`` + ``text`` (itself a regex)."""
        return re.escape(self.tag) + text

    @property
    def booted(self) -> str | None:
        return self.marker(self.ready) if self.ready is not None else None

    def source(self) -> Path:
        return recipes_root() / self.name

    def digest(self) -> str:
        src = self.source()
        if not src.is_dir():
            raise ImageError(f"recipe directory {src} is missing (set {ENV_RECIPES}?)", image=self.name)
        return tree_digest(src)

    def build(self, work: Path, cache: Path, progress: Say) -> dict[str, object]:
        """Build into ``work``; return the manifest fields (``artifacts`` filled in by caller)."""
        raise NotImplementedError


class BaremetalRecipe(Recipe):
    name = "baremetal"
    description = "tiny long-mode multiboot guest built from source (fast test guest)"
    tag = "mktme-baremetal "
    prompt = "mktme> "
    ready = r"\d+ ready"
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
            run_tool([gcc, *self.CFLAGS, "-c", str(src / unit), "-o", str(obj)], image=self.name, what="compile")
            objs.append(str(obj))
        elf = work / "baremetal.elf"
        run_tool(["ld", "-m", "elf_x86_64", "-nostdlib", "-static", "-z", "noexecstack",
              "--no-warn-rwx-segments", "-T", str(src / "link.ld"), "-o", str(elf), *objs],
             image=self.name, what="link")
        run_tool(["objcopy", "-O", "binary", str(elf), str(work / "baremetal.bin")], image=self.name)
        for path in objs:
            os.unlink(path)
        nm = run_tool(["nm", str(elf)], image=self.name)
        symbols = {m[2]: int(m[1], 16) for m in re.finditer(r"^([0-9a-f]+) \w (\w+)$", nm, re.M)}
        compiler = run_tool([gcc, "--version"], image=self.name).splitlines()[0]
        return {
            "kernel": "baremetal.bin",
            "append": "",
            "symbols": {k: hex(symbols[k]) for k in ("mailbox", "_image_end") if k in symbols},
            "toolchain": compiler,
        }


class LinuxRecipe(Recipe):
    name = "linux"
    tag = "mktme-linux: "
    ready = "boot kernel="
    description = "stock Debian cloud kernel + stock busybox-static, generated initramfs"
    default_memory = 1 << 30

    def build(self, work: Path, cache: Path, progress: Say) -> dict[str, object]:
        debs = cache / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        meta = apt_download(LINUX_KERNEL_METAPACKAGE, debs, progress)
        depends = deb_field(meta.path, "Depends")
        kernel_pkg = depends.split(",")[0].split("|")[0].split("(")[0].strip()
        if not kernel_pkg.startswith("linux-image-"):
            raise ImageError(f"{LINUX_KERNEL_METAPACKAGE} depends on {depends!r}, not a kernel", image=self.name)
        kernel = apt_download(kernel_pkg, debs, progress)
        busybox = apt_download(LINUX_BUSYBOX_PACKAGE, debs, progress)
        assert kernel.path is not None and busybox.path is not None       # set by a download

        progress(f"extracting the kernel from {kernel.path.name}")
        release = kernel_pkg.removeprefix("linux-image-")
        vmlinuz = deb_member(kernel.path, f"./boot/vmlinuz-{release}", image=self.name)
        (work / "vmlinuz").write_bytes(vmlinuz)
        progress(f"extracting busybox from {busybox.path.name}")
        busybox_bin = deb_member(busybox.path, "./bin/busybox", image=self.name)
        module_dir = f"lib/modules/{release}/kernel"
        progress(f"extracting {len(LINUX_MODULES)} modules (virtio, virtio_blk, nvdimm) from {kernel.path.name}")
        modules = deb_members(kernel.path, [f"./{module_dir}/{m}.ko" for m in LINUX_MODULES], image=self.name)

        progress("generating the initramfs")
        src = self.source()
        entries = [cpio.directory(d) for d in ("bin", "dev", "etc", "proc", "sys", "tmp", "sbin", "usr",
                                               "usr/bin", "usr/sbin", "workloads")]
        entries.append(cpio.file("bin/busybox", busybox_bin, 0o755))
        parts = module_dir.split("/")
        entries += [cpio.directory("/".join(parts[:i])) for i in range(1, len(parts) + 1)]
        entries += [cpio.directory(f"{module_dir}/{d}") for d in ("drivers", "drivers/virtio", "drivers/block",
                                                                   "drivers/nvdimm", "drivers/acpi", "drivers/acpi/nfit")]
        for member, data in modules.items():
            entries.append(cpio.file(member.removeprefix("./"), data, 0o644))
        entries.append(cpio.file("etc/modules-load", "".join(f"/{module_dir}/{m}.ko\n" for m in LINUX_MODULES).encode()))
        entries.append(cpio.file("init", (src / "init").read_bytes(), 0o755))
        scripts = sorted(p.stem for p in (src / "workloads").glob("*.sh"))
        for name in scripts:
            entries.append(cpio.file(f"workloads/{name}.sh", (src / "workloads" / f"{name}.sh").read_bytes()))
        workloads = [name for name in scripts if not name.startswith("_")]   # _name.sh: sourced helpers
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
                **{member.removeprefix("./"): {"package": kernel.name, "member": member,
                                               "sha256": hashlib.sha256(data).hexdigest()}
                   for member, data in modules.items()},
            },
        }


DEBIAN_WORKLOADS = ("hello", "poweroff")
"""``mktme.workload=NAME`` runs ``/usr/local/sbin/mktme-workload NAME`` once the system is up; without
one the system just sits at its login prompt."""


class DebianRecipe(Recipe):
    name = "debian"
    tag = "mktme-debian: "
    description = "full Debian system (stock packages: systemd, cloud kernel) on an ext4 qcow2, boots from /dev/vda"
    default_memory = 1 << 30

    def build(self, work: Path, cache: Path, progress: Say) -> dict[str, object]:
        tree = work / "root"
        try:
            version = system.bootstrap(tree, self.source() / "customize.sh", image=self.name, progress=progress)
            release, vmlinuz, initrd = system.kernel_files(tree, image=self.name)
            shutil.copyfile(vmlinuz, work / "vmlinuz")
            shutil.copyfile(initrd, work / "initrd.img")
            packages = system.installed_packages(tree)
            system.make_disk(tree, work / "rootfs.raw", work / "rootfs.qcow2", image=self.name, progress=progress)
        finally:
            shutil.rmtree(tree, ignore_errors=True)      # the tree mmdebstrap made, inside our work dir
        return {
            "kernel": "vmlinuz",
            "initrd": "initrd.img",
            "disk": "rootfs.qcow2",
            "append": " ".join((self.source() / "cmdline").read_text().split()),
            "min_memory": DEBIAN_MIN_MEMORY,
            "kernel_release": release,
            "workloads": list(DEBIAN_WORKLOADS),
            "suite": system.SUITE,
            "mirrors": list(system.MIRRORS),
            "bootstrap": version,
            "filesystem": {"type": "ext4", "size": system.FS_SIZE},
            "packages": packages,
        }


RECIPES: dict[str, Recipe] = {r.name: r for r in (BaremetalRecipe(), LinuxRecipe(), DebianRecipe())}
BAREMETAL, LINUX, DEBIAN = RECIPES["baremetal"], RECIPES["linux"], RECIPES["debian"]


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
