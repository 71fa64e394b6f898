# Disk throughput, timed by the host from these markers: ${MKTME_SIZE_MB:-256} MiB sequential
# write then read with direct I/O in 1 MiB requests, then ${MKTME_COUNT:-2000} random 4 KiB
# direct reads (one dd per read: busybox has no fio).
. /workloads/_disk.sh
disk_wait || exit 1
n=${MKTME_SIZE_MB:-256}
echo "mktme-linux: bench seqwrite start"
dd if=/dev/zero of=$DISK bs=1M count=$n oflag=direct conv=fsync 2>/dev/null
echo "mktme-linux: bench seqwrite done"
echo "mktme-linux: bench seqread start"
dd if=$DISK of=/dev/null bs=1M count=$n iflag=direct 2>/dev/null
echo "mktme-linux: bench seqread done"
blocks=$((n * 256))
awk -v c=${MKTME_COUNT:-2000} -v b=$blocks 'BEGIN { srand(7); for (i = 0; i < c; i++) print int(rand() * b) }' > /tmp/offsets
echo "mktme-linux: bench randread start"
while read -r off; do dd if=$DISK of=/dev/null bs=4096 count=1 skip=$off iflag=direct 2>/dev/null; done < /tmp/offsets
echo "mktme-linux: bench randread done count=${MKTME_COUNT:-2000}"
