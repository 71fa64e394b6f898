"""Shared fixtures: real images from the cache, a check that nothing outlives the suite, and
modest hypothesis budgets so the suite stays fast on 2 cores."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from qemu_mktme import images

settings.register_profile("mktme", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("mktme")


@pytest.fixture(scope="session")
def baremetal_image() -> images.Image:
    return images.build("baremetal")


@pytest.fixture(scope="session")
def linux_image() -> images.Image:
    return images.build("linux")


def _our_qemus() -> list[str]:
    """QEMU processes that this test process started and that are still alive (not zombies)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue
        if int(stat[1]) == os.getpid() and stat[0] != "Z" and "qemu-system" in cmdline.split(" ")[0]:
            found.append(f"{pid}: {cmdline[:120]}")
    return found


def _leftover_files() -> list[str]:
    """Runtime directories and RAM files named after this process."""
    dirs = [Path("/dev/shm"), Path(tempfile.gettempdir())]
    if os.environ.get("XDG_RUNTIME_DIR"):
        dirs.append(Path(os.environ["XDG_RUNTIME_DIR"]))
    return [str(p) for d in dirs if d.is_dir() for p in d.glob(f"qemu-mktme-*-{os.getpid()}-*")]


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    """After the whole suite: no QEMU of ours running, no guest RAM file, no runtime directory."""
    before = set(_leftover_files())
    yield
    procs = _our_qemus()
    files = sorted(set(_leftover_files()) - before)
    assert not procs, f"QEMU processes left running: {procs}"
    assert not files, f"files left behind: {files}"
