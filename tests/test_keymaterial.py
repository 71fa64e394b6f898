"""The same bad keys through every door get the same refusal (qemu_mktme.keymaterial owns them all).

Doors for an AES-XTS pair: ``run --key user:K:T`` (the CLI), ``run --key user:@FILE`` (a key
file), the pytest plugin's ``--mktme-key``, ``inspect --key`` (spec and @FILE), the ``mktme``
payload a host's key service parses, and a key released by the tenant's broker. Doors for a
key-encryption key: ``--kek-file`` and the host's control socket (``snapshot-save``'s ``kek``).
"""

from __future__ import annotations

import os
import types

import pytest

from qemu_mktme import cli, keymaterial
from qemu_mktme.attest.launch import memory_payload
from qemu_mktme.errors import KeyServiceError, RemoteError, TenantError
from qemu_mktme.host.payload import parse
from qemu_mktme.keymaterial import KeyMaterialError, key_payload, load_kek, xts_key
from qemu_mktme.live import control
from qemu_mktme.live.session import HostSession
from qemu_mktme.pytest_plugin.options import settings

K, T = os.urandom(16).hex(), os.urandom(16).hex()
# (key hex, tweak hex, the reason, the words every door's message carries)
BAD_PAIRS = {
    "zero key": ("00" * 16, T, keymaterial.ZERO, "is all zeros"),
    "zero tweak": (K, "00" * 16, keymaterial.ZERO, "is all zeros"),
    "equal": (K, K, keymaterial.EQUAL, "are equal (IEEE 1619"),
    "not hex": ("zz" + K[2:], T, keymaterial.NOT_HEX, "is not hex"),
    "short": (K[2:], T, keymaterial.LENGTH, "must be 16 bytes"),
}
BAD_KEKS = {
    "zero": ("00" * 32, keymaterial.ZERO, "is all zeros"),
    "short": ("ab" * 16, keymaterial.LENGTH, "expected 64 hex digits, found 32 hex digits"),
    "not hex": ("zz" * 32, keymaterial.NOT_HEX, "expected 64 hex digits"),
}


@pytest.fixture
def key_file(tmp_path):
    def write(text: str) -> str:
        path = tmp_path / f"k{len(list(tmp_path.iterdir()))}"
        path.write_text(text + "\n")
        path.chmod(0o600)
        return str(path)
    return write


def _plugin_config(key: str) -> types.SimpleNamespace:
    ini = {"mktme_guest": "baremetal", "mktme_memory": "", "mktme_key": key, "mktme_keyid_bits": "6",
           "mktme_boot_timeout": "60"}
    return types.SimpleNamespace(getoption=lambda name: None, getini=lambda name: ini[name])


@pytest.mark.parametrize("case", BAD_PAIRS)
def test_a_bad_pair_gets_the_same_refusal_at_every_door(case, key_file, capsys):
    key, tweak, reason, words = BAD_PAIRS[case]
    path = key_file(f"{key} {tweak}")
    messages = []
    for spec in (f"user:{key}:{tweak}", f"user:@{path}"):                 # the CLI, a key file
        assert cli.main(["run", "--key", spec, "-c", "poweroff"]) == 2      # refused before QEMU starts
        messages.append(capsys.readouterr().err)
        with pytest.raises(KeyMaterialError) as refused:
            key_payload(spec)
        assert refused.value.reason == reason
    for spec in (f"{key}:{tweak}", f"@{path}", f"user:{key}:{tweak}:aes-xts-128"):   # inspect --key
        with pytest.raises(KeyMaterialError) as refused:
            xts_key(spec)
        assert refused.value.reason == reason
        messages.append(str(refused.value))
    with pytest.raises(pytest.UsageError) as usage:                        # the pytest plugin
        settings(_plugin_config(f"user:{key}:{tweak}"))                    # type: ignore[arg-type]
    messages.append(str(usage.value))
    with pytest.raises(KeyServiceError) as einval:                         # the key service's payload
        parse(f"type=user algorithm=aes-xts-128 key={key} tweak={tweak}")
    messages.append(str(einval.value))
    if reason in (keymaterial.ZERO, keymaterial.EQUAL):                   # a key the broker released
        with pytest.raises(TenantError) as released:
            memory_payload(bytes.fromhex(key + tweak))
        messages.append(str(released.value))
    for message in messages:
        assert words in message, (case, message)
        assert K not in message and T not in message


@pytest.mark.parametrize("case", BAD_KEKS)
async def test_a_bad_kek_gets_the_same_refusal_from_a_file_and_through_the_socket(case, key_file, tmp_path, capsys):
    text, reason, words = BAD_KEKS[case]
    path = key_file(text)
    with pytest.raises(KeyMaterialError) as refused:
        load_kek(text)
    assert refused.value.reason == reason
    assert cli.main(["snapshot", "verify", str(tmp_path / "none.snap"), "--kek-file", path]) == 2
    messages = [capsys.readouterr().err]
    async with HostSession([], name=f"keys-{case.replace(' ', '-')}"):
        with pytest.raises(ValueError) as remote:             # the host's argument check: a ValueError
            await control.request("snapshot-save", pid=os.getpid(), path=str(tmp_path / "s.snap"), kek=text)
    assert isinstance(remote.value, RemoteError)
    messages.append(str(remote.value))
    assert not (tmp_path / "s.snap").exists()
    for message in messages:
        assert words in message, (case, message)
        assert text not in message


def test_one_grammar_for_the_algorithm_word(key_file):
    k, t = os.urandom(32), os.urandom(32)
    for alg in ("aes-xts-256", "AES-XTS-256", None):                     # any case; absent: the length decides
        suffix = f":{alg}" if alg else ""
        assert xts_key(f"{k.hex()}:{t.hex()}{suffix}") == xts_key(f"user:{k.hex()}:{t.hex()}{suffix}")
        payload = key_payload(f"user:{k.hex()}:{t.hex()}{suffix}")
        assert payload is not None and "algorithm=aes-xts-256" in payload
        assert parse(payload).key == k
    path = key_file(f"{k.hex()} {t.hex()} aes-xts-256")                 # the file may name it too
    assert key_payload(f"user:@{path}") == key_payload(f"user:{k.hex()}:{t.hex()}")
    assert key_payload("cpu:AES-XTS-256") == "type=cpu algorithm=aes-xts-256"
    with pytest.raises(KeyMaterialError, match="aes-xts-128 needs 16-byte keys, got 32-byte ones"):
        key_payload(f"user:{k.hex()}:{t.hex()}:aes-xts-128")
