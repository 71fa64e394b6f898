"""The payload grammar of the proposed Linux ``mktme`` key type (RFC 2018/2019; mktme.md §6).

    type=cpu|user|clear|no-encrypt [algorithm=aes-xts-128|aes-xts-256] [key=HEX] [tweak=HEX]

``algorithm`` only for ``cpu``/``user`` (default aes-xts-128); for ``user`` ``key`` and
``tweak`` are the data and tweak keys (both required, each as long as the algorithm's key, not
all zeros, and not equal to each other: IEEE 1619 forbids equal XTS keys);
for ``cpu`` they are optional entropy mixed into the CPU-generated key. Anything else is EINVAL,
as ``add_key(2)`` would return. The parsed object never shows key bytes in ``repr``. The key
checks are :mod:`qemu_mktme.keymaterial`'s, as at every other door.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass, field

from ..arch.msr import Algorithm
from ..errors import KeyServiceError
from ..keymaterial import ALGORITHMS, KeyMaterialError, algorithm_name, check_pair, unhex

MAX_PAYLOAD_BYTES = 1024


class KeyType(enum.Enum):
    CPU = "cpu"
    USER = "user"
    CLEAR = "clear"
    NO_ENCRYPT = "no-encrypt"


@dataclass(frozen=True)
class Payload:
    """A validated ``mktme`` payload. ``key``/``tweak`` are secret: excluded from repr."""

    type: KeyType
    algorithm: Algorithm | None
    key: bytes | None = field(default=None, repr=False)
    tweak: bytes | None = field(default=None, repr=False)

    def __str__(self) -> str:
        alg = f" algorithm={algorithm_name(self.algorithm)}" if self.algorithm is not None else ""
        return f"type={self.type.value}{alg}" + (" key=<set>" if self.key else "")


def _einval(msg: str) -> KeyServiceError:
    return KeyServiceError(errno.EINVAL, f"bad mktme payload: {msg}")


def _hex(name: str, text: str) -> bytes:
    try:
        return unhex(text, f"{name}=")
    except KeyMaterialError as err:
        raise _einval(str(err)) from None


def parse(payload: str | bytes) -> Payload:
    """Parse and validate a payload; ``KeyServiceError(EINVAL)`` saying what is wrong."""
    if isinstance(payload, bytes):
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise _einval(f"longer than {MAX_PAYLOAD_BYTES} bytes")
        try:
            payload = payload.decode("ascii")
        except UnicodeDecodeError:
            raise _einval("not ASCII") from None
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise _einval(f"longer than {MAX_PAYLOAD_BYTES} bytes")
    options: dict[str, str] = {}
    for word in payload.split():
        name, sep, value = word.partition("=")
        if not sep or not value:
            raise _einval(f"{word!r} is not NAME=VALUE")
        if name not in ("type", "algorithm", "key", "tweak"):
            raise _einval(f"unknown option {name!r}")
        if name in options:
            raise _einval(f"{name}= given twice")
        options[name] = value
    if "type" not in options:
        raise _einval("type= is required")
    try:
        kind = KeyType(options["type"])
    except ValueError:
        raise _einval(f"type={options['type']} (expected cpu, user, clear or no-encrypt)") from None
    if kind in (KeyType.CLEAR, KeyType.NO_ENCRYPT):
        extra = set(options) - {"type"}
        if extra:
            raise _einval(f"type={kind.value} takes no {', '.join(sorted(extra))}")
        return Payload(kind, None)
    algorithm = ALGORITHMS.get(options.get("algorithm", "aes-xts-128"))
    if algorithm is None:
        raise _einval(f"algorithm={options['algorithm']} (expected aes-xts-128 or aes-xts-256)")
    n = algorithm.key_nbytes
    if kind is KeyType.USER:
        if "key" not in options or "tweak" not in options:
            raise _einval("type=user needs key= and tweak=")
        key, tweak = _hex("key", options["key"]), _hex("tweak", options["tweak"])
        try:
            check_pair(key, tweak, algorithm, names=("key=", "tweak="))
        except KeyMaterialError as err:
            raise _einval(str(err)) from None
        return Payload(kind, algorithm, key, tweak)
    # cpu: optional entropy, at most the key length
    entropy = _hex("key", options["key"]) if "key" in options else None
    tweak_entropy = _hex("tweak", options["tweak"]) if "tweak" in options else None
    for what, given in (("key", entropy), ("tweak", tweak_entropy)):
        if given is not None and len(given) > n:
            raise _einval(f"{what}= entropy is at most {n} bytes for {algorithm_name(algorithm)}")
    return Payload(kind, algorithm, entropy, tweak_entropy)
