"""qemu-mktme as a pytest plugin (entry point ``pytest11``: loaded wherever the package is).

Options (``--mktme-guest``, ``--mktme-memory``, ``--mktme-key``, ``--mktme-keyid-bits``,
``--mktme-boot-timeout``, each with an ini twin), the ``mktme_vm`` marker, fixtures
(``mktme_host``, ``mktme_vm``, ``mktme_images``, ``mktme_settings``) and assertions
(:mod:`.assertions`). A first test::

    from qemu_mktme.pytest_plugin import assert_not_in_dram, expect_console

    @pytest.mark.mktme_vm(commands=["write 0x200000 my-secret"])
    async def test_secret_is_encrypted(mktme_vm):
        await expect_console(mktme_vm, r"ok write")
        assert mktme_vm.ram.read(0x200000, 9) == b"my-secret"
        assert_not_in_dram(mktme_vm, b"my-secret")
"""

from __future__ import annotations

import pytest

from .assertions import assert_ciphertext, assert_not_in_dram, expect_console, find_in_dram
from .fixtures import mktme_host, mktme_images, mktme_settings  # noqa: F401 - fixtures, found by pytest
from .options import add_options, settings

try:
    from .fixtures import mktme_vm  # noqa: F401
except ImportError:  # pragma: no cover - without pytest-asyncio there is no async fixture
    pass

__all__ = ["assert_ciphertext", "assert_not_in_dram", "expect_console", "find_in_dram"]


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "mktme_vm(guest=, memory=, key=, tenant=, workload=, params=, commands=, "
                                       "name=, wait=): how the mktme_vm fixture boots its guest")
    settings(config)  # fail fast on bad values, before collection


def pytest_report_header(config: pytest.Config) -> str:
    return settings(config).header()
