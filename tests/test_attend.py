"""attend: a terminal on a running host's VMs, on its own (the CLI's run, attach and restore use
it). Real guests: consoles streamed (prefixed per VM when there are several), the outcome told
on stderr and in the status, SIGTERM's event honoured; and the progress bar."""

from __future__ import annotations

import asyncio
import io

import pytest
from helpers import patience

from qemu_mktme import images
from qemu_mktme.attend import TERMINATED, ProgressBar, attend
from qemu_mktme.live.session import HostSession, VmSpec
from qemu_mktme.qemu.machine import MachineConfig


def _spec(image: images.Image, name: str, *commands: str) -> VmSpec:
    return VmSpec(MachineConfig(boot=image.boot(commands=list(commands)), memory="64M", name=name), "t", "type=cpu")


@pytest.mark.qemu
async def test_two_guests_are_streamed_with_their_names_and_their_exit_is_told(baremetal_image, capsys):
    specs = [_spec(baremetal_image, "a", "write 0x200000 AAA", "poweroff"),
             _spec(baremetal_image, "b", "write 0x200000 BBB", "poweroff")]
    async with HostSession(specs, control=False) as session:
        code = await asyncio.wait_for(attend(session, no_input=True), patience(30))
    out, err = capsys.readouterr()
    assert code == 0
    for name in ("a", "b"):
        assert f"[{name}] ok poweroff" in out                     # every console line carries its VM
        assert f"qemu-mktme: {name}: QEMU pid" in err and f"{name} powered off (QEMU exit status 0)" in err
    lines = [line for line in out.splitlines() if line.strip()]
    assert all(line.startswith(("[a] ", "[b] ")) for line in lines), lines[:5]
    assert "KeyID" in err and "(cpu, tenant t)" in err


@pytest.mark.qemu
async def test_one_guest_is_streamed_as_it_is(baremetal_image, capsys):
    async with HostSession([_spec(baremetal_image, "solo", "poweroff")], control=False) as session:
        assert await asyncio.wait_for(attend(session, no_input=True), patience(30)) == 0
    out, _ = capsys.readouterr()
    assert "ok poweroff" in out and "[solo]" not in out


@pytest.mark.qemu
async def test_the_termination_event_ends_it_and_the_guest_is_stopped(baremetal_image, capsys):
    terminated = asyncio.Event()
    TERMINATED.set(terminated)
    async with HostSession([_spec(baremetal_image, "idle")], control=False) as session:
        vm = session.machines["idle"]
        task = asyncio.create_task(attend(session, no_input=True))
        await vm.console.wait_for(images.BAREMETAL.booted or "", patience(20))
        terminated.set()                                            # what run_async's SIGTERM handler does
        assert await asyncio.wait_for(task, patience(10)) == 0
        assert vm.returncode is None                                # still running: the session stops it
    assert "stopped the guest" in capsys.readouterr().err


def test_the_progress_bar_draws_only_on_a_terminal(monkeypatch):
    err = io.StringIO()
    err.isatty = lambda: True                                       # type: ignore[method-assign]
    monkeypatch.setattr("sys.stderr", err)
    bar = ProgressBar("saving")
    bar(530 << 20, 1024 << 20)
    bar(531 << 20, 1024 << 20)                                      # same percent: not redrawn
    bar(1024 << 20, 1024 << 20)
    bar.close()
    assert err.getvalue() == ("\rsaving [############             ]  51%  530/1024 MiB"
                              "\rsaving [#########################] 100%  1024/1024 MiB\n")
    quiet = io.StringIO()
    monkeypatch.setattr("sys.stderr", quiet)
    silent = ProgressBar("saving")
    silent(1, 2)
    silent.close()
    assert quiet.getvalue() == ""
