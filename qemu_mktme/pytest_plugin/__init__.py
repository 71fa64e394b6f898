"""qemu-mktme as a pytest plugin (entry point ``pytest11``: loaded wherever the package is).

Options (``--mktme-guest``, ``--mktme-memory``, ``--mktme-key``, ``--mktme-keyid-bits``,
``--mktme-boot-timeout``, each with an ini twin), the ``mktme_vm`` marker, fixtures
(``mktme_host``, ``mktme_vm``, ``mktme_images``, ``mktme_settings``; ``mktme_host_pair``, two running
hosts to migrate between with ``await migrate_between(...)``, :mod:`.hosts`; the tenant's
``mktme_keyserver`` and ``mktme_attested_host``, :mod:`.tenant`; ``mktme_fleet``, three namespaced
machines under libvirt, :mod:`.fleet`) and assertions
(:mod:`.assertions`). Needs the extra: ``pip install 'qemu-mktme[pytest]'`` (pytest-asyncio for
the async fixtures; without it ``mktme_vm`` fails with one line saying so). A first test::

    from qemu_mktme.pytest_plugin import assert_not_in_dram, expect_console

    @pytest.mark.mktme_vm(commands=["write 0x200000 my-secret"])
    async def test_secret_is_encrypted(mktme_vm):
        await expect_console(mktme_vm, r"ok write")
        assert mktme_vm.ram.read(0x200000, 9) == b"my-secret"
        assert_not_in_dram(mktme_vm, b"my-secret")
"""

from __future__ import annotations

import pytest

from .assertions import (assert_ciphertext, assert_no_sanitizer_reports, assert_not_in_dram, expect_console,
                         find_in_dram)
from .fixtures import mktme_host, mktme_images, mktme_settings, mktme_vm  # noqa: F401 - fixtures, found by pytest
from .hosts import mktme_host_pair  # noqa: F401 - fixture, found by pytest
from ..live.p2p import migrate_between
from .options import add_options, settings
from .tenant import mktme_attested_host, mktme_keyserver  # noqa: F401 - fixtures, found by pytest
from .fleet import mktme_fleet, mktme_fleet_boot  # noqa: F401 - fixtures, found by pytest

__all__ = ["assert_ciphertext", "assert_no_sanitizer_reports", "assert_not_in_dram", "expect_console",
           "find_in_dram", "migrate_between"]


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    _default_loop_scope(config)
    config.addinivalue_line("markers", "mktme_vm(guest=, memory=, key=, tenant=, workload=, params=, commands=, "
                                       "name=, wait=): how the mktme_vm fixture boots its guest")
    settings(config)  # fail fast on bad values, before collection


def _default_loop_scope(config: pytest.Config) -> None:
    """Our async fixtures are function-scoped: say so when the user's ini does not, before
    pytest-asyncio's own configure hook warns that the option is unset."""
    try:
        if not config.getini("asyncio_default_fixture_loop_scope"):
            config._inicache["asyncio_default_fixture_loop_scope"] = "function"
    except (ValueError, AttributeError):  # no pytest-asyncio (the option is unknown), or another pytest
        pass


def pytest_report_header(config: pytest.Config) -> str:
    return settings(config).header()
