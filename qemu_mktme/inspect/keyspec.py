"""Which dumped regions a key may decrypt. The keys themselves (``inspect --key SPEC``) are
parsed and checked by :func:`qemu_mktme.keymaterial.xts_key`, as at every other door.
"""

from __future__ import annotations

from ..engine.xts import XtsKey
from ..files.dumpfile import Region
from ..keymaterial import algorithm_name


def key_algorithm(key: XtsKey) -> str:
    """``aes-xts-128`` / ``aes-xts-256``, as the dump manifest names algorithms."""
    return algorithm_name(key.algorithm)


def why_not_decryptable(region: Region, key: XtsKey) -> str | None:
    """None if ``key`` may decrypt ``region`` (its algorithm matches), else the reason."""
    if region.key_type == "no-encrypt":
        return f"{region.vm} is not encrypted (key type no-encrypt): its DRAM holds plaintext"
    if region.algorithm is None:
        return (f"{region.vm} uses the platform's TME key (key type {region.key_type}), "
                f"which never leaves the CPU")
    if region.algorithm != key_algorithm(key):
        return f"{region.vm} is encrypted with {region.algorithm}, the key is {key_algorithm(key)}"
    return None
