"""One encrypted image for the tenant tests (LUKS creation costs seconds on a busy machine)."""

from __future__ import annotations

import pytest

from qemu_mktme.tenant import admin

MARK = b"TENANT-DISK-PLAINTEXT"


@pytest.fixture(scope="session")
def tenant_image(mktme_keyserver, tmp_path_factory):
    """(path of a LUKS qcow2 under the tenant's disk key 'disk-test', its manifest); the plaintext
    source (1 MiB of MARK-led sectors) is removed once encrypted."""
    d = tmp_path_factory.mktemp("tenant-image")
    raw = d / "disk.raw"
    raw.write_bytes(MARK.ljust(512, b".") * 2048)
    manifest = admin.encrypt_image(mktme_keyserver.tenant, raw, d / "disk.qcow2", key_name="disk-test")
    raw.unlink()
    return d / "disk.qcow2", manifest
