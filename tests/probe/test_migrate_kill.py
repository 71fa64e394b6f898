"""The kill -9 trials of scripts/probe_migrate.py, a bounded set in CI: the migrate client killed
while the destination prepares and once the destination runs the VM, and the source host killed
during the stream. After each the VM runs on exactly one host (none only when its source was
killed), no host without it keeps a KeyID, a key or an incoming VM, and a retry works both ways."""

from __future__ import annotations

import pytest

from helpers import load_script


@pytest.mark.qemu
def test_kill_9_during_a_migration_between_hosts(baremetal_image):
    probe = load_script("probe_migrate")
    report = probe.run([("client", "prepared"), ("client", "when-done"), ("source", "prepared")])
    assert [t["problems"] for t in report["trials"]] == [[], [], []]
    assert report["shm_left"] == []
