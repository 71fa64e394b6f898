"""``qemu-mktme inspect``: every action through the parser, text and JSON, PNGs, and bad input as
one error line."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from qemu_mktme.cli import main
from qemu_mktme.commands.inspect import register as add_inspect_parser
from qemu_mktme.files.dumpfile import write_dump
from qemu_mktme.inspect.plot import ENTROPY_ANCHORS, PALETTE, UNTAGGED_RGB

from conftest import MIB, SECRET, make_scene
from helpers import patience


def run(capsys, *argv):
    rc = main(["inspect", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error(capsys, *argv) -> str:
    rc, out, err = run(capsys, *argv)
    assert rc == 1 and out == "", (out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qemu-mktme: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_the_parser_plugs_into_a_cli(scene_dumps):
    _, d1, *_ = scene_dumps
    parser = argparse.ArgumentParser(prog="qemu-mktme")
    add_inspect_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["inspect", str(d1.path), "map", "--json", "--vm", "vm2"])
    assert args.func.__name__ == "do_map" and args.vm == "vm2" and args.json
    with pytest.raises(SystemExit):
        parser.parse_args(["inspect", str(d1.path), "decrypt", "--raw", "--key", "x", "--gpa", "0", "-n", "1", "-o", "f"])


def test_map_text_json_and_png(scene_dumps, capsys, tmp_path):
    scene, d1, *_ = scene_dumps
    rc, out, _ = run(capsys, d1.path, "map")
    k1 = int(scene.guests["vm1"].keyid)
    assert rc == 0 and "vm1 (tenant acme): KeyID 1, user aes-xts-128" in out
    assert f"{k1:>6} {3072 - 96:>10}" in out and "pages the EPT does not map" in out
    rc, out, _ = run(capsys, d1.path, "map", "--json", "--vm", "vm1")
    j = json.loads(out)
    assert rc == 0 and [v["vm"] for v in j["vms"]] == ["vm1"] and j["pages"] == 3072
    assert [r["gpa"] for r in j["runs"]] == ["0x0", None, "0x100000", "0x100000000"]

    png = tmp_path / "map.png"
    rc, out, _ = run(capsys, d1.path, "map", "--png", png)
    assert rc == 0 and f"wrote {png} (1048x810)" in out
    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        # 5120 pages: 64 columns of 8-pixel cells, vm1 48 rows, vm2 and vm3 16 rows each (plot docstring)
        assert img.format == "PNG" and img.size == (8 + 2 * (64 * 8 + 8), 8 + 20 + 16 + 3 * 14 + 80 * 8 + 2 * 6 + 8 + 4 * 14 + 8)
        rgb = img.convert("RGB")
        top = 8 + 20 + 16
        vm2_top = top + 14 + 48 * 8 + 6 + 14
        assert rgb.getpixel((8 + 4, top + 14 + 4)) == PALETTE[k1 % len(PALETTE)]                # vm1 page 0
        assert rgb.getpixel((8 + 32 * 8 + 4, top + 14 + 2 * 8 + 4)) == UNTAGGED_RGB            # vm1 page 160
        entropy_x = 8 + 512 + 8
        assert rgb.getpixel((entropy_x + 4, vm2_top + 4)) == ENTROPY_ANCHORS[0][1]             # vm2: zeros
        r, g, b = rgb.getpixel((entropy_x + 4, top + 14 + 4))                                  # vm1: ciphertext
        assert max(r, g, b) < 80
    # no overwrite without --force, nothing partial left
    assert "exists already" in one_error(capsys, d1.path, "map", "--png", png)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.png"]
    assert run(capsys, d1.path, "map", "--png", png, "--force")[0] == 0


def test_entropy_text_json_png(scene_dumps, capsys, tmp_path):
    _, d1, *_ = scene_dumps
    rc, out, _ = run(capsys, d1.path, "entropy")
    assert rc == 0 and "vm2 (KeyID 2, no-encrypt): 1024 pages" in out and "1024 below 7.5" in out
    assert "vm2 HPA" in out and "low-entropy pages" in out
    rc, out, _ = run(capsys, d1.path, "entropy", "--json", "--vm", "vm1", "--threshold", "7.9")
    j = json.loads(out)
    assert j["total"]["pages"] == 3072 and j["total"]["low_pages"] == 0 and j["low_runs"] == []
    png = tmp_path / "e.png"
    assert run(capsys, d1.path, "entropy", "--vm", "vm3", "--png", png)[0] == 0
    with Image.open(png) as img:
        assert img.size == (8 + 512 + 8, 8 + 20 + 16 + 14 + 16 * 8 + 8 + 2 * 14 + 8)


def test_search_raw_and_decrypted(scene_dumps, capsys, key_file):
    scene, d1, *_ = scene_dumps
    rc, out, err = run(capsys, d1.path, "search", SECRET.decode(), "--vm", "vm1")
    assert rc == 0 and out == "0 match(es) in the raw (ciphertext) DRAM of vm1\n" and err == ""
    rc, out, _ = run(capsys, d1.path, "search", SECRET.decode())
    assert "vm2 HPA" in out and "GPA 0x200000" in out and "1 match(es)" in out
    k, t = scene.keys["vm1"]
    spec = f"@{key_file(k, t)}"
    rc, out, err = run(capsys, d1.path, "search", SECRET.decode(), "--key", spec, "--json")
    j = json.loads(out)
    assert rc == 0 and j["view"] == "decrypted" and [(m["vm"], m["gpa"]) for m in j["matches"]] == [("vm1", "0x200000")]
    assert "vm2 not searched" in err and "vm3 not searched" in err and "wrong key" not in err
    rc, out, err = run(capsys, d1.path, "search", SECRET.decode(), "--key", f"{os.urandom(16).hex()}:{t.hex()}", "--vm", "vm1")
    assert rc == 0 and "0 match(es) in the decrypted DRAM of vm1" in out
    assert "the key decrypts nothing meaningful" in err and "wrong key?" in err and t.hex() not in out + err
    rc, out, _ = run(capsys, d1.path, "search", "00" * 8, "--hex", "--key", spec, "--max-matches", "3")
    assert out.count("vm1 HPA") == 3 and "or more" in out


def test_decrypt_to_file(scene_dumps, capsys, key_file, tmp_path):
    scene, d1, *_ = scene_dumps
    k, t = scene.keys["vm1"]
    out_file = tmp_path / "secret.bin"
    spec = f"{k.hex()}:{t.hex()}"
    rc, out, err = run(capsys, d1.path, "decrypt", "--key", spec, "--vm", "vm1", "--gpa", "0x200000",
                       "--length", len(SECRET), "-o", out_file)
    assert rc == 0 and out_file.read_bytes() == SECRET and stat.S_IMODE(out_file.stat().st_mode) == 0o600
    assert k.hex() not in out + err and t.hex() not in out + err and err == ""
    line = one_error(capsys, d1.path, "decrypt", "--key", spec, "--vm", "vm1", "--gpa", "0x200000", "-n", "16",
                     "-o", out_file)
    assert "exists already" in line and out_file.read_bytes() == SECRET
    rc, out, _ = run(capsys, d1.path, "decrypt", "--key", spec, "--vm", "vm1", "--hpa",
                     hex(d1.region("vm1").hpa + 0x300000), "-n", "4K", "-o", out_file, "--force", "--json")
    assert rc == 0 and json.loads(out)["gpa"] == "0x300000" and len(out_file.read_bytes()) == 4096
    wrong = f"{os.urandom(16).hex()}:{os.urandom(16).hex()}"
    rc, out, err = run(capsys, d1.path, "decrypt", "--key", wrong, "--vm", "vm1", "--gpa", "0x200000", "-n", "16",
                       "-o", tmp_path / "w")
    assert rc == 0 and "look random" in err and "wrong key?" in err and wrong[:32] not in out + err


@pytest.mark.parametrize("argv,message", [
    (["decrypt", "--key", "KEY", "--gpa", "0", "-n", "16", "-o", "OUT"], "the dump holds 3 VMs; name one of vm1, vm2, vm3"),
    (["decrypt", "--key", "KEY", "--vm", "vm1", "--gpa", "0xa0000", "-n", "16", "-o", "OUT"],
     "vm1: GPA 0xa0000+0x10 is not in the dump (the VM's RAM: 0x0-0x9ffff, 0x100000-0x9fffff, 0x100000000-0x1001fffff)"),
    (["decrypt", "--key", "KEY", "--vm", "vm3", "--gpa", "0", "-n", "16", "-o", "OUT"],
     "cannot decrypt: vm3 is encrypted with aes-xts-256, the key is aes-xts-128"),
    (["decrypt", "--key", "KEY", "--vm", "vm2", "--gpa", "0", "-n", "16", "-o", "OUT"],
     "cannot decrypt: vm2 is not encrypted (key type no-encrypt): its DRAM holds plaintext"),
    (["decrypt", "--key", "KEY:aes-xts-256", "--vm", "vm1", "--gpa", "0", "-n", "16", "-o", "OUT"],
     "key spec: aes-xts-256 needs 32-byte keys, got 16-byte ones"),
    (["decrypt", "--key", "@/no/such/file", "--vm", "vm1", "--gpa", "0", "-n", "16", "-o", "OUT"],
     "key file /no/such/file: No such file or directory"),
    (["decrypt", "--key", "KEY", "--vm", "vm9", "--gpa", "0", "-n", "16", "-o", "OUT"], "no VM 'vm9' in the dump"),
    (["search", "x", "--key", "KEY", "--vm", "vm2"], "the key applies to no VM of the dump: vm2 is not encrypted"),
    (["search", "(", "--regex"], "bad regular expression"),
    (["diff", "OTHER"], "the dumps hold different VMs"),
])
def test_bad_input_is_one_clear_line(scene_dumps, capsys, tmp_path, argv, message):
    scene, d1, *_ = scene_dumps
    k, t = scene.keys["vm1"]
    other = write_dump([scene.guests["vm1"]], tmp_path / "other")
    argv = [a.replace("KEY", f"{k.hex()}:{t.hex()}").replace("OUT", str(tmp_path / "out")).replace("OTHER", str(other.path))
            for a in argv]
    line = one_error(capsys, d1.path, *argv)
    assert message in line and k.hex() not in line and t.hex() not in line
    assert not (tmp_path / "out").exists()


def small_dump(path: Path):
    scene = make_scene()
    return write_dump([scene.guests["vm3"]], path)


def edit_manifest(path: Path, change) -> None:
    m = json.loads((path / "manifest.json").read_text())
    change(m)
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("damage,message", [
    (lambda p: os.truncate(p / "dram.bin", 4 * MIB - 4096), "dram.bin: 4190208 bytes, the manifest needs 4194304 (truncated?)"),
    (lambda p: (p / "dram.bin").unlink(), "the manifest needs 4194304 (truncated?)"),
    (lambda p: (p / "manifest.json").write_text('{"format": "qemu-mktme-dram-dump", "vers'), "unreadable manifest"),
    (lambda p: (p / "manifest.json").unlink(), "is not a dump (no manifest.json)"),
    (lambda p: edit_manifest(p, lambda m: m.update(version=2)), "dump format version 2 is newer than this qemu-mktme"),
    (lambda p: edit_manifest(p, lambda m: m.update(format="something")), "not a qemu-mktme-dram-dump manifest"),
    (lambda p: edit_manifest(p, lambda m: m["regions"][0].pop("hpa")), "malformed region in manifest"),
    (lambda p: edit_manifest(p, lambda m: m["regions"][0].update(file_offset=100)), "is not 4 KiB aligned"),
    (lambda p: edit_manifest(p, lambda m: m["regions"][0]["gpa_ranges"][0].update(size=8 * MIB)),
     "GPA range 0x0+0x800000"),
    (lambda p: edit_manifest(p, lambda m: m["regions"].append(dict(m["regions"][0], vm="twin"))), "overlap"),
])
@pytest.mark.parametrize("action", [["map"], ["entropy"], ["search", "x"], ["diff", "SELF"]])
def test_damaged_dumps_are_one_clear_line(tmp_path, capsys, damage, message, action):
    path = tmp_path / "d"
    small_dump(path)
    damage(path)
    line = one_error(capsys, path, *[a.replace("SELF", str(path)) for a in action])
    assert message in line


def test_missing_dump_directory(capsys, tmp_path):
    assert "is not a dump" in one_error(capsys, tmp_path / "nope", "map")


def test_diff_text_json_png(scene_dumps, capsys, tmp_path):
    _, d1, d2, *_ = scene_dumps
    rc, out, _ = run(capsys, d1.path, "diff", d2.path, "--vm", "vm1")
    assert rc == 0
    assert "vm1: 263 of 786432 16-byte blocks changed, in 70 64-byte lines, 6 pages" in out
    assert "  GPA 0x500000-0x50003f  1 line(s), 2 block(s); partly changed lines (blocks): 0x500000 [1,2]\n" in out
    assert "  GPA 0x600000-0x600fff  64 line(s), 256 block(s)\n" in out
    assert "  GPA 0x100000000-0x10000007f  2 line(s), 2 block(s); partly changed lines (blocks): " \
           "0x100000000 [0] 0x100000040 [0]\n" in out
    rc, out, _ = run(capsys, d1.path, "diff", d2.path, "--json", "--limit", "2")
    j = json.loads(out)
    vm1 = next(v for v in j["vms"] if v["vm"] == "vm1")
    assert len(vm1["block_runs"]) == len(vm1["line_runs"]) == 2 and vm1["block_runs_total"] == 6
    assert vm1["truncated"] and vm1["changed_blocks"] == 263
    assert vm1["line_runs"][1] == {"hpa": hex(d1.region("vm1").hpa + 0x600000), "gpa": "0x600000", "lines": 64,
                                   "nbytes": 4096, "blocks": 256, "partial_lines": []}
    png = tmp_path / "diff.png"
    assert run(capsys, d1.path, "diff", d2.path, "--png", png)[0] == 0
    with Image.open(png) as img:
        assert img.size[0] == 8 + 512 + 8


def test_the_script_runs_standalone(scene_dumps, tmp_path):
    _, d1, *_ = scene_dumps
    script = Path(__file__).parents[2] / "scripts" / "inspect_dump.py"
    proc = subprocess.run([sys.executable, str(script), str(d1.path), "map", "--json"], capture_output=True,
                          text=True, timeout=patience(15))
    assert proc.returncode == 0 and json.loads(proc.stdout)["pages"] == 5120
    broken = tmp_path / "broken"
    shutil.copytree(d1.path, broken)
    os.truncate(broken / "dram.bin", 100)
    proc = subprocess.run([sys.executable, str(script), str(broken), "entropy"], capture_output=True, text=True,
                          timeout=patience(15))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "truncated?" in proc.stderr


def test_an_empty_dump(capsys, tmp_path):
    path = tmp_path / "empty"
    write_dump([], path)
    assert run(capsys, path, "map")[1].startswith(f"{path}: 0 VM(s), 0 pages")
    assert run(capsys, path, "entropy")[1] == f"{path}: no pages\n"
    assert run(capsys, path, "search", "x")[1] == "0 match(es) in the raw (ciphertext) DRAM of none\n"
    assert json.loads(run(capsys, path, "diff", path, "--json")[1])["vms"] == []
