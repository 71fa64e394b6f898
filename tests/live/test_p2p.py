"""Migration between two running hosts through their control sockets (live/p2p.py): the source
host drives it, so an abandoned client changes nothing; the destination owns its pending incoming
VM, torn down (QEMU, KeyID and key) when the connection that asked for it goes or it stalls."""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest

from qemu_mktme.errors import MigrationError
from qemu_mktme.live.control import ControlClient
from qemu_mktme.live.migrate import config_to_json
from qemu_mktme.live.p2p import migrate_between
from qemu_mktme.live.session import HostSession, VmSpec
from qemu_mktme.qemu.machine import MachineConfig
from qemu_mktme.tenant.pki import create_pki

from helpers import eventually, patience

pytestmark = pytest.mark.qemu
BITS = 4
WORD = "0011223344556677"


async def _cpu_key(config, tenant, key_name):
    """The destination's key source: its own CPU makes a key (the tenant's broker, in attest/migrate.py)."""
    return "type=cpu"


def _names() -> tuple[str, str]:
    return f"p2p-{os.getpid()}-a", f"p2p-{os.getpid()}-b"


async def _hosts(baremetal_image, stall: float = 60.0):
    a, b = _names()
    config = MachineConfig(boot=baremetal_image.boot(), memory="128M", name="bm")
    src = HostSession([VmSpec(config, "t", "type=cpu")], keyid_bits=BITS, name=a, key_source=_cpu_key,
                      stall_timeout=stall)
    dst = HostSession([], keyid_bits=BITS, name=b, key_source=_cpu_key, stall_timeout=stall)
    return src, dst


def _clean(host: HostSession) -> None:
    """No VM, no incoming VM, no KeyID and no key left on ``host``."""
    q = host.query()
    assert q["guests"] == {} and q["incoming"] == {}, q
    assert host.host.keys.keyids.in_use == [] and q["keyids"] == []
    assert host.host.keys.keys() == [], host.host.keys.keys()                # no key loaded either


async def _where(src: HostSession, dst: HostSession) -> HostSession:
    """The one host that runs ``bm`` once both settled (never both, never neither)."""
    await eventually(lambda: not src._migrating and not dst._incoming, 30, "the hosts to settle")
    on = [h for h in (src, dst) if "bm" in h.machines]
    assert len(on) == 1, [h.name for h in on]
    return on[0]


async def _check_word(vm) -> None:
    await vm.console.command("crc 0x200000 8", r"ok crc32 .*\n", patience(20))
    assert vm.ram.read(0x200000, 8) == bytes.fromhex(WORD)


async def test_migrate_between_running_hosts_and_back(baremetal_image, tmp_path):
    tls = create_pki(tmp_path / "pki", client_cn="t").directory
    src, dst = await _hosts(baremetal_image)
    async with src, dst:
        vm = src.machines["bm"]
        await vm.console.wait_for("mktme> ", patience(20))
        await vm.console.command(f"writehex 0x200000 {WORD}", r"ok writehex .*\n")
        seen: list[tuple[int, int]] = []
        result = await migrate_between("bm", source=src.name, to=dst.name, tls=tls,
                                       progress=lambda d, t: seen.append((d, t)))
        assert result.tls and result.source_keyid == 1 and seen and seen[-1][1] >= 128 << 20
        _clean(src)
        moved = dst.machines["bm"]
        assert moved.keyid == result.dest_keyid and moved.guest.check_consistency() == []
        await _check_word(moved)
        with pytest.raises(MigrationError, match="is this host"):
            await migrate_between("bm", source=dst.name, to=dst.name, tls=tls)
        with pytest.raises(MigrationError, match="no VM named 'ghost'"):
            await migrate_between("ghost", source=dst.name, to=src.name, tls=tls)
        back = await migrate_between("bm", source=dst.name, to=src.name, tls=tls)
        assert back.dest_keyid == src.machines["bm"].keyid
        _clean(dst)
        await _check_word(src.machines["bm"])


async def test_an_abandoned_client_changes_nothing_and_a_retry_works(baremetal_image, tmp_path):
    """The client gone in the middle (its task cancelled: its connection closes, as a kill -9
    closes it): the source host finishes the migration on its own; then both directions work."""
    tls = create_pki(tmp_path / "pki", client_cn="t").directory
    src, dst = await _hosts(baremetal_image)
    async with src, dst:
        await src.machines["bm"].console.wait_for("mktme> ", patience(20))
        await src.machines["bm"].console.command(f"writehex 0x200000 {WORD}", r"ok writehex .*\n")
        client = asyncio.create_task(migrate_between("bm", source=src.name, to=dst.name, tls=tls))
        await eventually(lambda: bool(dst._incoming), 30, "the destination to prepare")
        client.cancel()                                   # the client dies while the RAM streams
        with contextlib.suppress(asyncio.CancelledError):
            await client
        here = await _where(src, dst)
        there = dst if here is src else src
        _clean(there)
        await _check_word(here.machines["bm"])
        for a, b in ((here, there), (there, here)):       # a retry in both directions
            await migrate_between("bm", source=a.name, to=b.name, tls=tls)
            _clean(a)
            await _check_word(b.machines["bm"])


async def test_an_incoming_vm_whose_source_went_away_is_torn_down(baremetal_image, tmp_path):
    """A prepared destination (QEMU bound to a KeyID with the tenant's key, listening) whose
    source connection closes: QEMU, KeyID and key are gone at once, and the next migration works."""
    tls = create_pki(tmp_path / "pki", client_cn="t").directory
    src, dst = await _hosts(baremetal_image)
    async with src, dst:
        vm = src.machines["bm"]
        async with await ControlClient.connect(host=dst.name) as fake_source:
            prepared = await fake_source.call("migrate-prepare", config=config_to_json(vm.config), tenant="t",
                                              tls=str(tls))
            q = dst.query()
            assert q["incoming"]["bm"]["keyid"] == prepared["keyid"] == 1          # visible in query
            pid = q["incoming"]["bm"]["pid"]
            assert dst.host.keys.keyids.in_use != []
        await eventually(lambda: not dst._incoming, 10, "the incoming VM to be torn down")
        _clean(dst)
        await eventually(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid), 10, "QEMU to exit")
        await migrate_between("bm", source=src.name, to=dst.name, tls=tls)
        assert "bm" in dst.machines
        _clean(src)


async def test_an_incoming_vm_that_makes_no_progress_is_torn_down(baremetal_image, tmp_path):
    """The source host's connection stays open but nothing comes (a stopped source): after the
    stall timeout the destination tears its incoming VM down, and says so to a late Finish."""
    tls = create_pki(tmp_path / "pki", client_cn="t").directory
    src, dst = await _hosts(baremetal_image, stall=2.0)
    async with src, dst:
        vm = src.machines["bm"]
        async with await ControlClient.connect(host=dst.name) as stalled:
            await stalled.call("migrate-prepare", config=config_to_json(vm.config), tenant="t", tls=str(tls))
            await eventually(lambda: not dst._incoming, 15, "the stalled incoming VM to be torn down")
            _clean(dst)
            with pytest.raises(MigrationError, match="no incoming migration of VM 'bm'"):
                await stalled.call("migrate-finish", vm="bm", run=True)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
