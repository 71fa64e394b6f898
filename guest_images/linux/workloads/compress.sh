# Compress and decompress deterministic data; checksums of every stage.
n=$((${MKTME_SIZE_MB:-16} << 20))
seq 1 1000000000 | head -c $n > /tmp/plain
gzip -6 -c /tmp/plain > /tmp/plain.gz
gunzip -c /tmp/plain.gz > /tmp/round
echo "mktme-linux: compress plain=$(sha256sum < /tmp/plain | cut -c1-64)"
echo "mktme-linux: compress gz=$(sha256sum < /tmp/plain.gz | cut -c1-64) size=$(wc -c < /tmp/plain.gz)"
echo "mktme-linux: compress roundtrip=$(sha256sum < /tmp/round | cut -c1-64)"
cmp /tmp/plain /tmp/round && echo "mktme-linux: compress identical"
rm -f /tmp/plain /tmp/plain.gz /tmp/round
