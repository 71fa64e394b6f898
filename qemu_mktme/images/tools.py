"""The build host's tools, as the image builds use them: run one (its failure an ``ImageError``
naming the image and the tool), and hash what they make."""

from __future__ import annotations

import hashlib
import shlex
import subprocess
from pathlib import Path
from collections.abc import Callable, Sequence

from ..errors import ImageError

Say = Callable[[str], None]
"""say(message): what a build is doing now, one line."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_digest(root: Path) -> str:
    """sha256 over the relative names and contents of every file under ``root``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def run_tool(argv: Sequence[str], *, image: str, cwd: Path | None = None, what: str = "") -> str:
    try:
        out = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise ImageError(f"{argv[0]} not found: needed to {what or 'build'} the {image} image",
                         image=image) from err
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip()[-1500:]
        raise ImageError(f"{shlex.join(argv)} failed ({out.returncode}):\n{tail}", image=image)
    return out.stdout
