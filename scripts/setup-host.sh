#!/bin/sh
# Install what qemu-mktme needs from Debian when it is missing; do nothing when all is there.
# Needs root (or sudo without a password) only when something must be installed.
set -eu

missing=""
need() { command -v "$1" >/dev/null 2>&1 || missing="$missing $2"; }
need qemu-system-x86_64 qemu-system-x86
need gcc gcc
need ld binutils
need objcopy binutils
need dpkg-deb dpkg
need apt-get apt
# The Debian system image: mmdebstrap installs it, mke2fs -d and qemu-img make its disk.
need mmdebstrap mmdebstrap
need mke2fs e2fsprogs
need qemu-img qemu-utils
# The libvirt route of 'qemu-mktme attach' is tested through a real libvirtd and virsh.
need libvirtd libvirt-daemon-system
need virsh libvirt-clients
# libvirt-python (the 'libvirt' extra) builds against libvirt-dev; the fleet tests capture the
# links between their namespaced machines with tcpdump and forward with iptables inside them.
pkg-config --exists libvirt 2>/dev/null || missing="$missing libvirt-dev"
need tcpdump tcpdump
need iptables iptables
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing="$missing python3-venv"
# The engine's compiled AES-XTS helper is built against OpenSSL's libcrypto (engine/native).
[ -f /usr/include/openssl/evp.h ] || missing="$missing libssl-dev"
# The tenant's side (issue 14): each emulated host's TPM, and what tpm2-pytss builds against.
need swtpm swtpm
need pkg-config pkg-config
pkg-config --exists tss2-esys tss2-tctildr 2>/dev/null || missing="$missing libtss2-dev"
python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    >/dev/null 2>&1 || missing="$missing python3-dev"
# The Linux guest image is made of packages fetched with apt-get download: apt must know them.
apt_knows() { apt-cache show --no-all-versions linux-image-cloud-amd64 busybox-static >/dev/null 2>&1; }

missing=$(echo "$missing" | tr ' ' '\n' | sort -u | tr '\n' ' ' | sed 's/^ *//; s/ *$//')
if [ -z "$missing" ] && apt_knows; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "qemu-mktme setup: need Debian packages: ${missing:-'(package lists: apt-get update)'}" >&2
    echo "  run as root:  apt-get update && apt-get install -y $missing" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "qemu-mktme setup: apt-get update" >&2
$SUDO apt-get update -qq
if [ -n "$missing" ]; then
    echo "qemu-mktme setup: installing $missing" >&2
    # shellcheck disable=SC2086
    $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
apt_knows || { echo "qemu-mktme setup: apt still does not know linux-image-cloud-amd64" >&2; exit 1; }
