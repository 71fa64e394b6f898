# Fill ${MKTME_SIZE_MB:-256} MiB of tmpfs (guest RAM) in 16 MiB files, then checksum it all.
mb=${MKTME_SIZE_MB:-256}
i=0
while [ $i -lt $((mb / 16)) ]; do
    yes "memstress block $i" | head -c $((16 << 20)) > /tmp/block.$i
    i=$((i + 1))
done
echo "mktme-linux: memstress free-after-fill=$(grep MemFree: /proc/meminfo | tr -s ' ' | cut -d' ' -f2)kB"
echo "mktme-linux: memstress mb=$mb sha256=$(cat $(ls /tmp/block.* | sort -t. -k2 -n) | sha256sum | cut -c1-64)"
rm -f /tmp/block.*
