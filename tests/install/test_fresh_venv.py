"""The package as a user installs it: ``pip install`` of this checkout, without extras, into a
fresh virtualenv; the command line works there and the test tools are not in it.

Needs the package index (or pip's cache); ``-m "not install"`` leaves it out.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

from helpers import patience

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parents[2]
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".hypothesis", "*.pyc")


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PYTEST", "QEMU_MKTME"))}
    env["QEMU_MKTME_CACHE"] = str(home / "cache")              # an empty cache: a new user's
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, str, dict[str, str]]:
    """(the venv's bin directory, pip's verbose output, the environment to run it with)."""
    base = tmp_path_factory.mktemp("fresh-install")
    src = base / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)             # pip builds in the tree: not in ours
    venv.EnvBuilder(with_pip=True).create(base / "venv")
    bindir = base / "venv" / "bin"
    env = _clean_env(base)
    pip = subprocess.run([str(bindir / "python"), "-m", "pip", "install", "-v", "--no-input",
                          "--disable-pip-version-check", str(src)], cwd=base, env=env, capture_output=True,
                         text=True, timeout=patience(150))
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    return bindir, pip.stdout + pip.stderr, env


def test_install_prints_no_license_deprecation(installed):
    _, output, _ = installed
    assert "Successfully installed" in output and "qemu-mktme-" in output
    warned = [line for line in output.splitlines() if re.search(r"deprecat", line, re.I) and "licen" in line.lower()]
    assert not warned, "\n".join(warned)
    assert "SetuptoolsDeprecationWarning" not in output, output[output.index("SetuptoolsDeprecationWarning") - 500:][:2000]


@pytest.mark.parametrize("args, expect", [
    (["--help"], "usage: qemu-mktme"),
    (["images", "list"], "baremetal"),
    (["inspect", "--help"], "usage: qemu-mktme inspect"),
])
def test_the_command_line_runs_without_the_test_tools(installed, tmp_path, args, expect):
    bindir, _, env = installed
    out = subprocess.run([str(bindir / "qemu-mktme"), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=patience(30))
    assert out.returncode == 0, out.stderr[-2000:]
    assert expect in out.stdout
    assert "Traceback" not in out.stderr


def test_the_test_tools_are_not_installed(installed, tmp_path):
    bindir, _, env = installed
    for module in ("pytest", "pytest_asyncio", "hypothesis"):
        out = subprocess.run([str(bindir / "python"), "-c", f"import {module}"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=patience(30))
        assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr, module
    out = subprocess.run([str(bindir / "python"), "-c", "import qemu_mktme, sys; print(qemu_mktme.__file__)"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=patience(30))
    assert out.returncode == 0 and str(bindir.parent) in out.stdout, out.stdout + out.stderr   # not the checkout
