"""libvirt runs the hosts."""
