# Count forever (or to $MKTME_COUNT), one line per $MKTME_PERIOD seconds: a guest whose progress
# is visible, for snapshot and restore.
i=0
while [ -z "$MKTME_COUNT" ] || [ $i -lt "$MKTME_COUNT" ]; do
    i=$((i + 1))
    echo "count $i"
    sleep "${MKTME_PERIOD:-0.2}"
done
