"""`qemu-mktme demo` (what `make demo` runs) tells its story and every check in it passes."""

from __future__ import annotations

from PIL import Image

from helpers import qm


def test_demo_runs_and_draws_the_map(tmp_path, linux_image, baremetal_image):
    png = tmp_path / "demo.png"
    out = qm("demo", "--png", str(png), timeout=60)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for step in range(1, 8):
        assert f"[{step}/7]" in out.stdout
    assert "FAIL" not in out.stdout and out.stdout.count("ok    ") >= 6
    assert "x86/mktme: 63 KeyIDs available" in out.stdout
    assert "AES-XTS(tenant key, tweak = HPA) computed independently" in out.stdout
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width > 500 and img.height > 300
