# Shared by the disk workloads (not a workload itself: sourced).
DISK=/dev/vda
disk_wait() {
    i=0
    while [ ! -b $DISK ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    if [ ! -b $DISK ]; then echo "mktme-linux: no disk ($DISK missing)"; return 1; fi
    echo "mktme-linux: disk $DISK sectors=$(cat /sys/block/vda/size) ro=$(cat /sys/block/vda/ro)"
}
# $1 MiB of deterministic bytes: 64-byte lines (MiB number, line number, busybox awk's seeded
# generator), the same on every run of the same image
disk_pattern() {
    awk -v n="$1" 'BEGIN { srand(12); for (m = 0; m < n; m++) for (l = 0; l < 16384; l++)
        printf "mk%06d:%05d:%08x%08x%08x%08x%08x%08x\n", m, l, int(rand() * 2147483647), int(rand() * 2147483647),
            int(rand() * 2147483647), int(rand() * 2147483647), int(rand() * 2147483647), int(rand() * 2147483647) }'
}
