"""The transparency verifier: identical on every workload, and able to fail."""

from __future__ import annotations

import json
import shutil

import pytest

from qemu_mktme import cli, verifier
from qemu_mktme.errors import ImageError
from qemu_mktme import images

from helpers import Once, qm


# The smallest set of workloads that still exercises every feature of the emulated run once:
# the bare-metal driver; the Linux driver with an encrypted snapshot saved mid-run; and a save,
# kill and restore into a fresh QEMU, whose restored VM is traced too. Each is traced by the shim
# and has its whole DRAM view computed (while running; the last one paused at its save point);
# the foreign-write injection is the test below. linux-compress and linux-memstress run the same Linux driver on bigger workloads: they
# belong to ``qemu-mktme verify`` (``make verify``), not to every test run.
SUITE_WORKLOADS = ["baremetal", "linux-boot", "linux-snapshot"]
FEATURES = {                      # what each feature leaves in the emulated run's notes
    "DRAM view": "DRAM view of",
    "shim": "shim:",
    "snapshot saved mid-run": "encrypted snapshot saved mid-run",
    "restore into a fresh QEMU": "restored into a fresh QEMU",
}


def _verify_suite_workloads():
    import asyncio
    return asyncio.run(verifier.verify(SUITE_WORKLOADS))


_SUITE_RUN = Once(_verify_suite_workloads)


@pytest.fixture(scope="module")
def suite_run(linux_image, baremetal_image):
    """SUITE_WORKLOADS, plain and emulated, once per session; a failure is reported once."""
    return _SUITE_RUN.get()


def test_suite_workloads_are_known_and_use_both_images():
    assert set(SUITE_WORKLOADS) <= set(verifier.WORKLOADS)
    assert {verifier.WORKLOADS[n].image for n in SUITE_WORKLOADS} == {"baremetal", "linux"}


def test_every_workload_is_identical(suite_run):
    outcomes, stock = suite_run
    assert [o.workload for o in outcomes] == SUITE_WORKLOADS
    for o in outcomes:
        assert o.identical, f"{o.workload}: {o.first_difference}"
        assert o.plain.exit_status == o.emulated.exit_status == 0
        assert any("DRAM view" in n for n in o.emulated.notes), o.emulated.notes
        shim = [n for n in o.emulated.notes if n.startswith("shim:")]
        assert shim and all(" 0 mismatches" in n for n in shim), o.emulated.notes
    notes = {o.workload: " ".join(o.emulated.notes) for o in outcomes}
    for feature, note in FEATURES.items():
        assert any(note in n for n in notes.values()), f"no suite workload exercised {feature}"
    assert "restored into a fresh QEMU" in notes["linux-snapshot"]
    assert notes["linux-snapshot"].count("shim:") == 2          # the restored VM is traced too
    assert "encrypted snapshot saved mid-run" in notes["linux-boot"]
    assert any("vmlinuz: stock linux-image-" in s for s in stock)
    assert any("bin/busybox: stock busybox-static" in s for s in stock)
    assert any("baremetal.bin: built here" in s for s in stock)


def test_transcripts_really_hold_the_workload_output(suite_run):
    by_name = {o.workload: o for o in suite_run[0]}
    assert "ok crc32 0x300000 1048576 0x" in by_name["baremetal"].plain.transcript
    assert "ok crc32 0x300000 1048576 0x" in by_name["baremetal"].emulated.transcript
    assert "workload hello exit=0" in by_name["linux-boot"].emulated.transcript
    assert by_name["linux-snapshot"].emulated.transcript.count("count 30\n") == 1


def test_cli_reports_identical_with_exit_0(suite_run, monkeypatch, capsys):
    """The command's report and exit status, from the run above (not a second one)."""
    asked = []

    async def already_run(names=None, **options):
        asked.append((names, options))
        return suite_run

    monkeypatch.setattr(verifier, "verify", already_run)
    assert cli.main(["verify", "--workloads", *SUITE_WORKLOADS]) == 0
    out = capsys.readouterr().out
    [(names, options)] = asked
    assert names == SUITE_WORKLOADS and options["inject"] is None and options["shim"]
    assert out.startswith("stock   ")
    assert "baremetal        identical" in out and "linux-snapshot   identical" in out
    assert "emulation: " in out and "restored into a fresh QEMU" in out


def test_an_injected_foreign_write_is_reported(baremetal_image):
    out = qm("verify", "--workloads", "baremetal", "--inject", "foreign-write", "--json", timeout=60)
    assert out.returncode == 1
    report = json.loads(out.stdout)
    [w] = report["workloads"]
    assert not w["identical"] and "ok crc32" in w["first_difference"]
    assert any("through KeyID" in n for n in w["emulation"])


def test_normalisation_is_limited_to_documented_nondeterminism():
    a = verifier.normalise("[    1.234567] reboot: Power down\r\nMemFree:  1234 kB\nok crc32 1")
    b = verifier.normalise("[    9.999999] reboot: Power down\nMemFree:  99 kB\nok crc32 1\n\n")
    assert a == b
    assert verifier.normalise("root@debian:~# [   59.946230] reboot: Power down") == \
        verifier.normalise("root@debian:~# [   71.051813] reboot: Power down")        # after a prompt
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
