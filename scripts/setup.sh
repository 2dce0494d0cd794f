#!/usr/bin/env bash
# Install what kvmbox needs to build, test and boot its guests on Debian 12. Idempotent.
set -euo pipefail

need=()
for pkg_cmd in gcc:gcc make:make binutils:ld cpio:cpio busybox-static:/bin/busybox \
               dpkg-dev:dpkg-deb lz4:lz4 iproute2:ip iputils-ping:ping \
               qemu-utils:qemu-img passt:passt libc6-dev:/usr/lib/x86_64-linux-gnu/libc.a; do
    pkg=${pkg_cmd%%:*}
    cmd=${pkg_cmd#*:}
    if [[ $cmd == /* ]]; then [ -e "$cmd" ] && continue; else command -v "$cmd" >/dev/null && continue; fi
    need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
    echo "setup: cargo is missing: install Rust (https://rustup.rs) first" >&2
    exit 1
fi
if command -v rustup >/dev/null; then
    rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
    rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
fi
