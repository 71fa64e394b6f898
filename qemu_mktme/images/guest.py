"""One guest-config builder: a guest (an image's name or a kernel file) and its options as the
:class:`~qemu_mktme.qemu.machine.MachineConfig` that boots it. The command line (``run``), the
pytest plugin's ``mktme_vm`` and the verifier all build their machines here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..qemu.binary import find_qemu
from ..qemu.boot import BootSpec
from ..qemu.devices import DiskSpec, NetSpec
from ..qemu.machine import MachineConfig
from ..qemu.passthrough import check_passthrough
from . import backports
from .catalog import Image, guest_boot, load, overlay_disk
from .recipes import RECIPES, default_memory


def machine_config(guest: str, *, image: Image | None = None, boot: BootSpec | None = None,
                   memory: int | str | None = None, workload: str | None = None,
                   params: Mapping[str, object] | None = None, commands: Sequence[str] = (), append: str = "",
                   initrd: str | os.PathLike[str] | None = None, disks: Sequence[DiskSpec] = (),
                   nets: Sequence[NetSpec] = (), qemu: str | None = None, extra_args: Sequence[str] = (),
                   overlay_dir: str | os.PathLike[str] | None = None, name: str | None = None,
                   **fields: Any) -> MachineConfig:
    """The machine that boots ``guest``: ``baremetal``, ``linux``, ``debian`` or a kernel file.

    ``image``: the guest's image when the caller has loaded it already; ``boot``: a boot of the
    caller's own instead of the one ``workload``/``params``/``commands``/``append``/``initrd``
    describe. ``memory`` defaults to the image's. A guest that boots from a root disk (``debian``)
    and is given none gets a throwaway overlay on its image in ``overlay_dir``. ``qemu`` may name
    a release (``qemu10``); ``extra_args`` go to QEMU after :func:`check_passthrough`. Other
    ``fields`` are :class:`MachineConfig`'s (``cpus``, ``accel``, ``start_paused``, ...).
    ``ValueError`` (or ``ImageError``) for options that cannot work together.
    """
    if initrd is not None and guest in RECIPES:
        raise ValueError(f"--initrd is for a kernel given as --guest PATH; the {guest} image brings its own")
    if boot is None:
        boot = (image.boot(workload=workload, commands=commands, params=params, append=append) if image is not None
                else guest_boot(guest, workload=workload, commands=commands, params=params, append=append,
                                initrd=initrd))
    found = tuple(disks)
    if not found and guest in RECIPES and (image or load(guest)).disk is not None:
        if overlay_dir is None:
            raise ValueError(f"the {guest} guest needs a root disk: give --disk FILE")
        found = (overlay_disk(image or load(guest), overlay_dir, name=name or guest),)
    if qemu in backports.RELEASES:
        qemu = str(backports.qemu_path(qemu))
    extra = tuple(extra_args)
    if extra:
        extra = check_passthrough(extra, str(find_qemu(qemu).path))
    for disk in found:
        disk.check()
    if name is not None:
        fields["name"] = name
    return MachineConfig(boot=boot, memory=memory or default_memory(guest), disks=found, nets=tuple(nets), qemu=qemu,
                         extra_args=extra, **fields)
