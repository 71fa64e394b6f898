# Print the sha256 of ${MKTME_LEN:-4096} bytes at guest-physical $MKTME_ADDR (default: the reserved
# region), after waiting for one line from the host when MKTME_WAIT=1.
addr=$((${MKTME_ADDR:-$MKTME_RESERVED}))
len=$((${MKTME_LEN:-4096}))
if [ "${MKTME_WAIT:-0}" = 1 ]; then
    echo "mktme-linux: waiting for host"
    read -r reply
fi
echo "mktme-linux: region 0x$(printf %x $addr) len=$len sha256=$(dd if=/dev/mem bs=1 skip=$addr count=$len 2>/dev/null | sha256sum | cut -c1-64)"
