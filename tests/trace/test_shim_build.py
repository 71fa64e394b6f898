"""Building the shim: variant choice by QEMU version, the cache, exports, and compile errors."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from qemu_mktme.errors import ShimError
from qemu_mktme.trace.shim import abi_for, build_shim, phys_mode_for, source_path


@pytest.mark.parametrize("version, abi", [
    ((7, 2, 22), 1), ((8, 0, 0), 1), ((8, 2, 2), 1), ((9, 0, 0), 2), ((9, 1, 0), 3), ((9, 2, 1), 3),
    ((10, 0, 0), 3), ((10, 2, 0), 3),
])
def test_abi_follows_the_qemu_version(version, abi):
    assert abi_for(version) == abi


@pytest.mark.parametrize("version", [(6, 2, 0), (7, 1, 0), (11, 0, 0)])
def test_unsupported_qemu_version_is_named(version):
    with pytest.raises(ShimError, match=r"QEMU {}\.{}\.{} ".format(*version)):
        abi_for(version)


def test_phys_addr_meaning_changed_in_8_2():
    assert phys_mode_for((7, 2, 22)) == phys_mode_for((8, 1, 5)) == "ramaddr"
    assert phys_mode_for((8, 2, 0)) == phys_mode_for((10, 1, 0)) == "gpa"


def _exports(library: Path) -> set[str]:
    out = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True, check=True)
    return {line.split()[-1] for line in out.stdout.splitlines() if line.strip()}


@pytest.mark.parametrize("abi", [1, 2, 3])
def test_every_variant_builds_and_exports_only_the_two_symbols(tmp_path, abi):
    library = build_shim(abi=abi, cache=tmp_path)
    assert library.is_file() and library.parent.parent == tmp_path / "shim"
    assert library.parent.name.endswith(f"-abi{abi}")
    assert _exports(library) == {"qemu_plugin_install", "qemu_plugin_version"}


def test_cache_is_reused_and_rebuilt_when_the_source_changes(tmp_path):
    src = tmp_path / "mktme_shim.c"
    shutil.copy(source_path(), src)
    first = build_shim(abi=1, source=src, cache=tmp_path)
    stamp = first.stat().st_mtime_ns
    assert build_shim(abi=1, source=src, cache=tmp_path) == first
    assert first.stat().st_mtime_ns == stamp                       # not compiled again
    src.write_text(src.read_text() + "\n/* edited */\n")
    second = build_shim(abi=1, source=src, cache=tmp_path)
    assert second != first and second.is_file() and first.is_file()
    assert not [p for p in second.parent.iterdir() if p.name.startswith(".build-")]


@pytest.mark.qemu                      # the default ABI comes from the installed QEMU's version
def test_default_build_uses_the_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("QEMU_MKTME_CACHE", str(tmp_path))
    assert build_shim().is_relative_to(tmp_path / "shim")


def test_compile_error_carries_gccs_output(tmp_path):
    src = tmp_path / "mktme_shim.c"
    src.write_text(source_path().read_text().replace("static bool tlb_on, decode_api;", "static bool tlb_on decode_api;"))
    with pytest.raises(ShimError, match=r"(?s)building the shim .* failed:\n.*error") as info:
        build_shim(abi=1, source=src, cache=tmp_path)
    assert "decode_api" in str(info.value)
    assert not list((tmp_path / "shim").rglob("*.so"))


def test_missing_compiler_and_source(tmp_path):
    with pytest.raises(ShimError, match="cannot run /nonexistent/gcc"):
        build_shim(abi=1, cache=tmp_path, cc="/nonexistent/gcc")
    with pytest.raises(ShimError, match="cannot read the shim source"):
        build_shim(abi=1, cache=tmp_path, source=tmp_path / "nope.c")
    with pytest.raises(ValueError, match="abi"):
        build_shim(abi=4, cache=tmp_path)


def test_source_is_one_file_with_spdx_and_no_qemu_header():
    text = source_path().read_text()
    assert text.startswith("/* SPDX-License-Identifier: GPL-2.0-or-later")
    assert "#include <qemu-plugin.h>" not in text and '#include "qemu-plugin.h"' not in text
    assert os.listdir(source_path().parent) and not list(source_path().parent.glob("*.h"))


def test_a_built_shim_is_used_without_gcc_on_the_path(tmp_path, monkeypatch):
    """Built once, then asked for where PATH has no gcc (a service's minimal PATH): the cached
    shim is returned, nothing is compiled."""
    first = build_shim(abi=1, cache=tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert build_shim(abi=1, cache=tmp_path) == first
