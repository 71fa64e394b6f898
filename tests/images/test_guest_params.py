"""Workloads and their parameters are checked before a guest boots (issue 10, item 9). No QEMU."""

from __future__ import annotations

import re

import pytest

from qemu_mktme.images import recipes


def test_the_parameter_table_matches_the_workload_scripts():
    scripts = recipes.recipes_root() / "linux" / "workloads"
    found = {p.stem: {m.lower() for m in re.findall(r"MKTME_([A-Z_]+)", p.read_text())} - {"reserved", "reserved_size"}
             for p in scripts.glob("*.sh") if not p.stem.startswith("_")}   # _name.sh: sourced helpers
    assert found == {w: set(ps) for w, ps in recipes.LINUX_WORKLOAD_PARAMS.items()}
    assert "MKTME_HOLD" in (recipes.recipes_root() / "linux" / "init").read_text()
    assert all(p in recipes.LINUX_PARAMS for ps in recipes.LINUX_WORKLOAD_PARAMS.values() for p in ps)


@pytest.mark.parametrize("workload, params, message", [
    ("nosuch", {}, "no workload 'nosuch'"),
    (None, {"bogus": 1}, "workload hello takes no parameter 'bogus'"),
    ("secret", {"size_mb": 4}, "workload secret takes no parameter 'size_mb'"),
    ("checksum", {"size_mb": -5}, "size_mb must be a positive whole number"),
    ("checksum", {"size_mb": "0"}, "positive whole number"),
    ("counter", {"period": "0"}, "positive number of seconds"),
    ("region", {"addr": "here"}, "an address"),
    ("region", {"wait": 2}, "0 or 1"),
    (None, {"workload": "hello"}, "takes no parameter 'workload'"),
])
def test_bad_workloads_and_params(linux_image, workload, params, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        linux_image.boot(workload=workload, params=params)


def test_good_params_still_boot_specs(linux_image):
    for workload, params in (("counter", {"count": 30, "period": 0.1}), ("memstress", {"size_mb": 256, "hold": 1}),
                             ("region", {"addr": "0x10000000", "len": 64, "wait": 1}), ("secret", {"secret": "x"})):
        assert f"mktme.workload={workload}" in linux_image.boot(workload=workload, params=params).append


def test_every_guest_has_a_minimum_memory(baremetal_image, linux_image):
    assert baremetal_image.boot().min_memory == 4 << 20
    assert linux_image.boot().min_memory == 512 << 20
