"""The mktme key type: payload grammar, the (tenant, key) -> KeyID table, and the key service."""

from __future__ import annotations

import errno
import os

import pytest
from hypothesis import given, strategies as st

from qemu_mktme.arch import pconfig as pc
from qemu_mktme.engine.keytable import KeyMode
from qemu_mktme.errors import KeyServiceError
from qemu_mktme.host.host import Host
from qemu_mktme.host.keyids import KeyIdAllocator
from qemu_mktme.host.payload import KeyType, parse

from reference import user_payload

K16, T16 = bytes(range(16)), bytes(range(16, 32))


def errno_of(exc_info) -> int:
    return exc_info.value.errno


# ---------------------------------------------------------------- payload grammar

def test_payload_types():
    assert parse("type=cpu").type is KeyType.CPU
    p = parse(user_payload(K16, T16))
    assert (p.key, p.tweak) == (K16, T16)
    assert "00010203" not in repr(p) and "00010203" not in str(p)
    assert parse("type=no-encrypt").algorithm is None
    assert parse(user_payload(bytes(range(32)), bytes(range(1, 33)), "aes-xts-256")).algorithm.key_nbytes == 32
    assert parse("type=cpu key=0102 tweak=ff").key == b"\x01\x02"     # entropy


@pytest.mark.parametrize("payload, message", [
    ("", "type= is required"),
    ("type=gpu", "expected cpu, user"),
    ("type=user key=00", "needs key= and tweak="),
    (f"type=user key={'00' * 15} tweak={'00' * 16}", "must be 16 bytes"),
    (f"type=user key={'zz' * 16} tweak={'00' * 16}", "not hex"),
    ("type=clear algorithm=aes-xts-128", "takes no algorithm"),
    ("type=cpu algorithm=des", "expected aes-xts-128"),
    ("type=cpu type=user", "given twice"),
    ("type=cpu colour=blue", "unknown option"),
    ("type=cpu key=" + "00" * 17, "at most 16 bytes"),
    ("type=cpu " + "x" * 1100, "longer than 1024"),
    (f"type=user key={'00' * 16} tweak={'11' * 16}", "key= is all zeros"),
    (f"type=user key={'11' * 16} tweak={'00' * 16}", "tweak= is all zeros"),
    (f"type=user key={'11' * 16} tweak={'11' * 16}", "equal .*IEEE 1619"),
])
def test_bad_payloads_are_einval(payload, message):
    with pytest.raises(KeyServiceError, match=message) as e:
        parse(payload)
    assert errno_of(e) == errno.EINVAL


@given(st.text(max_size=200))
def test_any_payload_parses_or_is_einval(text):
    try:
        parse(text)
    except KeyServiceError as err:
        assert err.errno == errno.EINVAL


# ---------------------------------------------------------------- the KeyID table

def test_sharing_lru_and_exhaustion():
    a = KeyIdAllocator(max_keyid=3)
    fa, fb = a.fingerprint("key-a"), a.fingerprint("key-b")
    one, new = a.acquire("acme", fa, "vm1")
    assert new and one.keyid == 1
    again, new = a.acquire("acme", fa, "vm2")
    assert not new and again.keyid == 1 and again.refcount == 2        # same tenant, same key
    other, _ = a.acquire("globex", fa, "vm3")
    assert other.keyid == 2                                              # another tenant never shares
    third, _ = a.acquire("acme", fb, "vm4")
    assert third.keyid == 3
    with pytest.raises(KeyServiceError) as e:
        a.acquire("acme", a.fingerprint("key-c"), "vm5")
    assert errno_of(e) == errno.ENOKEY
    assert not a.release(1, "vm1") and a.release(1, "vm2")              # freed with its last user
    assert a.release(3, "vm4")
    assert a.next_free() == 1                                            # least recently freed first
    assert [x.keyid for x in a.in_use] == [2]


# ---------------------------------------------------------------- the key service

@pytest.fixture
def host():
    return Host(keyid_bits=6)


def test_add_programs_every_package_through_pconfig():
    host = Host(keyid_bits=4, packages=3)
    serial = host.keys.add("vm", user_payload(K16, T16), tenant="acme")
    keyid = host.keys.describe(serial)["keyid"]
    entries = [host.platform.key_entry(keyid, p) for p in range(3)]
    assert all(e.mode is KeyMode.ENCRYPT for e in entries)
    assert host.keys.pconfig_calls == 3
    assert host.platform.inconsistencies() == []
    assert host.platform.memory.read(host.keys.struct_hpa, pc.STRUCT_NBYTES) == bytes(pc.STRUCT_NBYTES)
    cpu = host.keys.add("vm2", "type=cpu", tenant="acme")            # RANDOM: own key per package
    assert host.platform.inconsistencies() == []
    assert host.keys.describe(cpu)["keyid"] != keyid


def test_the_64th_distinct_key_with_6_bits_is_enokey(host):
    serials = [host.keys.add(f"k{i}", user_payload(os.urandom(16), os.urandom(16)), tenant="acme")
               for i in range(63)]
    assert sorted(host.keys.describe(s)["keyid"] for s in serials) == list(range(1, 64))
    with pytest.raises(KeyServiceError) as e:
        host.keys.add("k63", user_payload(os.urandom(16), os.urandom(16)), tenant="acme")
    assert errno_of(e) == errno.ENOKEY
    host.keys.revoke(serials[10], tenant="acme")                        # unused: KeyID freed at once
    freed = 11
    assert host.platform.key_entry(freed).mode is KeyMode.CLEAR         # no tenant key left behind
    s = host.keys.add("again", user_payload(os.urandom(16), os.urandom(16)), tenant="acme")
    assert host.keys.describe(s)["keyid"] == freed


def test_same_tenant_same_key_shares_a_keyid(host):
    a = host.keys.add("vm-a", user_payload(K16, T16), tenant="acme")
    b = host.keys.add("vm-b", user_payload(K16, T16), tenant="acme")
    c = host.keys.add("vm-c", user_payload(K16, T16), tenant="globex")
    ka, kb, kc = (host.keys.describe(s)["keyid"] for s in (a, b, c))
    assert ka == kb != kc
    assert host.keys.pconfig_calls == 2                                  # the shared key is programmed once


def test_entropy_error_is_retried_then_enokey(host):
    free = host.keyids.free_count
    with host.platform.entropy_failure(count=3):
        serial = host.keys.add("vm", "type=cpu", tenant="acme")         # fails, retried, succeeds
    assert 1 <= host.keys.retries <= 3 and host.keys.describe(serial)["type"] == "cpu"
    assert host.platform.key_entry(host.keys.describe(serial)["keyid"]).mode is KeyMode.ENCRYPT
    with host.platform.entropy_failure(), pytest.raises(KeyServiceError, match="ENTROPY_ERROR") as e:
        host.keys.add("vm2", "type=cpu", tenant="acme")
    assert errno_of(e) == errno.ENOKEY and host.keyids.free_count == free - 1


def test_device_busy_on_one_package_rolls_back_the_others():
    host = Host(keyid_bits=6, packages=2)
    free = host.keyids.free_count
    with host.platform.key_table_lock(package=1), pytest.raises(KeyServiceError, match="DEVICE_BUSY") as e:
        host.keys.add("vm", user_payload(K16, T16), tenant="acme")
    assert errno_of(e) == errno.ENOKEY
    assert host.keyids.free_count == free                               # KeyID given back
    assert host.platform.key_entry(1, 0).mode is KeyMode.CLEAR          # package 0 undone
    assert host.keys.keys() == []


def test_tenant_checks_revoke_and_update(host):
    serial = host.keys.add("vm", user_payload(K16, T16), tenant="acme")
    with pytest.raises(KeyServiceError) as e:
        host.keys.use(serial, "vm:x", tenant="globex")
    assert errno_of(e) == errno.EACCES
    keyid = host.keys.use(serial, "vm:x", tenant="acme")
    with pytest.raises(KeyServiceError) as e:
        host.keys.update(serial, "type=clear", tenant="acme")
    assert errno_of(e) == errno.EBUSY
    host.keys.revoke(serial, tenant="acme")
    assert host.keyids.allocation(keyid) is not None                    # still used by vm:x
    with pytest.raises(KeyServiceError) as e:
        host.keys.use(serial, "vm:y", tenant="acme")
    assert errno_of(e) == errno.EKEYREVOKED
    host.keys.unuse(serial, "vm:x")
    assert host.keyids.allocation(keyid) is None
    with pytest.raises(KeyServiceError) as e:
        host.keys.describe(serial)
    assert errno_of(e) == errno.ENOENT


def test_update_rekeys_an_unused_handle(host):
    serial = host.keys.add("vm", user_payload(K16, T16), tenant="acme")
    old = host.keys.describe(serial)["keyid"]
    host.keys.update(serial, "type=no-encrypt", tenant="acme")
    info = host.keys.describe(serial)
    assert info["type"] == "no-encrypt" and host.platform.key_entry(info["keyid"]).mode is KeyMode.NO_ENCRYPT
    assert info["keyid"] == old or host.platform.key_entry(old).mode is KeyMode.CLEAR
