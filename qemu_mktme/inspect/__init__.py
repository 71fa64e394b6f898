"""The inspect layer: DRAM dumps, and the tools to study them as a physical attacker would
(``qemu-mktme inspect DUMP ACTION`` is :mod:`qemu_mktme.commands.inspect`).

One job per module::

    dump       the dump format (dram.bin + manifest.json), ``write_dump``, the ``Dump`` reader
    capture    a consistent dump of a running host's VMs
    layout     where each page lives: VM, HPA, GPA, EPT KeyID; the KeyID map; run coalescing
    entropy    per-page Shannon entropy (ciphertext ~7.955 bits/byte, plaintext far below)
    keyspec    which dumped regions a key may decrypt (keys: qemu_mktme.keymaterial)
    search     byte strings and regexes in the raw DRAM, or in the DRAM decrypted with a key
    decrypt    plaintext of a range, to a new file
    diff       two dumps of one VM compared per 16-byte block: what deterministic XTS leaks
    plot       PNG panels (Pillow): KeyID map, entropy, changed blocks
    output     all-or-nothing 0600 output files

From Python::

    from qemu_mktme.files.dumpfile import Dump
    from qemu_mktme.keymaterial import xts_key
    from qemu_mktme.inspect.search import Pattern, search

    dump = Dump("/tmp/dump")
    search(dump, Pattern("TOP SECRET")).matches                      # ciphertext: expect []
    key = xts_key("@tenant.key")
    for m in search(dump, Pattern("TOP SECRET"), key=key).matches:
        print(m.vm, hex(m.gpa), m.keyid)
"""
