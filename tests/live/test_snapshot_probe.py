"""The snapshot tamper campaign (``scripts/probe_snapshot.py``) in a bounded form: every region
flipped, every boundary given inserted bytes, truncations, versions, swaps, splices and
re-encoded manifests; all must be refused, a few of them by a real restore."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from qemu_mktme.live.snapshot import verify_snapshot

pytestmark = pytest.mark.qemu

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "probe_snapshot.py"


def load_probe():
    spec = importlib.util.spec_from_file_location("probe_snapshot", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                 # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


async def test_tamper_campaign_is_refused(tmp_path):
    probe = load_probe()
    kek = os.urandom(32)
    a, b = await probe.make_snapshots(tmp_path, kek)
    verify_snapshot(a, kek)
    cases = probe.cases(a, b, kek, flips=2, seed=7)
    categories = {c.category for c in cases}
    assert {"bit flip", "inserted bytes", "truncation", "header version", "chunk swap",
            "chunk from the other snapshot", "splice", "manifest re-encoded"} <= categories
    outcomes = probe.run_verify(cases, kek, tmp_path)
    accepted = [(o.case.category, o.case.name, o.message) for o in outcomes if not o.refused]
    assert accepted == [] and len(outcomes) > 100
    restored = await probe.run_restores(cases, kek, tmp_path, 3, seed=7)
    assert [o.message for o in restored if not o.refused] == [] and len(restored) == 3
