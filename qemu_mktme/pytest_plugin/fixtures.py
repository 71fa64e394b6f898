"""Fixtures: an emulated host, and guests booted under it (configured by options and a marker).

    @pytest.mark.mktme_vm(guest="linux", workload="secret", params={"secret": "s3cr3t"})
    async def test_secret(mktme_vm):
        await expect_console(mktme_vm, r"secret at 0x")
        assert_not_in_dram(mktme_vm, "s3cr3t")
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ..host.host import Host
from ..host.sanitizer import Sanitizer
from ..keymaterial import key_payload
from .. import images
from ..live.encrypted import EncryptedMachine
from .options import Settings, settings

try:
    import pytest_asyncio
except ImportError:  # the async fixtures need pytest-asyncio: the extra qemu-mktme[pytest]
    pytest_asyncio = None  # type: ignore[assignment]  # tested below before each use

MISSING_ASYNCIO = "qemu-mktme's mktme_vm fixture needs pytest-asyncio: pip install 'qemu-mktme[pytest]'"

BOOT_MARKERS = {name: recipe.booted for name, recipe in images.RECIPES.items() if recipe.booted is not None}
MARKER_KEYS = {"guest", "memory", "key", "tenant", "workload", "params", "commands", "name", "wait"}


@pytest.fixture(scope="session")
def mktme_settings(pytestconfig: pytest.Config) -> Settings:
    """The effective ``--mktme-*`` settings."""
    return settings(pytestconfig)


@pytest.fixture
def mktme_host(mktme_settings: Settings) -> Host:
    """A freshly booted emulated MKTME host (BIOS-activated, 2^bits - 1 KeyIDs), with the
    KeyID-aliasing sanitizer collecting reports (``assert_no_sanitizer_reports``)."""
    return Host(keyid_bits=mktme_settings.keyid_bits, sanitizer=Sanitizer())


@pytest.fixture(scope="session")
def mktme_images() -> dict[str, images.Image]:
    """Both guest images, built into the cache if needed."""
    return {name: images.build(name) for name in images.RECIPES}


def _payload(spec: str) -> str:
    if spec == "user":
        return f"type=user key={os.urandom(16).hex()} tweak={os.urandom(16).hex()}"
    payload = key_payload(spec)
    if payload is None:
        raise pytest.UsageError("mktme_vm needs a key; use a plain Machine for key=none")
    return payload


def _vm_config(request: pytest.FixtureRequest, s: Settings, mktme_images: dict[str, images.Image]) -> dict[str, Any]:
    marker = request.node.get_closest_marker("mktme_vm")
    opts = dict(marker.kwargs) if marker else {}
    unknown = set(opts) - MARKER_KEYS
    if unknown:
        raise pytest.UsageError(f"mktme_vm marker: unknown {', '.join(sorted(unknown))} (known: {', '.join(sorted(MARKER_KEYS))})")
    guest = opts.get("guest", s.guest)
    if guest not in mktme_images:
        raise pytest.UsageError(f"mktme_vm marker: guest {guest!r} is not one of {', '.join(mktme_images)}")
    image = mktme_images[guest]
    name = opts.get("name") or request.node.name.replace("[", "-").replace("]", "")[:40]
    config = images.machine_config(guest, image=image, memory=opts.get("memory") or s.memory,
                                   commands=opts.get("commands", ()), workload=opts.get("workload"),
                                   params=opts.get("params"), name=name,
                                   overlay_dir=request.getfixturevalue("tmp_path") if image.disk else None)
    return {"guest": guest, "config": config,
            "payload": _payload(opts.get("key", s.key)), "tenant": opts.get("tenant", "pytest"),
            "wait": opts.get("wait", True)}


if pytest_asyncio is None:
    @pytest.fixture
    def mktme_vm() -> None:
        """Stands in for the async fixture when pytest-asyncio is missing: one clear line."""
        pytest.fail(MISSING_ASYNCIO, pytrace=False)
else:
    @pytest_asyncio.fixture
    async def mktme_vm(request: pytest.FixtureRequest, mktme_settings: Settings, mktme_host: Host,
                       mktme_images: dict[str, images.Image]) -> AsyncIterator[EncryptedMachine]:
        """A guest booted under MKTME on ``mktme_host``, up to its boot marker; torn down after.

        Chosen by ``--mktme-guest`` etc., overridden per test with ``@pytest.mark.mktme_vm(...)``
        (guest, memory, key, tenant, workload, params, commands, name, wait).
        """
        spec = _vm_config(request, mktme_settings, mktme_images)
        serial = mktme_host.keys.add(f"pytest:{spec['config'].name}", spec["payload"], tenant=spec["tenant"])
        vm = EncryptedMachine(mktme_host, spec["config"], key_serial=serial, tenant=spec["tenant"],
                              revoke_key_on_close=True)
        async with vm:
            if spec["wait"]:
                await vm.console.wait_for(BOOT_MARKERS[spec["guest"]], mktme_settings.boot_timeout)
            yield vm
