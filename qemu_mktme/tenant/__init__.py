"""The tenant's side: a key server, a key broker that releases keys only to attested hosts, the
tenant's PKI, keys and policy (issue 14; the KVM Forum 2018 "tenant's key" use case).

    pki        CA, server and client certificates in QEMU's file names, one per host, its CRL
    kmip       PyKMIP's server configuration, served with deadlines and bounds; a quiet client
    keyserver  ``keyserver start|stop|status``: PyKMIP and the broker as one background process,
               on loopback or ``--listen ADDR[:PORT]``
    store      the tenant's state directory: key names, policy, manifest-signing key
    broker     nonce, verify, release (HTTPS, mutual TLS, a deadline per connection); the host's
               client is ``attest.client``
    admin      the tenant's operations: add keys, record reference values, enrol and revoke
               hosts, encrypt images

The layer sits above ``attest`` (the host's side: TPMs, measurement, attested launch and
migration, whose evidence the broker checks) and below ``inspect``; its commands are in
``qemu_mktme.commands`` (keyserver, tenant, image, and run's --tenant-server options).
"""
