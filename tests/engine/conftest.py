import pytest

from qemu_mktme.engine.platform import Platform


@pytest.fixture
def active() -> Platform:
    p = Platform(maxphyaddr=46, max_keyid_bits=6, max_keys=63)
    p.bios_activate(keyid_bits=6)
    return p
