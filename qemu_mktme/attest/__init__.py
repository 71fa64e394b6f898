"""The host's side of attestation: each emulated host's TPM, its measured launch, the evidence it
sends the tenant's key broker and the keys it gets back; attested launch and migration.

    tpm        each emulated host's TPM: swtpm driven through tpm2-pytss; quotes
    eventlog   measured-launch events, replay, comparison with reference values (pure)
    digests    file and fd digests kept per identity, as IMA does (pure)
    measure    what a host boot measures: QEMU, shim, package, platform config, guest boot files
    quote      checking quotes and binding-key certifications; sealing a key to a TPM key
    client     the host's HTTPS client of the tenant's key broker
    hostid     a host's state directory, its TPM, node key and fetch of released keys
    image      LUKS-in-qcow2 images and their signed manifests (encrypted here, verified at launch)
    launch     an attested launch: measure, attest, release, start the VM
    migrate    an attested migration: the destination attests and gets the key, then live migration

The layer sits above ``live`` (it starts HostSessions) and below ``tenant``, whose key broker checks
this layer's evidence with this layer's formats (``quote``, ``eventlog``).
"""
