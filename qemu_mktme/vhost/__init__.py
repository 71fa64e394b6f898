"""Device models outside QEMU that reach guest memory only through the host model's IOMMU:
a vhost-user-blk backend (``protocol`` the vhost-user messages and fd passing, ``virtqueue`` the
VIRTIO split ring, ``blk`` the block device, ``memory`` how the device reaches guest RAM)."""
