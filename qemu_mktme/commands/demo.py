"""``qemu-mktme demo``: the story in under a minute."""

from __future__ import annotations

from typing import Any

from ..demo import story
from ..demo import tenant as tenant_story


def register(sub: Any) -> None:
    dm = sub.add_parser("demo", help="the story in under a minute (what 'make demo' runs)",
                        description="Boot the stock Debian guest with a tenant key, show the KeyID assignment, "
                                    "a secret in the CPU view and not in DRAM, an encrypted snapshot restored "
                                    "with the guest continuing, a transparency check, and a PNG DRAM map.")
    dm.add_argument("--png", default="mktme-demo.png", help="where to write the KeyID/entropy map (default: %(default)s)")
    dm.add_argument("--tenant", action="store_true",
                    help="the tenant's story instead: key server, attested host, encrypted image, tampered host refused")
    dm.set_defaults(func=lambda a: tenant_story.main() if a.tenant else story.main(a.png))
