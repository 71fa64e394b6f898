#!/bin/sh
# mmdebstrap --customize-hook for the qemu-mktme Debian system guest; $1 is the new root.
# Everything else in the image is stock Debian packages; this only configures them: the host
# name, root without a password on the serial console (a local test VM, no SSH server), the
# initramfs made of the two modules a virtio disk needs, DHCP on the virtio NIC
# (systemd-networkd), and the qemu-mktme units copied from files/.
set -eu
root="$1"
files="$(dirname "$0")/files"

echo debian > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n' > "$root/etc/hosts"
printf '/dev/vda\t/\text4\trw,errors=remount-ro\t0\t1\n' > "$root/etc/fstab"
chroot "$root" passwd -q -d root
# A fixed machine ID: every run boots a fresh overlay, and with an empty /etc/machine-id each
# boot would be systemd's "first boot" (presetting every unit: seconds under TCG).
echo 6d6b746d6564656269616e0000000001 > "$root/etc/machine-id"
# The journal stays in RAM (nothing to flush to the disk at boot).
mkdir -p "$root/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\n' > "$root/etc/systemd/journald.conf.d/qemu-mktme.conf"
# Units with nothing to do in a serial-console test VM.
systemctl --root="$root" mask getty-static.service e2scrub_reap.service apt-daily.timer \
    apt-daily-upgrade.timer dpkg-db-backup.timer systemd-journal-flush.service

install -m 0644 "$files/20-virtio.network" "$root/etc/systemd/network/20-virtio.network"
install -m 0755 "$files/mktme-workload" "$root/usr/local/sbin/mktme-workload"
for unit in qemu-mktme-workload.service qemu-mktme-echo.socket qemu-mktme-echo@.service; do
    install -m 0644 "$files/$unit" "$root/etc/systemd/system/$unit"
done
systemctl --root="$root" enable systemd-networkd.service qemu-mktme-workload.service qemu-mktme-echo.socket
# networkd's wait-online would hold network-online.target for two minutes without a NIC
systemctl --root="$root" disable systemd-networkd-wait-online.service

mkdir -p "$root/etc/initramfs-tools/conf.d"
echo MODULES=list > "$root/etc/initramfs-tools/conf.d/qemu-mktme.conf"
printf 'virtio_pci\nvirtio_blk\n' >> "$root/etc/initramfs-tools/modules"
chroot "$root" update-initramfs -u -k all
