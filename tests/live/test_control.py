"""The control socket answers every request exactly once, checks each command's arguments in
one place, keeps the error's class across the socket, and lets no connection stall another."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

from qemu_mktme.errors import AttachError, MigrationError, RemoteError, SnapshotError, remote_error
from qemu_mktme.live import control
from qemu_mktme.live.control import Arg, Command, Connection, ControlServer
from qemu_mktme.live.session import HostSession

from helpers import eventually, patience


async def _exchange(path, raw: bytes, *, lines: int = 1) -> list[dict]:
    """Send ``raw`` on a fresh connection; the answer lines (up to ``lines``) before EOF."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(raw)
        await writer.drain()
        out = []
        while len(out) < lines:
            line = await asyncio.wait_for(reader.readline(), patience(10))
            if not line:
                break
            out.append(json.loads(line))
        return out
    finally:
        writer.close()


@pytest.fixture
async def host():
    async with HostSession([], keyid_bits=4, name=f"control-{os.getpid()}") as session:
        yield session


@pytest.mark.parametrize("raw, match", [
    (b'{"cmd":"dump"}', "dump: missing argument 'path'"),
    (b'{"cmd":"dump","path":123}', "dump: argument 'path': expected a string, got an integer"),
    (b'{"cmd":"dump","path":"/x","vms":[1]}', "dump: argument 'vms': expected a list of strings"),
    (b'{"cmd":"snapshot-save","kek":"' + b"11" * 32 + b'"}', "snapshot-save: missing argument 'path'"),
    (b'{"cmd":"snapshot-save","path":"/tmp/x","kek":"' + b"00" * 32 + b'"}', "all zeros"),
    (b'{"cmd":"snapshot-save","path":"/tmp/x","kek":"' + b"11" * 31 + b'"}', "32 bytes"),
    (b'{"cmd":"snapshot-save","path":"/tmp/x","kek":"zz"}', "64 hex digits"),
    (b'{"cmd":"migrate-prepare","config":{},"tenant":"t"}', "lacks 'memory'"),
    (b'{"cmd":"migrate-prepare","config":[],"tenant":"t"}', "argument 'config': expected an object, got a list"),
    (b'{"cmd":"migrate-prepare","config":{"name":"a","memory":1048576,"cpus":1,"accel":"tcg","machine":"q35"}}',
     "missing argument 'tenant'"),
    (b'{"cmd":"migrate-finish","vm":"a","run":1}', "argument 'run': expected a boolean, got an integer"),
    (b'{"cmd":"query","name":"a","bogus":1}', "unknown argument 'bogus'"),
    (b'{"cmd":"query","name":NaN}', "not a finite number"),
    (b'{"cmd":"nope"}', "unknown command 'nope'"),
    (b'[1,2]', "a JSON object with a string 'cmd'"),
    (b'{"cmd":', "not a JSON request"),
    (b'\xff\xfe', "not a JSON request"),
    (b'[' * 100_000 + b']' * 100_000, "nested too deeply"),
])
async def test_every_bad_request_gets_one_error_line(host, raw, match):
    answers = await _exchange(host.control_path, raw + b"\n" + b'{"cmd":"query"}\n', lines=2)
    assert len(answers) == 2, answers
    bad, good = answers
    assert bad["ok"] is False and match in bad["error"] and bad["type"], bad
    assert set(bad) == {"ok", "error", "type"}
    assert good["ok"] is True and good["result"]["guests"] == {}       # the connection serves on


async def test_a_request_too_long_is_answered_then_closed(host):
    answers = await _exchange(host.control_path, b'{"cmd":"query","name":"' + b"a" * (control.MAX_REQUEST + 10)
                              + b'"}\n', lines=2)
    assert len(answers) == 1 and answers[0]["ok"] is False and "longer than" in answers[0]["error"]


async def test_the_client_keeps_the_error_class(host):
    with pytest.raises(ValueError, match="all zeros") as refused:
        await control.request("snapshot-save", host=host.name, path="/tmp/nowhere.snap", kek="00" * 32)
    assert isinstance(refused.value, RemoteError) and not isinstance(refused.value, AttachError)
    with pytest.raises(MigrationError, match="no incoming migration of VM 'ghost'") as unknown:
        await control.request("migrate-finish", host=host.name, vm="ghost", run=True)
    assert isinstance(unknown.value, RemoteError) and unknown.value.remote_type == "MigrationError"
    assert isinstance(remote_error("SnapshotError", "host x: refused"), SnapshotError)


async def test_zero_kek_is_refused_by_the_library_too(host):
    """The same check when the KEK comes through the library (pytest plugin, HostSession.save)."""
    from qemu_mktme.files.snapfile import Keys
    with pytest.raises(ValueError, match="all zeros"):
        Keys(bytes(32), b"s" * 32, b"i" * 16)


async def _idle_server(tmp_path, **kw) -> ControlServer:
    async def echo(args: dict, conn: Connection) -> dict:
        return {"echo": args["text"]}
    return ControlServer({"echo": Command(echo, {"text": Arg((str,), required=True)})}, path=tmp_path / "c.sock", **kw)


async def test_idle_and_half_sent_connections_do_not_stall_others(tmp_path):
    async with await _idle_server(tmp_path, idle_timeout=patience(1), request_timeout=patience(0.5)) as server:
        idle_r, idle_w = await asyncio.open_unix_connection(str(server.path))
        half_r, half_w = await asyncio.open_unix_connection(str(server.path))
        half_w.write(b'{"cmd": "echo", "te')
        await half_w.drain()
        answers = await asyncio.gather(*(_exchange(server.path, b'{"cmd":"echo","text":"%d"}\n' % n)
                                         for n in range(20)))
        assert [a[0]["result"]["echo"] for a in answers] == [str(n) for n in range(20)]
        for reader in (idle_r, half_r):                   # all answered while the silent peers still wait
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(1), 0.01)
        t0 = time.monotonic()
        timed_out = json.loads(await asyncio.wait_for(half_r.readline(), patience(5)))
        assert timed_out["ok"] is False and timed_out["type"] == "Timeout"
        assert await asyncio.wait_for(half_r.read(), patience(5)) == b""          # then closed
        assert await asyncio.wait_for(idle_r.read(), patience(5)) == b""          # closed without a word
        assert time.monotonic() - t0 < patience(5)
        for w in (idle_w, half_w):
            w.close()


async def test_connections_are_bounded_by_requests_in_flight(tmp_path):
    """Past the bound a newcomer is turned away only when every slot has a request in flight;
    those requests are answered, none of them evicted."""
    release = asyncio.Event()

    async def hold(args: dict, conn: Connection) -> str:
        await release.wait()
        return args["text"]
    commands = {"hold": Command(hold, {"text": Arg((str,), required=True)})}
    async with ControlServer(commands, path=tmp_path / "c.sock", max_connections=3) as server:
        held = [await asyncio.open_unix_connection(str(server.path)) for _ in range(3)]
        for n, (_, w) in enumerate(held):
            w.write(b'{"cmd":"hold","text":"%d"}\n' % n)
            await w.drain()
        await eventually(lambda: server.connections == 3, 5, "three requests in flight")
        for _ in range(20):
            busy = await _exchange(server.path, b'{"cmd":"hold","text":"y"}\n')
            assert busy[0]["ok"] is False and busy[0]["type"] == "HostBusy" and "in flight" in busy[0]["error"]
        release.set()
        for n, (r, w) in enumerate(held):
            assert json.loads(await asyncio.wait_for(r.readline(), patience(5)))["result"] == str(n)
            w.close()
        assert server.evicted == 0


async def test_idle_connections_give_their_slots_to_a_real_request(tmp_path):
    """300 idle connections of the same user against 64 slots: a real request is answered at
    once (an idle one is closed for it, with a HostBusy line); a request in flight is never evicted."""
    release = asyncio.Event()

    async def hold(args: dict, conn: Connection) -> str:
        await release.wait()
        return "held"

    async def echo(args: dict, conn: Connection) -> str:
        return args["text"]
    commands = {"hold": Command(hold), "echo": Command(echo, {"text": Arg((str,), required=True)})}
    async with ControlServer(commands, path=tmp_path / "c.sock") as server:
        assert server.max_connections == control.MAX_CONNECTIONS == 64
        in_flight = await asyncio.open_unix_connection(str(server.path))
        in_flight[1].write(b'{"cmd":"hold"}\n')
        await in_flight[1].drain()
        await eventually(lambda: server.connections == 1, 5, "the held request in flight")
        asked = await asyncio.open_unix_connection(str(server.path))      # asked once, then idle
        asked[1].write(b'{"cmd":"echo","text":"once"}\n')
        assert json.loads(await asked[0].readline())["result"] == "once"
        idle = [await asyncio.open_unix_connection(str(server.path)) for _ in range(300)]
        t0 = time.monotonic()
        answer = await _exchange(server.path, b'{"cmd":"echo","text":"real"}\n')
        assert answer == [{"ok": True, "result": "real"}]
        assert time.monotonic() - t0 < patience(1)
        assert server.connections <= 64 and server.evicted >= 300 - 64 + 1
        # the connections that never asked go first, the oldest first; the one that asked serves on
        assert json.loads(await asyncio.wait_for(idle[0][0].readline(), patience(5)))["type"] == "HostBusy"
        asked[1].write(b'{"cmd":"echo","text":"again"}\n')
        assert json.loads(await asyncio.wait_for(asked[0].readline(), patience(5)))["result"] == "again"
        release.set()
        assert json.loads(await asyncio.wait_for(in_flight[0].readline(), patience(5))) == {"ok": True,
                                                                                            "result": "held"}
        for _, w in [in_flight, asked, *idle]:
            w.close()


async def test_a_connection_that_asks_nothing_has_a_short_first_deadline(tmp_path):
    async with await _idle_server(tmp_path, idle_timeout=patience(30), first_request_timeout=patience(0.5)) as server:
        silent_r, silent_w = await asyncio.open_unix_connection(str(server.path))
        asked_r, asked_w = await asyncio.open_unix_connection(str(server.path))
        asked_w.write(b'{"cmd":"echo","text":"x"}\n')
        assert json.loads(await asked_r.readline())["ok"] is True
        t0 = time.monotonic()
        assert await asyncio.wait_for(silent_r.read(), patience(5)) == b""       # closed without a word
        assert time.monotonic() - t0 < patience(3)
        asked_w.write(b'{"cmd":"echo","text":"still"}\n')                      # the other one serves on
        assert json.loads(await asked_r.readline())["result"] == {"echo": "still"}
        for w in (silent_w, asked_w):
            w.close()


async def test_state_a_connection_owns_goes_with_it(tmp_path):
    torn: list[str] = []
    done = asyncio.Event()

    async def take(args: dict, conn: Connection) -> str:
        async def teardown() -> None:
            torn.append(args["text"])
            done.set()
        conn.own(args["text"], teardown)
        return "owned"

    async def give_back(args: dict, conn: Connection) -> bool:
        return conn.disown(args["text"]) is not None
    commands = {"take": Command(take, {"text": Arg((str,), required=True)}),
                "give-back": Command(give_back, {"text": Arg((str,), required=True)})}
    async with ControlServer(commands, path=tmp_path / "c.sock", idle_timeout=0.5) as server:
        async with await control.ControlClient.open(server.path) as c:
            assert await c.call("take", text="a") == "owned"
            assert await c.call("take", text="b") == "owned"
            assert await c.call("give-back", text="b") is True
            await asyncio.sleep(1.0)                      # owning: the idle deadline does not apply
            assert await c.call("take", text="c") == "owned"
        await asyncio.wait_for(done.wait(), patience(5))
        await asyncio.sleep(0.1)
        assert sorted(torn) == ["a", "c"]


def test_a_missing_host_is_attach_error():
    with pytest.raises(AttachError, match="no running"):
        asyncio.run(control.request("query", host="no-such-host-22"))
