"""Key material from every door, in one module: what a key looks like, how it is checked, how
its file is read, and what crosses the control socket. Every other place calls this one.

Doors: ``run``/``attach --key`` and the pytest plugin's ``--mktme-key`` (:func:`key_payload`),
``inspect --key`` (:func:`xts_key`), key files (:func:`read_key_file`), ``--kek-file`` and the
control socket's ``kek`` (:func:`load_kek`, :func:`kek_from_request`), the ``mktme`` payload a
host's key service parses (:func:`check_pair`), and keys a tenant's broker releases
(:func:`check_pair` again).

One grammar for a key spec::

    cpu[:ALG]                          CPU-generated random key (run, attach, the plugin)
    [user:]KEYHEX:TWEAKHEX[:ALG]       data key and tweak key in hex (visible in ps: prefer @FILE)
    [user:]@FILE[:ALG]                 FILE holds "KEYHEX TWEAKHEX [ALG]" (or with ':' between)
    clear | no-encrypt | none          no key (none: plain QEMU; run, attach, the plugin)

ALG is ``aes-xts-128`` or ``aes-xts-256`` (any case); without it the key length decides
(16-byte keys: aes-xts-128, 32-byte: aes-xts-256). ``run`` needs the ``user:`` prefix,
``inspect`` takes the pair with or without it.

One set of checks for an AES-XTS pair (:func:`check_pair`): both hex, both as long as the
algorithm's key, neither all zeros (PCONFIG refuses them), not equal to each other (IEEE 1619
forbids it). A key-encryption key is 64 hex digits, not all zeros. Every refusal is a
:class:`KeyMaterialError` (a ``ValueError``) whose ``reason`` names the check that failed, the
same through every door; messages never repeat key material.

Key files as users give them go through the one bounded reader, :func:`read_key_file`, run by
the command the user typed (never by a running host, which gets the key over its 0600 control
socket). The reader

- accepts regular files (a symlink is followed, its target must be a regular file) and, for
  ``<(...)`` process substitution, a pipe spelled ``/dev/fd/N`` or ``/proc/self/fd/N``, read with
  a time limit so that a silent writer cannot hang the command;
- refuses FIFOs, devices (``/dev/zero``), directories and sockets without opening them for long
  (the open is non-blocking and the type is checked again on the descriptor);
- reads at most :data:`MAX_KEY_FILE` bytes, so a huge file is an error and not a ``MemoryError``;
- warns on stderr, like ssh, when a key file is readable by group or others;
- names the file in every error and never repeats its content (binary data is "not a key file").

Written by hand: no library parses these spellings; the cipher is ``cryptography``'s
(:class:`~qemu_mktme.engine.xts.XtsKey`).
"""

from __future__ import annotations

import os
import re
import select
import stat
import sys
import time
from collections.abc import Callable

from .arch.msr import Algorithm
from .engine.xts import XtsKey
from .errors import KeyFileError, KeyMaterialError

__all__ = ["ALGORITHMS", "KEK_NBYTES", "KeyFileError", "KeyMaterialError", "algorithm_name", "check_kek", "check_pair",
           "kek_from_request", "key_payload", "load_kek", "parse_algorithm", "read_kek_file", "read_key_file",
           "unhex", "user_payload", "xts_key"]

MAX_KEY_FILE = 4096
"""Bytes; the longest key file (an aes-xts-256 key and tweak in hex, or a KEK) is under 200."""
PIPE_TIMEOUT = 10.0
"""Seconds a ``/dev/fd/N`` pipe may take to deliver its key and close."""

_FD_PATH = re.compile(r"^/(?:dev|proc/self)/fd/\d+$")
_TEXT = re.compile(rb"^[\x20-\x7e\t\r\n]*$")


ALGORITHMS = {a.label.lower(): a for a in Algorithm}
"""Spec and payload names (``aes-xts-128``) of the architectural algorithms."""
KEK_NBYTES = 32
"""Bytes of a key-encryption key (AES-256 for the snapshot keys derived from it)."""

# Why a key was refused: the same reason through every door.
NOT_HEX = "not-hex"
LENGTH = "length"
ZERO = "all-zeros"
EQUAL = "equal"
ALGORITHM = "algorithm"
SPEC = "spec"
FILE = "file"


def algorithm_name(algorithm: Algorithm) -> str:
    return algorithm.label.lower()


def parse_algorithm(word: str) -> Algorithm | None:
    """The algorithm an ALG word names (any case), or None when it names none."""
    return ALGORITHMS.get(word.lower())


def check_pair(key: bytes, tweak: bytes, algorithm: Algorithm | None = None, *,
               names: tuple[str, str] = ("the key", "the tweak key"), where: str = "") -> Algorithm:
    """The algorithm of the AES-XTS pair ``key``/``tweak``, checked: as long as ``algorithm``'s
    key (None: the length decides), not all zeros, not equal. ``KeyMaterialError`` otherwise,
    its message prefixed with ``where`` and naming the parts as ``names`` says."""
    prefix = f"{where}: " if where else ""
    explicit = algorithm is not None
    if algorithm is None:
        algorithm = Algorithm.AES_XTS_256 if len(key) == 32 else Algorithm.AES_XTS_128
        lengths = "16 bytes (aes-xts-128) or 32 bytes (aes-xts-256)"
    else:
        lengths = f"{algorithm.key_nbytes} bytes ({2 * algorithm.key_nbytes} hex digits) for {algorithm_name(algorithm)}"
    n = algorithm.key_nbytes
    if explicit and len(key) == len(tweak) != n and len(key) in (16, 32):
        raise KeyMaterialError(f"{prefix}{algorithm_name(algorithm)} needs {n}-byte keys, got {len(key)}-byte ones",
                               LENGTH)
    for name, part in zip(names, (key, tweak)):
        if len(part) != n:
            raise KeyMaterialError(f"{prefix}{name} must be {lengths}, got {len(part)}", LENGTH)
    for name, part in zip(names, (key, tweak)):
        if not any(part):
            raise KeyMaterialError(f"{prefix}{name} is all zeros (no VM can be keyed so: PCONFIG refuses it)", ZERO)
    if key == tweak:
        raise KeyMaterialError(f"{prefix}{names[0]} and {names[1]} are equal (IEEE 1619 forbids equal XTS keys, "
                               "and so does PCONFIG)", EQUAL)
    return algorithm


def unhex(text: str, name: str, where: str = "") -> bytes:
    """``text`` as bytes; ``KeyMaterialError`` (reason ``not-hex``) naming ``name``, not the text."""
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise KeyMaterialError(f"{where + ': ' if where else ''}{name} is not hex", NOT_HEX) from None


def _pair(words: list[str], alg: Algorithm | None, names: tuple[str, str], where: str) -> tuple[Algorithm, bytes, bytes]:
    key, tweak = (unhex(text, name, where) for text, name in zip(words, names))
    return check_pair(key, tweak, alg, names=names, where=where), key, tweak


def _split_spec(spec: str, read_file: Callable[[str], str] | None) -> tuple[list[str], Algorithm | None, str]:
    """A pair spec (``KEYHEX:TWEAKHEX[:ALG]`` or ``@FILE[:ALG]``) as its two hex words, its ALG
    and where it came from (for messages)."""
    alg = None
    head, sep, last = spec.rpartition(":")
    if sep and parse_algorithm(last) is not None:
        spec, alg = head, parse_algorithm(last)
    if not spec.startswith("@"):
        words = spec.split(":")
        if len(words) != 2:
            raise KeyMaterialError("key spec must be KEYHEX:TWEAKHEX[:aes-xts-128|aes-xts-256] or @FILE[:ALG] "
                                   f"(got {len(words)} fields)", SPEC)
        return words, alg, "key spec"
    path = spec[1:]
    if read_file is None:
        raise KeyMaterialError("key spec '@FILE' needs a key-file reader", SPEC)
    words = read_file(path).replace(":", " ").split()
    if len(words) == 3 and parse_algorithm(words[2]) is not None:
        in_file = parse_algorithm(words[2])
        if alg is not None and alg is not in_file:
            raise KeyMaterialError(f"key file {path} says {words[2].lower()}, the key spec {algorithm_name(alg)}",
                                   ALGORITHM)
        alg, words = in_file, words[:2]
    if len(words) != 2:
        raise KeyMaterialError(f"key file {path} must hold KEYHEX TWEAKHEX (found {len(words)} words)", SPEC)
    return words, alg, f"key file {path}"


def _warn(message: str) -> None:
    print(f"qemu-mktme: warning: {message}", file=sys.stderr)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_key_file(path: str | os.PathLike[str], *, what: str = "key file", limit: int = MAX_KEY_FILE,
                  timeout: float = PIPE_TIMEOUT, warn: Callable[[str], None] | None = _warn) -> str:
    """The text of key file ``path`` (ASCII), read within the rules above.

    ``KeyFileError`` (a ``ValueError``) says what is wrong, e.g. ``key file k.bin: not a key file
    (binary data)``. ``what`` names the file's role in messages; ``warn`` receives the
    permission warning (None: no warning).
    """
    name = os.fspath(path)
    label = f"{what} {name}"
    pipe_ok = bool(_FD_PATH.match(name))
    try:
        st = os.stat(name)                       # follows symlinks: the final target counts
    except OSError as err:
        raise KeyFileError(f"{label}: {err.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or (pipe_ok and stat.S_ISFIFO(st.st_mode))):
        hint = " (pass a key through a pipe as /dev/fd/N, e.g. <(...))" if stat.S_ISFIFO(st.st_mode) else ""
        raise KeyFileError(f"{label}: {_kind(st.st_mode)}, not a regular file{hint}")
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as err:
        raise KeyFileError(f"{label}: {err.strerror}") from None
    try:
        st = os.fstat(fd)                        # what we opened, not what was there a moment ago
        if stat.S_ISREG(st.st_mode):
            data = _read_regular(fd, limit + 1)
            if warn is not None and st.st_mode & 0o044:
                warn(f"{label} is readable by {'group and others' if st.st_mode & 0o004 else 'group'} "
                     f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 {name}")
        elif pipe_ok and stat.S_ISFIFO(st.st_mode):
            data = _read_pipe(fd, limit + 1, timeout, label)
        else:
            raise KeyFileError(f"{label}: {_kind(st.st_mode)}, not a regular file")
    except OSError as err:
        raise KeyFileError(f"{label}: {err.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise KeyFileError(f"{label}: larger than {limit} bytes, not a key file")
    if not _TEXT.match(data):
        raise KeyFileError(f"{label}: not a key file (binary data)")
    return data.decode("ascii")


def _read_regular(fd: int, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, n - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _read_pipe(fd: int, n: int, timeout: float, label: str) -> bytes:
    chunks, got = [], 0
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(int(left * 1000) + 1):
            if time.monotonic() >= deadline:
                raise KeyFileError(f"{label}: the pipe delivered no complete key within {timeout:g} s")
            continue
        try:
            chunk = os.read(fd, n - got)
        except BlockingIOError:
            continue
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def xts_key(spec: str, *, read_file: Callable[[str], str] | None = None) -> XtsKey:
    """The :class:`XtsKey` a pair spec names (``[user:]KEYHEX:TWEAKHEX[:ALG]`` or
    ``[user:]@FILE[:ALG]``; ``read_file`` defaults to :func:`read_key_file`)."""
    if not isinstance(spec, str) or not spec:
        raise KeyMaterialError("key spec: empty (expected KEYHEX:TWEAKHEX[:ALG] or @FILE)", SPEC)
    words, alg, where = _split_spec(spec.removeprefix("user:"), read_file or read_key_file)
    _, key, tweak = _pair(words, alg, ("the key", "the tweak key"), where)
    return XtsKey(key, tweak)


def user_payload(algorithm: Algorithm, key: bytes, tweak: bytes) -> str:
    """The ``mktme`` payload of a tenant (``user``) key."""
    return f"type=user algorithm={algorithm_name(algorithm)} key={key.hex()} tweak={tweak.hex()}"


def key_payload(spec: str, *, read_file: Callable[[str], str] | None = None) -> str | None:
    """``--key``'s spec (``cpu[:ALG]``, ``user:...``, ``clear``, ``no-encrypt``, ``none``) as an
    ``mktme`` payload; None for ``none`` (no MKTME). ``user:@FILE`` is read with ``read_file``
    (default :func:`read_key_file`)."""
    kind, _, rest = spec.partition(":")
    if kind in ("none", "clear", "no-encrypt") and not rest:
        return None if kind == "none" else f"type={kind}"
    if kind == "cpu":
        alg = parse_algorithm(rest) if rest else Algorithm.AES_XTS_128
        if alg is not None:
            return f"type=cpu algorithm={algorithm_name(alg)}"
    if kind == "user" and rest:
        words, alg, where = _split_spec(rest, read_file or read_key_file)
        where = "key spec 'user:...'" if where == "key spec" else where
        algorithm, key, tweak = _pair(words, alg, ("key=", "tweak="), where)
        return user_payload(algorithm, key, tweak)
    raise KeyMaterialError(f"key spec must be cpu[:ALG], user:KEYHEX:TWEAKHEX[:ALG], user:@FILE[:ALG], clear, "
                           f"no-encrypt or none (got {kind!r}{' with arguments' if rest else ''})", SPEC)


def load_kek(text: bytes | str, source: str = "key-encryption key") -> bytes:
    """The KEK in a key file's content: exactly 64 hex digits, surrounding whitespace allowed.

    Anything else (32 raw bytes, 32 hex digits, an all-zero key) is a ``KeyMaterialError``
    starting with ``source`` (e.g. ``key-encryption key file kek.hex``); it never echoes the content.
    """
    data = text.encode("latin-1") if isinstance(text, str) else bytes(text)
    words = data.split()
    kek = b""
    if len(words) == 1 and words[0].isascii():
        try:
            kek = bytes.fromhex(words[0].decode("ascii"))
        except ValueError:
            kek = b""
    if len(kek) != KEK_NBYTES or len(words[0]) != 2 * KEK_NBYTES:
        if not words:
            found = "nothing"
        elif len(kek) and len(words[0]) == 2 * len(kek):
            found = f"{len(words[0])} hex digits"
        elif all(32 <= b < 127 or b in b"\t\r\n" for b in data):
            found = f"{len(words)} word{'s' if len(words) > 1 else ''} of text"
        else:
            found = f"{len(data)} bytes of binary data"
        raise KeyMaterialError(f"{source}: not a key-encryption key: expected {2 * KEK_NBYTES} hex digits, "
                               f"found {found} (a key-encryption key is {KEK_NBYTES} bytes)",
                               NOT_HEX if len(words) == 1 and not kek else LENGTH)
    return check_kek(kek, source)


def check_kek(kek: bytes, source: str = "key-encryption key") -> bytes:
    """``kek`` if it can seal a snapshot: 32 bytes, not all zeros; ``KeyMaterialError`` starting
    with ``source`` otherwise. The one check of a KEK, whatever the door it came through (key file,
    control socket, library call): the snapshot keys and ``save_snapshot`` apply it too."""
    if not isinstance(kek, bytes) or len(kek) != KEK_NBYTES:
        raise KeyMaterialError(f"{source}: a key-encryption key is {KEK_NBYTES} bytes", LENGTH)
    if not any(kek):
        raise KeyMaterialError(f"{source}: the key-encryption key is all zeros", ZERO)
    return kek


def kek_from_request(value: object, source: str = "the request's kek") -> bytes:
    """The KEK a control-socket request carries (64 hex digits), checked as a key file's is: the
    host validates what crosses its socket, whatever the client."""
    if not isinstance(value, str):
        raise KeyMaterialError(f"{source}: not a key-encryption key: expected {2 * KEK_NBYTES} hex digits, "
                               f"found {type(value).__name__}", SPEC)
    return load_kek(value, source)


def read_kek_file(path: str | os.PathLike[str]) -> bytes:
    """The KEK in key file ``path`` (:func:`read_key_file`, then :func:`load_kek`)."""
    what = "key-encryption key file"
    return load_kek(read_key_file(path, what=what), f"{what} {os.fspath(path)}")
