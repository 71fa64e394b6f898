"""Where built things live: the cache of guest images and the shim, shared by every user of them."""

from __future__ import annotations

from ..compiled import ENV_CACHE, cache_root

__all__ = ["ENV_CACHE", "cache_root"]
