# Secret-indexed table lookups, as a fixed-window exponentiation does: the public table's 2^W
# entries (W = $MKTME_WIDTH bits, default 2) are stored one by one into a fixed 64-bit variable
# at guest-physical $MKTME_ADDR (default: the reserved region + 8 KiB), then, for each W-bit
# window of $MKTME_SECRET (a string of 0 and 1), the entry the window indexes; after each store
# the workload waits $MKTME_PERIOD seconds (the rest of the step). The table is public (entry i
# is (i + 1) * 0x0101010101010101 XOR 0x5DEECE66D); the secret is not.
# Each run is asked for on the console: r runs it, anything else ends the workload.
addr=$((${MKTME_ADDR:-$((MKTME_RESERVED + 8192))}))
bits=${MKTME_SECRET:-1011001110001011}
width=${MKTME_WIDTH:-2}
period=${MKTME_PERIOD:-0.05}
entry() { printf '%d' $((($1 + 1) * 0x0101010101010101 ^ 0x5DEECE66D)); }
printf 'mktme-linux: table at 0x%x n=%d width=%d\n' $addr ${#bits} $width
while :; do
    devmem $addr 64 0
    echo "mktme-linux: table ready (r: run, q: quit)"
    read -r mode || exit 1
    [ "$mode" = r ] || break
    i=0
    while [ $i -lt $((1 << width)) ]; do
        devmem $addr 64 $(entry $i)
        sleep $period
        i=$((i + 1))
    done
    rest=$bits
    n=0
    while [ -n "$rest" ]; do
        w=0
        j=0
        while [ $j -lt $width ]; do
            bit=${rest%"${rest#?}"}
            rest=${rest#?}
            w=$(((w << 1) | ${bit:-0}))
            j=$((j + 1))
        done
        devmem $addr 64 $(entry $w)
        n=$((n + 1))
        sleep $period
    done
    echo "mktme-linux: table done n=$n"
done
