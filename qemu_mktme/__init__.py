"""qemu-mktme: Intel Multi-Key Total Memory Encryption emulated around unmodified QEMU.

Layers, imports only going down: ``arch`` (architectural definitions) -> ``engine`` (the
hardware model) -> ``host`` (the host software model) -> ``qemu`` (the live side) ->
``inspect`` / ``cli`` / ``pytest_plugin`` (the tools).
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
