"""The kill -9 trials of scripts/probe_migrate.py. After each the VM runs on exactly one host (none
only when its source was killed), no host without it keeps a KeyID, a key or an incoming VM, no
QEMU outlives its killed host, and a retry works both ways.

``make test`` runs one kill point per process that a user's migration depends on: the migrate
client once the destination runs the VM (the source must close its copy on its own; the client
killed earlier is tests/live/test_p2p.py's abandoned client) and the source host during the stream
(the destination must drop its incoming VM). ``make verify`` runs every kill point of the script
(the client at four moments, the source and the destination host)."""

from __future__ import annotations

import pytest

from helpers import load_script

pytestmark = pytest.mark.qemu


def _trials_hold(trials: list) -> None:
    report = load_script("probe_migrate").run(trials)
    assert [(t["killed"], t["when"], t["problems"]) for t in report["trials"]] == [(v, w, []) for v, w in trials]
    assert report["shm_left"] == []


def test_kill_9_during_a_migration_between_hosts(baremetal_image):
    _trials_hold([("client", "when-done"), ("source", "prepared")])


@pytest.mark.verify
def test_kill_9_at_every_point_of_a_migration_between_hosts(baremetal_image):
    _trials_hold(load_script("probe_migrate").TRIALS)
