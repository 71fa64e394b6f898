# Generate ${MKTME_SIZE_MB:-64} MiB of deterministic data in tmpfs and checksum it.
n=$((${MKTME_SIZE_MB:-64} << 20))
yes 'qemu-mktme checksum workload: the quick brown fox jumps over the lazy dog 0123456789' \
    | head -c $n > /tmp/data
echo "mktme-linux: checksum bytes=$n sha256=$(sha256sum < /tmp/data | cut -d' ' -f1)"
rm -f /tmp/data
