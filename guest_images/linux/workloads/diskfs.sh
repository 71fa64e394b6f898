# Make an ext2 file system (busybox mke2fs) on /dev/vda, mount it (the kernel's ext4 driver),
# write ${MKTME_SIZE_MB:-4} MiB of files, unmount, mount again and check their sha256 sums.
. /workloads/_disk.sh
disk_wait || exit 1
n=${MKTME_SIZE_MB:-4}
mke2fs -q -F -b 4096 -L mktme -U 6d6b746d-6500-4000-8000-000000000012 -E nodiscard $DISK >/dev/null 2>&1 \
    || mke2fs -F -b 4096 -L mktme $DISK >/dev/null || { echo "mktme-linux: diskfs mke2fs failed"; exit 1; }
mkdir -p /mnt && mount -t ext2 $DISK /mnt || { echo "mktme-linux: diskfs mount failed"; exit 1; }
disk_pattern $n > /mnt/pattern
echo "diskfs $n MiB" > /mnt/README
want=$(sha256sum < /mnt/pattern | cut -d' ' -f1)
umount /mnt && echo 3 > /proc/sys/vm/drop_caches
mount -t ext2 -o ro $DISK /mnt || { echo "mktme-linux: diskfs remount failed"; exit 1; }
got=$(sha256sum < /mnt/pattern | cut -d' ' -f1)
umount /mnt
if [ "$got" = "$want" ]; then verdict=match; else verdict=MISMATCH; fi
echo "mktme-linux: diskfs wrote sha256=$want"
echo "mktme-linux: diskfs read sha256=$got $verdict"
