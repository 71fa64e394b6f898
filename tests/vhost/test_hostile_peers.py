"""Hostile vhost-user peers against the backend as its own process (the cases of
``scripts/probe_vhost.py``, bounded): a full call eventfd, silent and half-sent connections, a
dead kick pipe, memory tables by the dozen, a truncated memfd, a peer of another uid. In each,
a well-behaved front end is still served within a bound and the backend neither dies, blocks,
spins nor grows."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from helpers import patience

SCRIPTS = Path(__file__).parents[2] / "scripts"


def _probe():
    if "probe_vhost" in sys.modules:
        return sys.modules["probe_vhost"]
    spec = importlib.util.spec_from_file_location("probe_vhost", SCRIPTS / "probe_vhost.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["probe_vhost"] = module
    spec.loader.exec_module(module)
    return module


async def _run(case: str, **kw) -> tuple[list[str], str]:
    probe = _probe()
    async with probe.backend() as b:
        problems = await probe.CASES[case](b, patience(5), **kw)
        assert b.alive, f"the backend exited ({b.proc.returncode}):\n{b.output.decode()[-2000:]}"
        return problems, b.output.decode()


async def test_a_full_call_eventfd_blocks_nobody():
    problems, _ = await _run("full-call")
    assert problems == []


async def test_silent_connections_beyond_the_bound_do_not_starve_a_client():
    problems, log = await _run("idle", count=12)         # more than the 8 served at once
    assert problems == []
    assert "closing the one silent longest" in log and "silent too long without owning the device" in log


async def test_half_sent_messages_cost_only_their_connection():
    problems, log = await _run("half-sent", count=4)
    assert problems == []
    assert "a message or a reply missed its deadline" in log


async def test_a_hung_up_kick_pipe_stops_its_queue_without_spinning():
    problems, log = await _run("dead-kick")
    assert problems == []
    assert "kick fd unusable (its writer hung up): queue stopped" in log


async def test_thirty_memory_tables_of_64_mib_keep_vmsize_flat():
    problems, _ = await _run("tables", tables=30)
    assert problems == []


async def test_a_truncated_or_short_memfd_is_refused_not_a_sigbus():
    problems, log = await _run("truncated")
    assert problems == []
    assert "not sealed against shrinking" in log
    assert "its file holds 0x10000 bytes, the region needs 0x800000" in log


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another uid")
async def test_a_peer_of_another_uid_is_refused_by_the_socket_mode():
    problems, _ = await _run("other-uid")
    assert problems == []
