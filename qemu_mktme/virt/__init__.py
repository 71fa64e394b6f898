"""libvirt runs the hosts: Debian's ``libvirtd`` manages the QEMU processes on each machine and the
MKTME host model of that machine follows it.

    domain      a domain that opts in (our metadata element) and what the host model needs of it
    hookscript  libvirt's qemu hook: hands the operations on such domains to the host model
    hooks       installs / removes the hook (only on an explicit command)
    follow      the host model following a libvirtd: attest, bind before any vCPU runs, release
    fleet       start / migrate / stop across machines through libvirt, typed results
    testbed     machines for tests: network + mount namespaces with a libvirtd each, veth links
    lab         the tenant and two hosts in a testbed, with the host models (the pytest fixture)
"""
