#!/usr/bin/env bash
# The main job: install what is needed, build kvmbox, prepare the default guest (Debian's cloud
# kernel with a busybox initramfs, both from Debian's packages, cached under ~/.cache/kvmbox)
# and boot it to a shell with its console on this terminal. `exit` in the shell powers the
# guest off; Ctrl-A x quits kvmbox. Extra arguments go to `kvmbox run`, e.g.
# `./scripts/run-default.sh --cpus 2` or `--accel kvm`.
#
# `--accel auto` (the default) runs the guest on KVM where guest kernel code runs at hardware
# speed, and on kvmbox's software engine elsewhere (about 20 s to the shell on a 2-core host; the
# guest skips the kernel's crypto self-tests, `cryptomgr.notests`, half its boot on the engine).
# KVMBOX_DEFAULT_GUEST=testguest boots the freestanding test guest's shell instead (instant on KVM).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --quiet -p kvmbox
if [ "${KVMBOX_DEFAULT_GUEST:-linux}" = testguest ]; then
    guest=$(bash guest/testguest/build.sh | tail -n 1)
    exec target/x86_64-unknown-linux-gnu/release/kvmbox run --kernel "$guest" --memory 256M --cmdline "tests=shell" "$@"
fi
kernel=$(bash guest/linux/fetch-kernel.sh | tail -n 1)
initrd=$(bash guest/linux/build-initramfs.sh | tail -n 1)
echo "kvmbox: booting Debian's cloud kernel with a busybox shell (Ctrl-A x quits)" >&2
exec target/x86_64-unknown-linux-gnu/release/kvmbox run --kernel "$kernel" --initrd "$initrd" --memory 512M \
    --cmdline "console=ttyS0 reboot=k panic=-1 cryptomgr.notests quiet" --rng "$@"
