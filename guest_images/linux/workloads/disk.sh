# Write ${MKTME_SIZE_MB:-4} MiB of deterministic data to the first virtio disk (/dev/vda) with
# direct I/O, flush it, read it back and compare sha256 sums. The disk's old content is reported
# too, so a run can be compared with another byte for byte.
. /workloads/_disk.sh
disk_wait || exit 1
n=${MKTME_SIZE_MB:-4}
echo "mktme-linux: disk before sha256=$(dd if=$DISK bs=1M count=$n iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
disk_pattern $n > /tmp/data
want=$(sha256sum < /tmp/data | cut -d' ' -f1)
dd if=/tmp/data of=$DISK bs=1M oflag=direct conv=fsync 2>/dev/null || echo "mktme-linux: disk write failed"
echo 3 > /proc/sys/vm/drop_caches
got=$(dd if=$DISK bs=1M count=$n iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
rm -f /tmp/data
if [ "$got" = "$want" ]; then verdict=match; else verdict=MISMATCH; fi
echo "mktme-linux: disk wrote sha256=$want"
echo "mktme-linux: disk read sha256=$got $verdict"
