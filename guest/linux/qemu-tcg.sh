#!/bin/sh
# Boot the kvmbox default Linux guest kit under QEMU TCG (the software-CPU reference kvmbox is
# compared with). The serial console is this terminal (stdio; Ctrl-A X quits QEMU).
#
#   guest/linux/qemu-tcg.sh [-c CPUS] [-m MEM] [-M MACHINE] [-a 'KERNEL ARGS'] [--lz4]
#                           [-k KERNEL] [-i INITRD]
#                           [-- EXTRA QEMU ARGS...]
#
#   -c CPUS     vCPUs (default 1)
#   -m MEM      guest RAM, QEMU syntax (default 512M; the cloud kernel wants >= 128M)
#   -M MACHINE  QEMU machine type (default pc; q35 also works)
#   -a ARGS     appended to the kernel command line, e.g. -a kvmbox.run=info
#   --lz4       use the lz4-compressed initramfs instead of gzip
#   -k KERNEL   boot this bzImage instead of fetch-kernel.sh's (skips the apt lookup)
#   -i INITRD   boot this initramfs instead of build-initramfs.sh's (skips the rebuild check)
#   -- ...      passed to QEMU as is, e.g. -- -device virtio-rng-pci
#
# The kernel command line is "console=ttyS0 panic=-1 ARGS": with -no-reboot a guest reboot or
# panic ends QEMU, and so does power-off. Kernel and initramfs are built/fetched first (cached).
# QEMU's exit status is this script's.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
die() { echo "qemu-tcg: error: $*" >&2; exit 2; }

CPUS=1
MEM=512M
MACHINE=pc
EXTRA_APPEND=
LZ4=
KERNEL=
INITRD=
while [ $# -gt 0 ]; do
    case "$1" in
        -c) [ $# -ge 2 ] || die "-c needs a CPU count"; CPUS=$2; shift 2 ;;
        -m) [ $# -ge 2 ] || die "-m needs a memory size"; MEM=$2; shift 2 ;;
        -M) [ $# -ge 2 ] || die "-M needs a machine type"; MACHINE=$2; shift 2 ;;
        -a) [ $# -ge 2 ] || die "-a needs kernel arguments"; EXTRA_APPEND="$EXTRA_APPEND $2"; shift 2 ;;
        -k) [ $# -ge 2 ] || die "-k needs a kernel path"; KERNEL=$2; shift 2 ;;
        -i) [ $# -ge 2 ] || die "-i needs an initramfs path"; INITRD=$2; shift 2 ;;
        --lz4) LZ4=--lz4; shift ;;
        -h | --help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
        --) shift; break ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
case "$CPUS" in '' | *[!0-9]* | 0) die "-c wants a positive CPU count, got '$CPUS'" ;; esac
command -v qemu-system-x86_64 >/dev/null 2>&1 || die "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"

if [ -z "$KERNEL" ]; then
    KERNEL=$(sh "$HERE/fetch-kernel.sh" | tail -n 1) || die "fetch-kernel.sh failed"
fi
if [ -z "$INITRD" ]; then
    INITRD=$(sh "$HERE/build-initramfs.sh" $LZ4 | tail -n 1) || die "build-initramfs.sh failed"
fi
[ -f "$KERNEL" ] || die "kernel '$KERNEL' is not a file"
[ -f "$INITRD" ] || die "initramfs '$INITRD' is not a file"

exec qemu-system-x86_64 -accel tcg -M "$MACHINE" -m "$MEM" -smp "$CPUS" \
    -nographic -nodefaults -no-user-config -serial mon:stdio -no-reboot \
    -kernel "$KERNEL" -initrd "$INITRD" \
    -append "console=ttyS0 panic=-1${EXTRA_APPEND}" "$@"
