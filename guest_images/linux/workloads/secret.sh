# Write $MKTME_SECRET at guest-physical $MKTME_ADDR (default: the memmap= reserved region),
# wait for one line from the host on the console, then print the sha256 of what is there now.
addr=$((${MKTME_ADDR:-$MKTME_RESERVED}))
secret=${MKTME_SECRET:-MKTME-LINUX-SECRET}
printf '%s' "$secret" | dd of=/dev/mem bs=1 seek=$addr conv=notrunc 2>/dev/null || exit 1
printf 'mktme-linux: secret at 0x%x len=%d\n' $addr ${#secret}
if [ "${MKTME_WAIT:-1}" = 1 ]; then
    echo "mktme-linux: waiting for host"
    read -r reply
fi
sum=$(dd if=/dev/mem bs=1 skip=$addr count=${#secret} 2>/dev/null | sha256sum | cut -c1-64)
echo "mktme-linux: secret-region sha256=$sum"
