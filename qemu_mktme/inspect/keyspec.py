"""Keys the user supplies to the inspection tools, and which dumped regions they may decrypt.

    KEYHEX:TWEAKHEX[:ALG]      data key and tweak key in hex (visible in ps: prefer @FILE)
    @FILE[:ALG]                FILE holds "KEYHEX TWEAKHEX" (or "KEYHEX:TWEAKHEX"), optionally ALG
    user:...                   the same, spelled as ``qemu-mktme run --key`` spells it

ALG is ``aes-xts-128`` or ``aes-xts-256``; without it the key length decides. Errors say what
is wrong without repeating key material; the resulting :class:`~qemu_mktme.engine.xts.XtsKey`
never shows its bytes either.
"""

from __future__ import annotations

from ..engine.xts import XtsKey
from ..host.payload import ALGORITHMS, algorithm_name
from ..files.dumpfile import Region
from ..files.keyfile import read_key_file


def parse_key_spec(spec: str) -> XtsKey:
    """The :class:`XtsKey` a key spec names (``ValueError`` without the key in the message)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError("key spec: empty (expected KEYHEX:TWEAKHEX[:ALG] or @FILE)")
    if spec.startswith("user:"):
        spec = spec[5:]
    alg = None
    head, sep, last = spec.rpartition(":")
    if sep and last.lower() in ALGORITHMS:
        spec, alg = head, last.lower()
    if spec.startswith("@"):
        path = spec[1:]
        words = read_key_file(path).replace(":", " ").split()
        if len(words) == 3 and words[2].lower() in ALGORITHMS:
            if alg is not None and alg != words[2].lower():
                raise ValueError(f"key file {path} says {words[2].lower()}, the key spec {alg}")
            alg = words[2].lower()
            words = words[:2]
        if len(words) != 2:
            raise ValueError(f"key file {path} must hold KEYHEX TWEAKHEX (found {len(words)} words)")
        where = f"key file {path}"
    else:
        words = spec.split(":")
        if len(words) != 2:
            raise ValueError("key spec must be KEYHEX:TWEAKHEX[:aes-xts-128|aes-xts-256] or @FILE[:ALG] "
                             f"(got {len(words)} fields)")
        where = "key spec"
    parts = []
    for name, text in zip(("key", "tweak key"), words):
        try:
            parts.append(bytes.fromhex(text))
        except ValueError:
            raise ValueError(f"{where}: the {name} is not hex") from None
    key, tweak = parts
    if len(key) != len(tweak) or len(key) not in (16, 32):
        raise ValueError(f"{where}: AES-XTS needs a key and a tweak key of 16 bytes each (aes-xts-128) or 32 "
                         f"(aes-xts-256), got {len(key)} and {len(tweak)} bytes")
    for name, part in (("key", key), ("tweak key", tweak)):
        if not any(part):
            raise ValueError(f"{where}: the {name} is all zeros (no VM can be keyed so: PCONFIG refuses it)")
    if key == tweak:
        raise ValueError(f"{where}: the key and the tweak key are equal (IEEE 1619 forbids it, and so does PCONFIG)")
    xkey = XtsKey(key, tweak)
    if alg is not None and algorithm_name(xkey.algorithm) != alg:
        raise ValueError(f"{where}: {alg} needs {ALGORITHMS[alg].key_nbytes}-byte keys, got {len(key)}-byte ones")
    return xkey


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
