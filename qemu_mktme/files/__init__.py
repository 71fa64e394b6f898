"""Files the tool writes and reads back: formats and places, importable by the live side and the offline tools.

``snapfile`` (the encrypted snapshot container), ``dumpfile`` (DRAM dumps and their manifest),
``atomic`` (write a temporary file, fsync, rename), ``cache`` (where images and the shim are built),
``runtime`` (the private parent of runtime directories, their owner markers and the sweep),
``keyfile`` (the one bounded reader of users' key files).

:data:`Progress` is the one progress-callback type of the long operations on them (dump,
snapshot save and restore, and the control socket that streams them).
"""

from collections.abc import Callable

Progress = Callable[[int, int], None]
"""progress(done, total): units done so far (bytes or chunks) out of ``total``."""
