"""Guest images: recipes built from source and stock Debian packages into the cache.

``catalog`` builds, verifies and loads images (the manifest records every input's hash) and
boots them; ``recipes`` says how each is built and what its workloads take; ``debian`` fetches
and checks stock packages; ``cpio`` writes the deterministic initramfs; ``tools`` runs the build
host's tools. The recipes' sources live in the checkout's ``guest_images/``.
"""

from ..files.cache import cache_root
from ..qemu.boot import BootSpec
from .catalog import (Image, ImageStatus, build, guest_boot, is_current, load, overlay_disk, read_stock_file,
                      status)
from .guest import machine_config
from .recipes import (BAREMETAL, DEBIAN, LINUX, LINUX_RESERVED_GPA, LINUX_RESERVED_SIZE, RECIPES, default_memory,
                      default_memory_help, recipes_root)
from .tools import sha256_file

__all__ = ["BAREMETAL", "DEBIAN", "LINUX", "BootSpec", "Image", "ImageStatus", "LINUX_RESERVED_GPA", "LINUX_RESERVED_SIZE", "RECIPES", "build",
           "cache_root", "default_memory", "default_memory_help", "guest_boot", "is_current", "load", "machine_config", "overlay_disk",
           "read_stock_file", "recipes_root", "sha256_file", "status"]
