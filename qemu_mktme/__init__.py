"""qemu-mktme: Intel Multi-Key Total Memory Encryption emulated around unmodified QEMU.

Layers, imports only going down (``tests/test_layers.py`` checks it)::

    arch      architectural definitions, pure
    engine    the hardware model: platform, PCONFIG, key tables, AES-XTS, physical memory
    keymaterial  key material from every door: the key-spec grammar, the checks, the bounded
              key-file reader, key-encryption keys, what crosses the control socket
    host      the host software model: key service, KeyIDs, EPT / VMM page table / IOMMU, DMA
    files     formats and places on disk: snapshot and dump files, atomic writes, the cache,
              runtime directories
    qemu      the stock-QEMU driver (no MKTME): machine, monitor, console, guest RAM
    images    guest images built from source and stock Debian packages
    trace     the TCG plugin shim and the tracer
    vhost     device models outside QEMU whose DMA goes through the IOMMU: vhost-user-blk
    live      QEMU bound to the host model: encrypted machines, sessions, snapshots, dumps
    attest    the host's side of attestation: TPMs (swtpm), measured launch, quotes, the broker
              client, node key, images encrypted at rest, attested launch and migration
    tenant    the tenant's side: key server (PyKMIP), key broker, PKI, keys and policy
    virt      libvirt runs the hosts: domains that opt in, the qemu hook, the host model that
              follows a libvirtd ('host --libvirt'), namespaced test machines
    inspect   offline tools over dumps
    verifier, demo, attack, attend    what users run, as library calls
    commands  one module per top-level command: argparse in, typed library calls, printing
    cli       the command table, main, the exit policy
    pytest_plugin    fixtures for tests of guests under MKTME

``errors`` is shared by all, and ``compiled`` (a C source built into the cache: the XTS
helper, the shim) by the layers that build.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
