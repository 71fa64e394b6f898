"""The pytest plugin, exercised as a user meets it (pytester runs in a subprocess) and by our suite.

Option handling needs no QEMU and no fresh interpreter: those runs are in-process (fast)."""

from __future__ import annotations

import os

import pytest

from qemu_mktme.pytest_plugin import assert_ciphertext, assert_not_in_dram, expect_console

from helpers import patience

pytest_plugins = ["pytester"]

FIRST_TEST = '''
import pytest
from qemu_mktme.pytest_plugin import assert_not_in_dram, expect_console

@pytest.mark.asyncio
@pytest.mark.mktme_vm(commands=["write 0x200000 my-first-secret"])
async def test_secret_is_encrypted(mktme_vm):
    await expect_console(mktme_vm, r"ok write 0x200000 15")
    assert mktme_vm.ram.read(0x200000, 15) == b"my-first-secret"
    assert_not_in_dram(mktme_vm, b"my-first-secret")

@pytest.mark.asyncio
@pytest.mark.mktme_vm(key="no-encrypt", commands=["write 0x200000 plaintext-in-dram"])
async def test_no_encrypt_leaves_plaintext(mktme_vm):
    await expect_console(mktme_vm, r"ok write")
    with pytest.raises(AssertionError, match="secret found in DRAM"):
        assert_not_in_dram(mktme_vm, b"plaintext-in-dram")

def test_host_fixture(mktme_host):
    assert mktme_host.keyids.max_keyid == 15
'''


TYPO_TEST = '''
import pytest
@pytest.mark.asyncio
@pytest.mark.mktme_vm(colour="blue")
async def test_x(mktme_vm): pass
'''


def _readme_example() -> str:
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")) as f:
        readme = f.read()
    start = readme.index("```python\n# test_mktme.py")
    return readme[start + len("```python\n"):readme.index("```", start + 10)]


def test_a_users_first_tests_and_the_readme_example(pytester, monkeypatch, baremetal_image):
    """One pytest run as a user's (a subprocess: the plugin loads from its entry point): our
    first tests, the README's example exactly as printed there, and a marker with a typo."""
    # pytester moves HOME: the run must find the images where the suite's fixture built them
    monkeypatch.setenv("QEMU_MKTME_CACHE", str(baremetal_image.directory.parents[1]))
    pytester.makepyfile(test_first=FIRST_TEST, test_mktme=_readme_example(), test_typo=TYPO_TEST)
    result = pytester.runpytest_subprocess("--mktme-keyid-bits", "4", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, errors=1)
    result.stdout.fnmatch_lines(["qemu-mktme: guest=baremetal memory=default key=user keyid-bits=4*"])
    result.stdout.fnmatch_lines(["*mktme_vm marker: unknown colour*"])


@pytest.mark.parametrize("args, message", [
    (["--mktme-guest", "windows"], "--mktme-guest / mktme_guest: 'windows' is not one of baremetal, linux"),
    (["--mktme-memory", "lots"], "--mktme-memory / mktme_memory: 'lots' is not a size"),
    (["--mktme-key", "gpu"], "--mktme-key / mktme_key: key spec must be"),
    (["--mktme-keyid-bits", "99"], "--mktme-keyid-bits / mktme_keyid_bits: '99' must be a number in 1..15"),
])
def test_invalid_values_are_usage_errors(pytester, args, message):
    pytester.makepyfile(test_x="def test_x(): pass")
    result = pytester.runpytest_inprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


def test_ini_twins_and_command_line_precedence(pytester):
    pytester.makeini("[pytest]\nmktme_guest = linux\nmktme_keyid_bits = 3\n")
    pytester.makepyfile(test_x="def test_x(mktme_settings): assert mktme_settings.guest == 'linux'")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["qemu-mktme: guest=linux memory=default key=user keyid-bits=3*"])
    result = pytester.runpytest_inprocess("--mktme-keyid-bits", "5", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*keyid-bits=5*"])


# ----------------------------------------------------------------- our own suite uses the fixtures too

@pytest.mark.mktme_vm(commands=["fill 0x300000 8192 0x42 8"])
async def test_fixture_vm_ciphertext_and_console(mktme_vm):
    await expect_console(mktme_vm, r"ok fill 0x300000 8192")
    assert_ciphertext(mktme_vm, 0x300000, 8192)
    assert_not_in_dram(mktme_vm, b"\x42" * 64)
    with pytest.raises(AssertionError, match="not this range encrypted under KeyID"):
        other = mktme_vm.host.keys.add("other", "type=cpu", tenant="x")
        assert_ciphertext(mktme_vm, 0x300000, 64, keyid=mktme_vm.host.keys.describe(other)["keyid"])
    with pytest.raises(AssertionError, match="never showed 'nothing like this'"):
        await expect_console(mktme_vm, "nothing like this", timeout=0.3)


@pytest.mark.mktme_vm(guest="linux", workload="secret", params={"secret": "PLUGIN-LINUX-SECRET"})
async def test_fixture_linux_vm(mktme_vm):
    match = await expect_console(mktme_vm, r"secret at (0x[0-9a-f]+) len=\d+\n", patience(120))
    await expect_console(mktme_vm, "waiting for host")
    assert mktme_vm.ram.read(int(match[1], 16), 19) == b"PLUGIN-LINUX-SECRET"
    await mktme_vm.pause()
    assert_not_in_dram(mktme_vm, "PLUGIN-LINUX-SECRET")
