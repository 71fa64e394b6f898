"""``qemu-mktme``: the command line. Thin: the table of commands, ``main``, the exit policy.

Each command lives in :mod:`qemu_mktme.commands` (one module per top-level noun, with
``register(subparsers)``); this module only builds the parser from :data:`COMMANDS`, runs the
chosen action (a coroutine runs under :func:`run_async`) and maps what it raises to an exit status.

Exit status:
    0    success
    1    a domain error: one line ``qemu-mktme: error: ...`` (``--traceback`` for the rest), a
         guest that exited non-zero, differences found by ``verify``, an unusable QEMU in
         ``doctor``; also a closed standard output (``BrokenPipeError``), silently
    2    a usage error: argparse's, or a command line found unworkable before anything starts
         (:class:`~qemu_mktme.commands.options.UsageError`: an unknown workload, a bad key file,
         too little memory)
    3    ``keyserver status``: no key server runs for the tenant
    130  interrupted (Ctrl-C or SIGTERM; teardown has run)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from .attend import TERMINATED
from .commands import (attach, attack, compare, demo, disk, doctor, dump, host, images, inspect, keyserver, libvirt,
                       migrate, nvdimm, query, run, snapshot, tenant)
from .commands.options import PROG, ListedChoices, Unlisted, UsageError
from .errors import MktmeError

COMMANDS = (run, attach, host, snapshot, nvdimm, inspect, attack, demo, compare, images, disk, doctor, keyserver, tenant,
            libvirt)
"""The top-level nouns (and the verbs ``run``, ``attach``, ``compare``), in the order ``--help`` lists them."""

ALIASES = {"migrate": migrate, "query": query, "dump": dump, "verify": compare, "image": disk}
"""Old top-level names that still work exactly as before but ``--help`` does not list: ``migrate``,
``query`` and ``dump`` are ``host migrate|query|dump``, ``verify`` is ``compare``, ``image`` (the
encrypted disk images, easily taken for ``images``, the guest images) is ``disk``."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Intel MKTME emulation around unmodified QEMU.")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.register(sub)
    for old, module in ALIASES.items():
        module.register(Unlisted(sub, old))
    sub.choices = ListedChoices(sub.choices, unlisted=ALIASES)  # type: ignore[assignment]  # read: in, iter
    return parser


def run_async(coro: Any) -> Any:
    """``asyncio.run`` where SIGTERM, like Ctrl-C, cancels the work so that teardown runs.

    The handler is a plain Python signal handler, as asyncio's own Ctrl-C handling is, not
    ``loop.add_signal_handler``: that one only learns of a signal through its wakeup byte, and
    a host then ignored its first SIGTERM now and then (about 1 stop in 20-40 in
    ``scripts/probe_kill.py``). The Python handler runs on the main thread as soon as it runs
    bytecode, which a 0.5 s heartbeat guarantees. SIGTERM also sets
    :data:`~qemu_mktme.attend.TERMINATED`'s event, which :func:`attend` waits on: a cancellation
    can be swallowed, an event cannot.
    """
    async def guarded() -> Any:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        terminated = asyncio.Event()
        TERMINATED.set(terminated)

        def on_sigterm() -> None:
            logging.getLogger(__name__).info("SIGTERM: stopping")
            terminated.set()
            task.cancel()

        beat: asyncio.TimerHandle

        def heartbeat() -> None:
            nonlocal beat
            beat = loop.call_later(0.5, heartbeat)
        beat = loop.call_later(0.5, heartbeat)
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: loop.call_soon_threadsafe(on_sigterm))
        try:
            result = await coro
        except asyncio.CancelledError:
            raise KeyboardInterrupt from None
        finally:
            signal.signal(signal.SIGTERM, previous)
            beat.cancel()
        if terminated.is_set():
            raise KeyboardInterrupt
        return result
    return asyncio.run(guarded())


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format=f"{PROG}: %(name)s: %(message)s")
    # qemu.qmp reports expected disconnects at ERROR level; they are ours to report.
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL if verbose < 2 else logging.DEBUG)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    qemu_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, qemu_args = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    if qemu_args and not getattr(args, "qemu_passthrough", False):
        parser.error("-- QEMU-OPTIONS is only for 'run'")
    args.qemu_args = qemu_args
    _configure_logging(args.verbose)
    try:
        result = args.func(args)
        if asyncio.iscoroutine(result):
            result = run_async(result)
        return int(result or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (MktmeError, ValueError, OSError) as err:
        if args.traceback:
            raise
        first, *rest = str(err).splitlines() or [type(err).__name__]
        print(f"{PROG}: error: {first}", file=sys.stderr)
        for line in rest:
            print(f"  {line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
