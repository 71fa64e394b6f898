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
