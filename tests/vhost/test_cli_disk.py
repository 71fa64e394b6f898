"""``run``'s disk and fault-injection options refuse what cannot work, before anything starts."""

from __future__ import annotations

from helpers import qm


def test_vhost_disks_and_iommu_keyid_need_the_host_model(tmp_path):
    kernel, disk = tmp_path / "vmlinuz", tmp_path / "disk.img"
    kernel.write_bytes(b"\0" * 4096)
    disk.write_bytes(b"\0" * 65536)
    r = qm("run", "--guest", str(kernel), "--key", "none", "--disk", f"{disk},dma=vhost")
    assert r.returncode != 0 and "dma=vhost needs the MKTME host model" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_poll_max_ns_is_refused_where_qemu_serves_the_disk(tmp_path):
    kernel, disk = tmp_path / "vmlinuz", tmp_path / "disk.img"
    kernel.write_bytes(b"\0" * 4096)
    disk.write_bytes(b"\0" * 65536)
    for args, message in ((("--key", "none", "--disk", f"{disk},poll-max-ns=1000"), "QEMU serves the disk itself"),
                          (("--disk", f"{disk},dma=qemu,poll-max-ns=1000"), "poll-max-ns is our backend's"),
                          (("--disk", f"{disk},poll-max-ns=lots"), "a number of nanoseconds")):
        r = qm("run", "--guest", str(kernel), *args)
        assert r.returncode != 0 and message in r.stderr, r.stderr
        errors = [line for line in r.stderr.strip().splitlines() if not line.startswith("usage:")]
        assert len(errors) == 1, r.stderr                    # argparse's usage line, then one error
