"""The tenant's side: a key server, TPM-rooted host attestation, a key broker, the node key and
the image encrypted at rest (issue 14; the KVM Forum 2018 "tenant's key" use case).

    pki        CA, server and client certificates in QEMU's file names (``cryptography``)
    kmip       PyKMIP's server configuration and a bounded, quiet client
    keyserver  ``keyserver start|stop|status``: PyKMIP and the broker as one background process
    store      the tenant's state directory: key names, policy, manifest-signing key
    tpm        each emulated host's TPM: swtpm driven through tpm2-pytss
    eventlog   measured-launch events, replay, comparison with reference values (pure)
    measure    what a host boot measures: QEMU, shim, package, platform config, guest boot files
    attest     checking quotes and binding-key certifications; sealing a key to a TPM key
    broker     nonce, verify, release (HTTPS), and the host's client
    hostid     a host's state directory, its TPM, node key and fetch of released keys
    image      LUKS-in-qcow2 images and their signed manifests
    admin      the tenant's operations: add keys, record reference values, encrypt images
    launch     an attested launch: measure, attest, release, start the VM
    migrate    an attested migration: the destination attests and gets the key, then live migration
    story      ``demo --tenant``

The layer sits above ``live`` (it starts HostSessions) and below ``inspect``; its commands are in
``qemu_mktme.commands`` (keyserver, tenant, image, and run's --tenant-server options).
"""
