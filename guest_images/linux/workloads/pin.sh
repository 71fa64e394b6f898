# A PIN-protected secret: three wrong PINs lock it for good. The retry counter is a 32-bit word
# of guest RAM at guest-physical $MKTME_ADDR (default: the reserved region), read and written with
# devmem before and after every attempt, as a smart-card applet keeps its counter in memory.
# One PIN per console line; $MKTME_SECRET is the right one.
addr=$((${MKTME_ADDR:-$MKTME_RESERVED}))
pin=${MKTME_SECRET:-4711}
devmem $addr 32 0
printf 'mktme-linux: pin counter at 0x%x\n' $addr
while :; do
    tries=$(($(devmem $addr 32)))
    if [ $tries -ge 3 ]; then
        echo "mktme-linux: pin locked after $tries wrong PINs"
        exit 1
    fi
    echo "mktme-linux: pin? (wrong so far: $tries of 3)"
    read -r guess || exit 1
    tries=$(($(devmem $addr 32)))
    if [ $tries -ge 3 ]; then
        echo "mktme-linux: pin locked after $tries wrong PINs"
        exit 1
    fi
    if [ "$guess" = "$pin" ]; then
        devmem $addr 32 0
        echo "mktme-linux: pin ok: unlocked"
        exit 0
    fi
    devmem $addr 32 $((tries + 1))
    echo "mktme-linux: pin wrong: $guess"
done
