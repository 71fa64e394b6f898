"""The payload grammar of the proposed Linux ``mktme`` key type (RFC 2018/2019; mktme.md §6).

    type=cpu|user|clear|no-encrypt [algorithm=aes-xts-128|aes-xts-256] [key=HEX] [tweak=HEX]

``algorithm`` only for ``cpu``/``user`` (default aes-xts-128); for ``user`` ``key`` and
``tweak`` are the data and tweak keys (both required, each as long as the algorithm's key, not
all zeros, and not equal to each other: IEEE 1619 forbids equal XTS keys);
for ``cpu`` they are optional entropy mixed into the CPU-generated key. Anything else is EINVAL,
as ``add_key(2)`` would return. The parsed object never shows key bytes in ``repr``.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Callable
from dataclasses import dataclass, field

from ..arch.msr import Algorithm
from ..errors import KeyServiceError

MAX_PAYLOAD_BYTES = 1024


class KeyType(enum.Enum):
    CPU = "cpu"
    USER = "user"
    CLEAR = "clear"
    NO_ENCRYPT = "no-encrypt"


ALGORITHMS = {a.label.lower(): a for a in Algorithm}
"""Payload names (``aes-xts-128``) of the architectural algorithms."""


def algorithm_name(algorithm: Algorithm) -> str:
    return algorithm.label.lower()


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


def _hex(name: str, text: str, nbytes: int | None) -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise _einval(f"{name}= is not hex") from None
    if nbytes is not None and len(value) != nbytes:
        raise _einval(f"{name}= must be {nbytes} bytes ({2 * nbytes} hex digits), got {len(value)}")
    return value


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
        key, tweak = _hex("key", options["key"], n), _hex("tweak", options["tweak"], n)
        for what, secret in (("key", key), ("tweak", tweak)):
            if not any(secret):
                raise _einval(f"{what}= is all zeros")
        if key == tweak:
            raise _einval("key= and tweak= are equal (IEEE 1619 forbids equal XTS keys)")
        return Payload(kind, algorithm, key, tweak)
    # cpu: optional entropy, at most the key length
    entropy = _hex("key", options["key"], None) if "key" in options else None
    tweak_entropy = _hex("tweak", options["tweak"], None) if "tweak" in options else None
    for what, given in (("key", entropy), ("tweak", tweak_entropy)):
        if given is not None and len(given) > n:
            raise _einval(f"{what}= entropy is at most {n} bytes for {algorithm_name(algorithm)}")
    return Payload(kind, algorithm, entropy, tweak_entropy)


def payload_from_spec(spec: str, read_file: Callable[[str], str] | None = None) -> str | None:
    """The command line's key spec as an ``mktme`` payload; None for ``none`` (no MKTME).

        cpu[:ALG]                      CPU-generated random key (KEYID_SET_KEY_RANDOM)
        user:KEYHEX:TWEAKHEX[:ALG]     tenant key (visible in ps: prefer the @FILE form)
        user:@FILE[:ALG]               tenant key read from FILE ("KEYHEX TWEAKHEX" or "KEYHEX:TWEAKHEX")
        clear | no-encrypt | none

    ``read_file(path)`` reads FILE (``qemu_mktme.files.keyfile.key_payload`` passes the one bounded
    key-file reader); without it ``user:@FILE`` is refused. ``ValueError`` names what is wrong
    without repeating key material.
    """
    kind, _, rest = spec.partition(":")
    if kind in ("none", "clear", "no-encrypt") and not rest:
        return None if kind == "none" else f"type={kind}"
    parts = rest.split(":") if rest else []
    alg = parts.pop() if parts and parts[-1] in ALGORITHMS else "aes-xts-128"
    if kind == "cpu" and not parts:
        return f"type=cpu algorithm={alg}"
    if kind == "user":
        parts_source = None
        if len(parts) == 1 and parts[0].startswith("@"):
            path = parts_source = parts[0][1:]
            if read_file is None:
                raise ValueError("key spec 'user:@FILE' needs a key-file reader (qemu_mktme.files.keyfile.key_payload)")
            parts = read_file(path).replace(":", " ").split()
            if len(parts) != 2:
                raise ValueError(f"key file {path} must hold KEYHEX and TWEAKHEX")
        if len(parts) == 2:
            payload = f"type=user algorithm={alg} key={parts[0]} tweak={parts[1]}"
            try:
                parse(payload)
            except KeyServiceError as err:
                where = f"key file {parts_source}" if parts_source else "key spec 'user:...'"
                raise ValueError(f"{where}: {err}") from None
            return payload
    raise ValueError(f"key spec must be cpu[:ALG], user:KEYHEX:TWEAKHEX[:ALG], user:@FILE[:ALG], clear, "
                     f"no-encrypt or none (got {kind!r}{' with arguments' if rest else ''})")
