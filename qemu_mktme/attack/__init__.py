"""Attacks on memory encryption without integrity, on running unmodified guests.

- :mod:`.bus`: the attacker's primitives over a running VM's DRAM (record a line's ciphertext,
  write it back), with the checks that keep an attack inside the VM it targets.
- :mod:`.replay`: replay / rollback of a line (``qemu-mktme attack replay``), with and without
  the integrity mode, on the Linux ``pin`` workload.
- :mod:`.cipherleak`: the ciphertext side channel (``qemu-mktme attack cipherleak``) on the Linux
  ``bits`` workload, with and without the guest's per-write counter.
"""
