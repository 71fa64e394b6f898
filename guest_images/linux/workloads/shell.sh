# An interactive shell on the console; exit it to power the guest off.
echo "mktme-linux: shell (exit to power off)"
setsid cttyhack sh -l
