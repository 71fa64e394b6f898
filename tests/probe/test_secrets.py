"""The key scan of scripts/probe_secrets.py, bounded for CI: no key byte in any file, stream or ps."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path


SCRIPT = Path(__file__).parents[2] / "scripts" / "probe_secrets.py"


def _probe_module():
    spec = importlib.util.spec_from_file_location("probe_secrets", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


probe_secrets = _probe_module()


def test_the_scanner_finds_a_key_in_every_form(tmp_path: Path):
    """The scan is not blind: a key written raw, in hex or in HEX anywhere below a tree is reported."""
    key = os.urandom(16)
    forms = probe_secrets.needles({"k": key})
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "raw.bin").write_bytes(b"x" * 100 + key + b"y")
    (tmp_path / "log.txt").write_text(f"loaded key {key.hex().upper()}\n")
    (tmp_path / "ok.txt").write_text("nothing here\n")
    report = probe_secrets.Report()
    probe_secrets.scan_tree(tmp_path, forms, report, allowed=set())
    assert report.files == 3
    assert sorted(h.split(" in ")[0] for h in report.hits) == ["k (HEX)", "k (raw)"]
    report = probe_secrets.Report()
    probe_secrets.scan_tree(tmp_path, forms, report, allowed={(tmp_path / "log.txt").resolve()})
    assert [h.split(" in ")[0] for h in report.hits] == ["k (raw)"]


def test_no_key_byte_leaves_the_host(tmp_path: Path, baremetal_image):
    """run with a key file, query, dump, snapshot save/verify, inspect with the key: nothing leaks."""
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    report = probe_secrets.probe(work, "baremetal", memory="128M")
    assert report.processes > 0 and report.files >= 4
    assert report.hits == []
