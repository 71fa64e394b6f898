"""Live MKTME machines: a stock QEMU bound to the host model.

``encrypted`` (a VM with a KeyID, its EPT/VMM/IOMMU tagging and DRAM view), ``session`` (an
emulated host with its VMs and control socket; every control command is registered there),
``control`` (the 0600 control socket), ``snapshot`` (save, verify, restore), ``capture`` (dumps
of running VMs), ``migrate`` (live migration to another host model over TLS), ``p2p`` (migration
between running host processes: the source host drives, each host owns its half), ``relay`` (a
loopback relay that keeps what it forwards: the wire between two hosts).
"""
