"""A small instance of scripts/load_fleet.py (the full one: 6 domains, 20 migrations, 100 broker
requests): domains over two libvirt hosts migrating back and forth, two at a time, counters
monotonic, no KeyID or key left behind, every concurrent broker request answered."""

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


def test_domains_migrating_back_and_forth_under_load():
    if os.geteuid() != 0 or shutil.which("libvirtd") is None:
        pytest.skip("namespaced machines with their own libvirtd need root and libvirtd")
    pytest.importorskip("libvirt")
    r = subprocess.run([sys.executable, str(SCRIPT), "--domains", "3", "--migrations", "6", "--requests", "30"],
                       capture_output=True, text=True, timeout=patience(300))
    assert r.returncode == 0 and r.stdout.rstrip().endswith("ok"), r.stdout + r.stderr
    assert "6 migrations in" in r.stdout and "30 concurrent broker requests: 30 answered" in r.stdout
