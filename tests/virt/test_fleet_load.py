"""scripts/load_fleet.py: domains over two libvirt hosts migrating back and forth, two at a time,
counters monotonic, no KeyID or key left behind, every concurrent broker request answered.
``make test`` runs a bounded instance (2 domains, one round of 2 concurrent migrations in
opposite directions, 30 broker requests); ``make verify`` the full one (6 domains, 20 migrations,
100 requests)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import patience

pytestmark = pytest.mark.qemu
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "load_fleet.py"


def _load(domains: int, migrations: int, requests: int, seconds: float) -> None:
    if os.geteuid() != 0 or shutil.which("libvirtd") is None:
        pytest.skip("namespaced machines with their own libvirtd need root and libvirtd")
    pytest.importorskip("libvirt")
    r = subprocess.run([sys.executable, str(SCRIPT), "--domains", str(domains), "--migrations", str(migrations),
                        "--requests", str(requests)], capture_output=True, text=True, timeout=patience(seconds))
    assert r.returncode == 0 and r.stdout.rstrip().endswith("ok"), r.stdout + r.stderr
    assert f"{migrations} migrations in" in r.stdout
    assert f"{requests} concurrent broker requests: {requests} answered" in r.stdout


def test_domains_migrating_back_and_forth_under_load():
    _load(2, 2, 30, 300)


@pytest.mark.verify
def test_the_full_load_of_domains_migrating_back_and_forth():
    _load(6, 20, 100, 900)
