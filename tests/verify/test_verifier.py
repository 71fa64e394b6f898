"""The transparency verifier: identical on every workload, and able to fail."""

from __future__ import annotations

import json
import shutil

import pytest

from qemu_mktme import verifier
from qemu_mktme.errors import ImageError
from qemu_mktme import images

from helpers import qm


@pytest.fixture(scope="module")
def full_run(linux_image, baremetal_image):
    """Every workload, plain and emulated: a few minutes, shared by the tests below."""
    import asyncio
    return asyncio.run(verifier.verify())


def test_every_workload_is_identical(full_run):
    outcomes, stock = full_run
    assert [o.workload for o in outcomes] == list(verifier.WORKLOADS)
    for o in outcomes:
        assert o.identical, f"{o.workload}: {o.first_difference}"
        assert o.plain.exit_status == o.emulated.exit_status == 0
        assert any("DRAM view" in n for n in o.emulated.notes), o.emulated.notes
        shim = [n for n in o.emulated.notes if n.startswith("shim:")]
        assert shim and all(" 0 mismatches" in n for n in shim), o.emulated.notes
    notes = {o.workload: " ".join(o.emulated.notes) for o in outcomes}
    assert "restored into a fresh QEMU" in notes["linux-snapshot"]
    assert notes["linux-snapshot"].count("shim:") == 2          # the restored VM is traced too
    assert "encrypted snapshot saved mid-run" in notes["linux-memstress"]
    assert any("vmlinuz: stock linux-image-" in s for s in stock)
    assert any("bin/busybox: stock busybox-static" in s for s in stock)


def test_transcripts_really_hold_the_workload_output(full_run):
    by_name = {o.workload: o for o in full_run[0]}
    assert "ok crc32 0x300000 1048576 0x" in by_name["baremetal"].plain.transcript
    assert "mktme-linux: compress identical" in by_name["linux-compress"].emulated.transcript
    assert "mktme-linux: memstress mb=256 sha256=" in by_name["linux-memstress"].emulated.transcript
    assert by_name["linux-snapshot"].emulated.transcript.count("count 30\n") == 1


def test_an_injected_foreign_write_is_reported():
    out = qm("verify", "--workloads", "baremetal", "--inject", "foreign-write", "--json", timeout=300)
    assert out.returncode == 1
    report = json.loads(out.stdout)
    [w] = report["workloads"]
    assert not w["identical"] and "ok crc32" in w["first_difference"]
    assert any("through KeyID" in n for n in w["emulation"])


def test_cli_reports_identical_with_exit_0():
    out = qm("verify", "--workloads", "baremetal", timeout=300)
    assert out.returncode == 0, out.stderr
    assert "baremetal        identical" in out.stdout
    assert out.stdout.startswith("stock   ")


def test_normalisation_is_limited_to_documented_nondeterminism():
    a = verifier.normalise("[    1.234567] reboot: Power down\r\nMemFree:  1234 kB\nok crc32 1")
    b = verifier.normalise("[    9.999999] reboot: Power down\nMemFree:  99 kB\nok crc32 1\n\n")
    assert a == b
    c = verifier.normalise("ok crc32 2")
    assert verifier.first_difference(a, a[:2] + c) == "line 3: plain 'ok crc32 1' vs emulated 'ok crc32 2'"
    assert verifier.first_difference(["x"], ["x", "y"]) == "line 2: only emulated has 'y'"


def test_a_modified_guest_binary_is_not_stock(tmp_path, linux_image):
    shutil.copytree(linux_image.directory, tmp_path / "images" / "linux")
    kernel = tmp_path / "images" / "linux" / "vmlinuz"
    kernel.write_bytes(kernel.read_bytes()[:-1] + b"\0")
    manifest = json.loads((tmp_path / "images" / "linux" / "manifest.json").read_text())
    manifest["artifacts"]["vmlinuz"] = images.sha256_file(kernel)        # even with a "fixed" manifest
    (tmp_path / "images" / "linux" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ImageError, match="vmlinuz is not the stock file of linux-image-"):
        verifier.check_stock(images.load("linux", cache=tmp_path))
