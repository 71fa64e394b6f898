# Persistent memory through the stock nfit/libnvdimm/nd_pmem modules: /dev/pmem0.
# mode=write: ${MKTME_SIZE_MB:-4} MiB of random data at offset 0 and $MKTME_SECRET right after it,
# synced; mode=read: the same ranges read back. Both print the sha256 of each, so two boots can be
# compared (the host checks that boot 2 reads what boot 1 wrote).
n=${MKTME_SIZE_MB:-4}
secret=${MKTME_SECRET:-MKTME-PMEM-SECRET}
i=0
while [ ! -b /dev/pmem0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -b /dev/pmem0 ]; then
    echo "mktme-linux: pmem no /dev/pmem0 ($(ls /sys/bus/nd/devices 2>/dev/null | tr '\n' ' '))"
    exit 1
fi
echo "mktme-linux: pmem device /dev/pmem0 size=$(cat /sys/block/pmem0/size) sectors"
if [ "${MKTME_MODE:-write}" = write ]; then
    dd if=/dev/urandom of=/tmp/pattern bs=1M count=$n 2>/dev/null
    dd if=/tmp/pattern of=/dev/pmem0 bs=1M oflag=direct conv=fsync 2>/dev/null || echo "mktme-linux: pmem write failed"
    printf '%s' "$secret" | dd of=/dev/pmem0 bs=1M seek=$n conv=fsync 2>/dev/null
    rm -f /tmp/pattern
    sync
fi
echo 3 > /proc/sys/vm/drop_caches
pat=$(dd if=/dev/pmem0 bs=1M count=$n iflag=direct 2>/dev/null | sha256sum | cut -c1-64)
sec=$(dd if=/dev/pmem0 bs=1M skip=$n count=1 2>/dev/null | head -c ${#secret} | sha256sum | cut -c1-64)
echo "mktme-linux: pmem ${MKTME_MODE:-write} pattern sha256=$pat secret sha256=$sec"
