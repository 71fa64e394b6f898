"""Where built things live: the cache of guest images and the shim, shared by every user of them."""

from __future__ import annotations

import os
from pathlib import Path

ENV_CACHE = "QEMU_MKTME_CACHE"


def cache_root() -> Path:
    """Where images are built: ``$QEMU_MKTME_CACHE``, else ``$XDG_CACHE_HOME/qemu-mktme``."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "qemu-mktme"
