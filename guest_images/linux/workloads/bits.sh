# Process a secret bit by bit, as a square-and-multiply loop does: for each bit of $MKTME_SECRET
# (a string of 0 and 1) store the bit in a fixed 64-bit variable at guest-physical $MKTME_ADDR
# (default: the reserved region + 4 KiB), then wait $MKTME_PERIOD seconds (the rest of the step).
# With mktme.mitigate=1 the store also carries a per-write counter in the same 16-byte block
# (counter << 1 | bit), so no two stores leave the same ciphertext.
addr=$((${MKTME_ADDR:-$((MKTME_RESERVED + 4096))}))
bits=${MKTME_SECRET:-1011001110001011}
period=${MKTME_PERIOD:-0.05}
devmem $addr 64 0
printf 'mktme-linux: bits at 0x%x n=%d mitigate=%s\n' $addr ${#bits} ${MKTME_MITIGATE:-0}
n=0
while [ -n "$bits" ]; do
    bit=${bits%"${bits#?}"}
    bits=${bits#?}
    n=$((n + 1))
    if [ "${MKTME_MITIGATE:-0}" = 1 ]; then
        devmem $addr 64 $(((n << 1) | bit))
    else
        devmem $addr 64 $bit
    fi
    sleep $period
done
echo "mktme-linux: bits done n=$n"
