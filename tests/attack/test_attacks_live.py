"""The attacks on a running stock Linux guest: replay both ways, cipherleak both ways, and the
sanitizer seeing a guest load through the wrong KeyID with its instruction."""

from __future__ import annotations

import os
import random
import re

from qemu_mktme.attack.cipherleak import cipherleak
from qemu_mktme.attack.replay import default_guesses, pin_replay
from qemu_mktme.host.host import Host
from qemu_mktme.host.sanitizer import Sanitizer
from qemu_mktme.live.encrypted import EncryptedMachine
from qemu_mktme.live.launch import launch_machine
from qemu_mktme.pytest_plugin import assert_no_sanitizer_reports
from qemu_mktme.qemu.machine import MachineConfig
from qemu_mktme.trace.tracer import Tracer

from helpers import eventually, patience, qm


async def test_replay_unlocks_without_integrity_and_is_a_machine_check_with_it(linux_image):
    guesses = default_guesses("4711", 4)
    plain = await pin_replay(integrity=False, pin="4711", guesses=guesses, out=lambda _: None, timeout=patience(15))
    assert plain.unlocked and plain.attempts == 5 and plain.replays == 2 and plain.machine_check is None
    assert plain.guest_output[-1] == "mktme-linux: pin ok: unlocked"
    prompts = [m[1] for line in plain.guest_output if (m := re.search(r"wrong so far: (\d)", line))]
    assert prompts == ["1", "2", "1", "2"]                       # rolled back after each second wrong PIN
    assert sum("2 -> 0" in line for line in plain.log) == 2      # ... as the guest sees its counter
    mac = await pin_replay(integrity=True, pin="4711", guesses=guesses, out=lambda _: None, timeout=patience(30))
    assert not mac.unlocked and mac.replays == 1 and mac.machine_check is not None
    mc = mac.machine_check
    assert mc.line_gpa == mac.line_gpa == plain.line_gpa and mc.cause == "dram-write"
    assert mc.access.gpa == mac.line_gpa and mc.access.instruction is not None
    assert any("2 -> 2; the line is poisoned" in line for line in mac.log)


async def test_cipherleak_recovers_every_bit_and_falls_to_chance_with_a_counter(linux_image):
    rng = random.Random(16)
    secret = "01" + "".join(rng.choice("01") for _ in range(18))
    plain, mitigated = await cipherleak(secret=secret, period=0.02, out=lambda _: None, timeout=patience(30))
    assert plain.recovered == secret and plain.distinct_ciphertexts == 2
    assert mitigated.distinct_ciphertexts == len(secret)                # every store looks new
    assert mitigated.recovered == "1" * len(secret)                     # nothing equals the reference
    assert mitigated.correct == secret.count("1")


async def test_sanitizer_reports_a_guest_load_of_a_foreign_line_with_its_instruction(baremetal_image):
    heard = []
    host = Host(sanitizer=Sanitizer(heard.append))
    serial = host.keys.add("vm", "type=cpu", tenant="acme")
    other = host.keys.describe(host.keys.add("dev", "type=cpu", tenant="other"))["keyid"]
    config = MachineConfig(boot=baremetal_image.boot(), memory="256M", name="vm")
    async with Tracer() as tracer, await launch_machine(config, tracer=tracer, machine=lambda c: EncryptedMachine(
            host, c, key_serial=serial, tenant="acme")) as vm:
        await vm.console.wait_for("mktme> ", patience(10))
        await vm.console.command("crc 0x500000 64", r"ok crc32 .*\n")       # correct use: silent
        await tracer.flush()
        assert_no_sanitizer_reports(vm)
        vm.guest.write(0x500040, os.urandom(64), keyid=other)               # a VMM bug
        await vm.console.command("crc 0x500040 64", r"ok crc32 .*\n")
        await eventually(lambda: bool(heard), 5, "a sanitizer report")
        keyid = vm.keyid
    (r,) = heard
    assert r.rule == "a" and r.vm == "vm" and r.keyid == keyid and r.expected_keyid == other
    assert r.site.startswith("guest 0x") and "movzx" in r.site and "GPA 0x500040" in r.message


def test_run_sanitize_prints_a_summary(baremetal_image):
    out = qm("run", "--sanitize", "--no-input", "-c", "write 0x200000 hello", "-c", "poweroff")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "sanitizer summary: 0 reports" in out.stderr
    assert "(c) DMA through a KeyID other than the VM's: 0" in out.stderr
