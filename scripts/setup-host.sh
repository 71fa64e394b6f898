#!/bin/sh
# Install what qemu-mktme needs from Debian when it is missing; do nothing when all is there.
# Needs root (or sudo without a password) only when something must be installed.
#   --plan   say what this Debian release gets (no change to the system) and exit
set -eu

# Which Debian decides what QEMU 10 is, read from os-release (the same rule as
# qemu_mktme.images.backports.qemu10_source): Debian 12 (bookworm) ships QEMU 7.2, and
# 'qemu-mktme images build qemu10' unpacks 10.x from bookworm-backports into the cache; Debian 13
# (trixie) and later ship 10.x, so qemu10 is the system QEMU and bookworm-backports does not apply.
os_release=${QEMU_MKTME_OS_RELEASE:-/etc/os-release}
os_field() { sed -n "s/^$1=//p" "$os_release" 2>/dev/null | tr -d "\"'" | head -n 1; }
os_id=$(os_field ID); os_version=$(os_field VERSION_ID); os_codename=$(os_field VERSION_CODENAME)
os_major=${os_version%%.*}
if [ "$os_id" != debian ]; then
    qemu10="not Debian's on ${os_id:-a system without $os_release}: give a QEMU 10 with --qemu PATH (the packages installed below are named as Debian names them)"
elif [ "$os_codename" = bookworm ] || [ "$os_major" = 12 ]; then
    qemu10="bookworm-backports, unpacked in the cache by 'qemu-mktme images build qemu10'"
elif { [ -n "$os_major" ] && [ "$os_major" -ge 13 ] 2>/dev/null; } \
        || { [ -z "$os_major" ] && [ -n "$os_codename" ] && [ "$os_codename" != bullseye ]; }; then
    qemu10="the system QEMU (Debian ${os_version:-$os_codename} ships 10.x; no backports)"
else
    qemu10="not available: Debian ${os_version:-$os_codename} is older than 12 (bookworm), the oldest tested"
fi
if [ "${1:-}" = --plan ]; then
    echo "${os_id:-?} ${os_version:-?} (${os_codename:-?}): QEMU 10 is $qemu10"
    exit 0
fi

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
