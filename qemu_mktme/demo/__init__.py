"""The demos: the story in under a minute, every claim checked as it is told.

    story      ``qemu-mktme demo`` (``make demo``): a stock Debian guest under a tenant key, KeyIDs,
               a secret in the CPU view and not in DRAM, an encrypted snapshot, a DRAM map
    tenant     ``qemu-mktme demo --tenant``: key server, attested host, image at rest, tampered
               host refused
"""
