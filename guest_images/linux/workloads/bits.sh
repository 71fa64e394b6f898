# Process a secret bit by bit, as a square-and-multiply loop does: for each bit of $MKTME_SECRET
# (a string of 0 and 1) store the bit in a fixed 64-bit variable at guest-physical $MKTME_ADDR
# (default: the reserved region + 4 KiB), then wait $MKTME_PERIOD seconds (the rest of the step).
# Each pass is asked for on the console: 0 runs it as is, 1 with the published mitigation (every
# store also carries a per-write counter in the same 16-byte block: counter << 1 | bit, so no two
# stores leave the same ciphertext), anything else ends the workload.
addr=$((${MKTME_ADDR:-$((MKTME_RESERVED + 4096))}))
bits=${MKTME_SECRET:-1011001110001011}
period=${MKTME_PERIOD:-0.05}
printf 'mktme-linux: bits at 0x%x n=%d\n' $addr ${#bits}
while :; do
    devmem $addr 64 0
    echo "mktme-linux: bits ready (0: plain, 1: per-write counter, q: quit)"
    read -r mode || exit 1
    case $mode in 0|1) ;; *) break ;; esac
    rest=$bits
    n=0
    while [ -n "$rest" ]; do
        bit=${rest%"${rest#?}"}
        rest=${rest#?}
        n=$((n + 1))
        if [ "$mode" = 1 ]; then
            devmem $addr 64 $(((n << 1) | bit))
        else
            devmem $addr 64 $bit
        fi
        sleep $period
    done
    echo "mktme-linux: bits done n=$n mitigate=$mode"
done
