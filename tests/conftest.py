"""Shared fixtures: real images from the cache, the ``qemu`` marker, a check that nothing outlives
a test, and modest hypothesis budgets so the suite stays fast on 2 cores.

Pure tests (arch, engine, host model, file formats, the shim's layout...) run anywhere, with no
QEMU installed: ``pytest -m "not qemu"``. A test that boots QEMU or needs the guest images is
marked ``qemu``: automatically when it uses one of :data:`QEMU_FIXTURES`, by hand (``pytestmark``)
when it starts QEMU some other way. Every unmarked test runs with QEMU *hidden* (a stand-in
``qemu-system-x86_64`` first on ``PATH`` and in ``$QEMU_MKTME_QEMU`` that records its use and
fails), and fails if it tried to run it: the marker cannot silently go stale.
"""

from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from qemu_mktme import images
from qemu_mktme.files import runtime

settings.register_profile("mktme", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("mktme")

# Fixtures that boot QEMU or build/load the guest images (which needs QEMU's world: apt, gcc).
QEMU_FIXTURES = frozenset({"baremetal_image", "linux_image", "debian_image", "mktme_vm", "mktme_images",
                            "mktme_attested_host"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if QEMU_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.qemu)


@pytest.fixture(scope="session")
def baremetal_image() -> images.Image:
    return images.build("baremetal")


@pytest.fixture(scope="session")
def linux_image() -> images.Image:
    return images.build("linux")


@pytest.fixture(scope="session")
def debian_image() -> images.Image:
    return images.build("debian")


# ---------------------------------------------------------------------- QEMU hidden from pure tests

@pytest.fixture(scope="session")
def _hidden_qemu(tmp_path_factory) -> tuple[Path, Path]:
    """A directory holding a stand-in ``qemu-system-x86_64`` that logs each use and exits 127."""
    bindir = tmp_path_factory.mktemp("no-qemu")
    log = bindir / "calls.log"
    stand_in = bindir / "qemu-system-x86_64"
    stand_in.write_text(f"#!/bin/sh\necho \"$0 $*\" >> {shlex.quote(str(log))}\n"
                        "echo 'qemu-system-x86_64: hidden from tests not marked qemu' >&2\nexit 127\n")
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IXUSR)
    return stand_in, log


@pytest.fixture(autouse=True)
def _qemu_only_where_marked(request: pytest.FixtureRequest):
    """Unmarked tests run with QEMU hidden and fail if they tried to start it; ``qemu`` tests
    must not leave a QEMU of ours running."""
    if request.node.get_closest_marker("qemu"):
        yield
        procs = _our_qemus()
        assert not procs, f"QEMU processes left running after this test: {procs}"
        return
    stand_in, log = request.getfixturevalue("_hidden_qemu")
    log.unlink(missing_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{stand_in.parent}{os.pathsep}{os.environ.get('PATH', '')}")
        mp.setenv("QEMU_MKTME_QEMU", str(stand_in))
        yield
    if log.exists():
        calls = log.read_text().strip().splitlines()
        pytest.fail(f"this test is not marked qemu but ran QEMU ({calls[0]!r}...): mark it "
                    "(pytestmark = pytest.mark.qemu) or use a fixture from QEMU_FIXTURES", pytrace=False)


# ---------------------------------------------------------------------- nothing left behind

def _children() -> list[str]:
    """The PIDs of this process's children: from each thread's ``children`` list (run after every
    QEMU test, a scan of all of /proc cost ~25 ms), or that scan where the kernel has no such list."""
    try:
        return [pid for task in os.listdir("/proc/self/task")
                for pid in Path(f"/proc/self/task/{task}/children").read_text().split()]
    except FileNotFoundError:
        pass
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                found.append(pid)
        except (OSError, IndexError):
            continue
    return found


def _our_qemus() -> list[str]:
    """QEMU processes that this test process started and that are still alive (not zombies)."""
    found = []
    for pid in _children():
        try:
            stat_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue
        if int(stat_[1]) == os.getpid() and stat_[0] != "Z" and "qemu-system" in cmdline.split(" ")[0]:
            found.append(f"{pid}: {cmdline[:120]}")
    return found


def _leftover_files() -> list[str]:
    """Runtime directories (under the private parent) and RAM files (in /dev/shm) of this process."""
    found = [str(p) for p in Path("/dev/shm").glob(f"qemu-mktme-*-{os.getpid()}-*")]
    parent = runtime.private_parent()
    return found + [str(p) for p in parent.glob(f"*-{os.getpid()}-*")]


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    """After the whole suite: no QEMU of ours running, no guest RAM file, no runtime directory."""
    before = set(_leftover_files())
    yield
    procs = _our_qemus()
    files = sorted(set(_leftover_files()) - before)
    assert not procs, f"QEMU processes left running: {procs}"
    assert not files, f"files left behind: {files}"


# ---------------------------------------------------------------------- the tenant's side (issue 14)

TENANT_MARK = b"TENANT-DISK-PLAINTEXT"


@pytest.fixture(scope="session")
def tenant_image(mktme_keyserver, tmp_path_factory):
    """(a LUKS qcow2 under the tenant's disk key 'disk-test', its signed manifest), made once: LUKS
    creation costs seconds on a busy machine. The plaintext source (1 MiB of sectors led by
    :data:`TENANT_MARK`) is removed once encrypted."""
    from qemu_mktme.tenant import admin
    d = tmp_path_factory.mktemp("tenant-image")
    raw = d / "disk.raw"
    raw.write_bytes(TENANT_MARK.ljust(512, b".") * 2048)
    manifest = admin.encrypt_image(mktme_keyserver.tenant, raw, d / "disk.qcow2", key_name="disk-test")
    raw.unlink()
    return d / "disk.qcow2", manifest
