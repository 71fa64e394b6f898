"""Guest images: recipes built from source and stock Debian packages into the cache.

``catalog`` builds, verifies and loads images (the manifest records every input's hash);
``cpio`` writes the deterministic initramfs. Recipes live in the checkout's ``guest_images/``.
"""

from ..files.cache import cache_root
from ..qemu.boot import BootSpec
from .catalog import (LINUX_RESERVED_GPA, LINUX_RESERVED_SIZE, RECIPES, Image, ImageStatus, build, default_memory,
                      default_memory_help, guest_boot, is_current, load, read_stock_file, recipes_root, sha256_file,
                      status)

__all__ = ["BootSpec", "Image", "ImageStatus", "LINUX_RESERVED_GPA", "LINUX_RESERVED_SIZE", "RECIPES", "build",
           "cache_root", "default_memory", "default_memory_help", "guest_boot", "is_current", "load", "read_stock_file", "recipes_root", "sha256_file",
           "status"]
