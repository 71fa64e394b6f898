"""Live migration of an attested MKTME guest between two emulated hosts over QEMU's TLS: the
Linux ``counter`` guest keeps counting on the destination, whose DRAM is ciphertext under the key
the broker released to it and the KeyID it chose; a relay on the wire sees none of the guest's
secret with TLS and sees it without; the refusals leave the source running."""

from __future__ import annotations

import re
import secrets

import pytest

from qemu_mktme.errors import AttestationError, MigrationError
from qemu_mktme.live.migrate import check_tls_dir, migrate
from qemu_mktme.live.relay import Relay
from qemu_mktme.live.session import HostSession
from qemu_mktme.qemu.machine import MachineConfig
from qemu_mktme.tenant import admin
from qemu_mktme.attest.launch import TenantLaunch, attested_session
from qemu_mktme.attest.migrate import attested_migration
from qemu_mktme.tenant.pki import create_pki

from helpers import patience
from reference import xts_lines

BITS = 6


def _find(ram, needle: bytes) -> int | None:
    """The backend offset of ``needle`` in a guest's RAM (CPU view), read in slices."""
    mv, step = ram.backend, 16 << 20
    for off in range(0, len(mv), step):
        i = bytes(mv[off:off + step + len(needle)]).find(needle)
        if i >= 0:
            return off + i
    return None


async def _count(vm) -> int:
    return int((await vm.console.wait_for(r"^count (\d+)\r?\n", patience(30)))[1])


@pytest.mark.qemu
async def test_attested_tls_migration_keeps_the_guest_and_hides_its_memory(mktme_keyserver, linux_image,
                                                                          tmp_path_factory):
    base = tmp_path_factory.mktemp("migrate")
    secret = secrets.token_hex(12).encode()          # in the guest's RAM only (its kernel command line)
    boot = linux_image.boot(workload="counter", params={"period": "0.1"}, append=f"migsecret={secret.decode()}")
    dirs = {h: base / "hosts" / h for h in ("h1", "h2")}
    admin.make_policy(mktme_keyserver.tenant, boot, hosts=["h1", "h2"], keyid_bits=BITS, host_dirs=dirs)
    tls = mktme_keyserver.tenant.pki.directory
    other_ca = create_pki(base / "other-ca", client_cn="mallory").directory
    ks = mktme_keyserver
    src_launch = TenantLaunch(ks.url, ks.ca, host="h1", host_dir=dirs["h1"])
    config = MachineConfig(boot=boot, memory="512M", name="vm1")
    async with attested_session(src_launch, config, tenant="pytest", keyid_bits=BITS, control=False) as h1, \
            HostSession([], keyid_bits=BITS, control=False) as h2:
        h2.host.keys.add("other:vm", "type=cpu", tenant="other")     # KeyID 1 is taken on h2
        vm = h1.machines["vm1"]
        before = await _count(vm)
        dest = TenantLaunch(ks.url, ks.ca, host="h2", host_dir=dirs["h2"])

        # refusals: each leaves the source counting and the destination empty
        with pytest.raises(MigrationError, match="without TLS"):
            await attested_migration(h1, "vm1", h2, dest, tls=None)
        stranger = TenantLaunch(ks.url, ks.ca, host="h9", host_dir=base / "hosts" / "h9")
        with pytest.raises(AttestationError, match="never enrolled"):
            await attested_migration(h1, "vm1", h2, stranger, tls=tls)
        with pytest.raises(MigrationError, match=r"TLS handshake between the hosts failed.*known issuer.*same CA"):
            await attested_migration(h1, "vm1", h2, dest, tls=tls, dest_tls=other_ca)
        assert not h2.machines and [a.keyid for a in h2.host.keys.keyids.in_use] == [1]
        assert await _count(vm) > before
        source_keyid = vm.keyid

        # the migration, through a relay that keeps what it forwards
        relays: list[Relay] = []

        def via(port: int) -> int:
            relays.append(Relay(port).__enter__())
            return relays[-1].port
        seen_progress: list[str] = []
        result = await attested_migration(h1, "vm1", h2, dest, tls=tls, via=via,
                                          progress=lambda info: seen_progress.append(info["status"]))
        for r in relays:
            r.__exit__()
        assert result.tls and seen_progress[-1] == "completed"
        moved = h2.machines["vm1"]
        assert "vm1" not in h1.machines and h1.host.keys.keyids.in_use == []     # source KeyID free
        assert source_keyid == result.source_keyid == 1
        assert moved.keyid == result.dest_keyid != 1                               # h2's own choice
        assert moved.guest.check_consistency() == []           # EPT, VMM page table, IOMMU: that KeyID
        last = int(re.findall(r"count (\d+)", vm.console.transcript)[-1])
        first = await _count(moved)                  # the same shell, carrying on from where it was
        assert last <= first <= last + 5, (last, first)

        # the destination's DRAM: the broker's key, tweak = the destination HPA
        key = ks.kmip().get_key(ks.tenant.key_uid("vm"))
        off = _find(moved.ram, secret)
        assert off is not None
        gpa = int(moved.ram.gpa_of(off & ~0xFFF))
        hpa = int(moved.guest.hpa_of(gpa))
        plain = moved.ram.read(gpa, 4096)
        assert moved.guest.dram(gpa, 4096) == xts_lines(key[:16], key[16:], hpa, plain)
        assert moved.guest.find_in_dram(secret) is None
        captured = b"".join(bytes(r.data) for r in relays)
        assert len(captured) > 64 << 20 and secret not in captured                 # all RAM crossed, sealed

        # the same capture without TLS does see the secret (the check can fail)
        payload = h2.host.keys.payload(moved.key_serial, "pytest")
        relays.clear()
        back = await h2.migrate("vm1", h1, payload, tls=None, insecure=True, via=via)
        for r in relays:
            r.__exit__()
        assert not back.tls and secret in b"".join(bytes(r.data) for r in relays)
        assert await _count(h1.machines["vm1"]) > 0


def test_tls_directory_must_hold_qemus_files(tmp_path):
    (tmp_path / "ca-cert.pem").write_text("x")
    with pytest.raises(MigrationError, match=r"missing server-cert\.pem"):
        check_tls_dir(tmp_path)


def test_relay_forwards_both_ways_and_keeps_the_bytes():
    import socket
    server = socket.create_server(("127.0.0.1", 0))
    with Relay(server.getsockname()[1]) as relay:
        c = socket.create_connection(("127.0.0.1", relay.port))
        s, _ = server.accept()
        c.sendall(b"ping" * 1000)
        got = b""
        while len(got) < 4000:
            got += s.recv(65536)
        s.sendall(b"pong")
        assert c.recv(4) == b"pong" and got == b"ping" * 1000
        c.close()
        s.close()
    server.close()
    assert relay.seen(b"ping" * 1000) and relay.seen(b"pong")


def test_migrate_command_errors_are_one_line(capsys, tmp_path):
    from qemu_mktme import cli
    assert cli.main(["migrate", "vm1", "--from", "no-such-host-15", "--to", "h2"]) == 1
    err = capsys.readouterr().err
    assert err == "qemu-mktme: error: no running 'qemu-mktme run' found named 'no-such-host-15'\n"
    assert cli.main(["migrate", "vm1", "--from", "no-such-host-15", "--to", "h2", "--tls", str(tmp_path)]) == 1
    assert "no running" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        cli.main(["host", "start", "h2"])               # a host that takes VMs needs the tenant's broker
    assert exited.value.code == 2 and "--tenant-server" in capsys.readouterr().err


@pytest.mark.qemu
async def test_vm_migrate_with_a_cpu_key_gets_a_new_cpu_key_on_the_destination(baremetal_image, tmp_path):
    """``await migrate(vm, dest)``: a CPU-generated key never leaves the CPU; the destination's CPU
    makes its own, and the guest's memory (plaintext in the TLS stream) is whole there."""
    from qemu_mktme.host.host import Host
    from qemu_mktme.live.encrypted import EncryptedMachine
    tls = create_pki(tmp_path / "pki", client_cn="t").directory
    src, dst = Host(keyid_bits=BITS), Host(keyid_bits=BITS)
    serial = src.keys.add("t:bm", "type=cpu", tenant="t")
    async with EncryptedMachine(src, MachineConfig(boot=baremetal_image.boot(), memory="128M", name="bm"),
                                key_serial=serial, tenant="t") as vm:
        await vm.console.wait_for("mktme> ", patience(20))
        await vm.console.command("writehex 0x200000 00112233445566778899aabbccddeeff", r"ok writehex .*\n")
        old_dram = vm.guest.dram(0x200000, 64)
        moved, result = await migrate(vm, dst, tls=tls)
        async with moved:
            await moved.console.command("crc 0x200000 16", r"ok crc32 .*\n", patience(20))
            assert moved.ram.read(0x200000, 16) == bytes.fromhex("00112233445566778899aabbccddeeff")
            assert moved.guest.query()["key-type"] == "cpu" and moved.guest.dram(0x200000, 64) != old_dram
            assert src.guests == {} and result.tls
