"""Small helpers shared by test modules (imported as ``from helpers import ...``)."""

from __future__ import annotations

import os
import subprocess
import sys


def qm(*args: str, input: str | None = None, env: dict | None = None, timeout: float = 120):
    """Run the ``qemu-mktme`` command line in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "qemu_mktme.cli", *args], input=input, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
