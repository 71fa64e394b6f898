#!/usr/bin/env python3
"""``qemu-mktme inspect`` as a script: ``scripts/inspect_dump.py DUMP ACTION ...``.

    scripts/inspect_dump.py /tmp/dump map --png map.png
    scripts/inspect_dump.py /tmp/dump search 'TOP SECRET' --key @tenant.key --json
    scripts/inspect_dump.py /tmp/dump diff /tmp/dump2

Same actions, options, output and exit statuses as the subcommand (``--help`` lists them);
``--traceback`` anywhere shows the full traceback of an error.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qemu_mktme.cli import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    first = ["--traceback"] if "--traceback" in args else []
    sys.exit(main([*first, "inspect", *(a for a in args if a != "--traceback")]))
