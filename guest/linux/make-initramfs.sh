#!/bin/sh
# Build a small busybox initramfs for Debian's cloud kernel (the one fetch-kernel.sh gets) and
# print its path. The image holds Debian's static busybox, the kernel's virtio modules (with
# their dependencies, in load order) and an /init that:
#   - mounts /proc, /sys, /dev and loads the modules,
#   - prints machine-readable lines on the console:
#       KVMBOX-LINUX init kernel=<release> cpus=<n> mem_kib=<MemTotal>
#       KVMBOX-LINUX virtio devices=<ids...> blocks=<vda...> nets=<eth0...>
#       KVMBOX-LINUX done
#   - runs `kvmbox.run=<cmd>` from the kernel command line first if given (commas become
#     spaces, e.g. kvmbox.run=cat,/proc/interrupts), then powers off (ACPI S5),
#   - or, with `kvmbox.shell` on the command line, starts an interactive shell instead.
#
# Result: ~/.cache/kvmbox/linux/initramfs/<kernel package>_<busybox version>_<init hash>.cpio.gz
# Idempotent and cached; the first run downloads busybox-static with apt-get (like
# fetch-kernel.sh). Messages go to stderr; stdout is the initramfs path only.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE_ROOT="${KVMBOX_CACHE:-${HOME:-/root}/.cache/kvmbox}/linux"
log() { echo "make-initramfs: $*" >&2; }

VMLINUZ=$("$HERE/fetch-kernel.sh")
KDIR=$(dirname "$VMLINUZ")
KPKG=$(basename "$KDIR")
MODROOT=$(ls -d "$KDIR"/modules/* 2>/dev/null | head -n 1 || true)
[ -n "$MODROOT" ] || { log "no modules next to $VMLINUZ"; exit 1; }
KREL=$(basename "$MODROOT")

mkdir -p "$CACHE_ROOT/initramfs"
exec 9>"$CACHE_ROOT/initramfs/.lock"
flock 9

# Debian's static busybox, cached by version.
BBVER=$(apt-cache show --no-all-versions busybox-static 2>/dev/null | sed -n 's/^Version: //p' | head -n 1)
if [ -z "$BBVER" ]; then
    log "apt does not know busybox-static; running apt-get update"
    apt-get update -qq >&2 || { log "apt-get update failed"; exit 1; }
    BBVER=$(apt-cache show --no-all-versions busybox-static | sed -n 's/^Version: //p' | head -n 1)
fi
BBDIR="$CACHE_ROOT/busybox-static_$(echo "$BBVER" | tr ':' '_')"
if [ ! -x "$BBDIR/busybox" ]; then
    T=$(mktemp -d "$CACHE_ROOT/.bb.XXXXXX")
    log "downloading busybox-static $BBVER"
    (cd "$T" && apt-get download -q -o APT::Sandbox::User=root "busybox-static=$BBVER" >&2) ||
        { rm -rf "$T"; log "apt-get download busybox-static failed"; exit 1; }
    dpkg-deb -x "$T"/busybox-static_*.deb "$T/root"
    mkdir -p "$BBDIR"
    mv "$T/root/bin/busybox" "$BBDIR/busybox"
    rm -rf "$T"
fi
BB="$BBDIR/busybox"

INIT=$(cat <<'EOF_INIT'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$m.ko" 2>/dev/null || echo "KVMBOX-LINUX insmod-failed $m"
done
cpus=$(grep -c '^processor' /proc/cpuinfo)
mem=$(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo)
echo "KVMBOX-LINUX init kernel=$(uname -r) cpus=$cpus mem_kib=$mem"
sleep 1 2>/dev/null
devs=$(ls /sys/bus/virtio/devices 2>/dev/null | tr '\n' ' ')
blks=$(ls /sys/block 2>/dev/null | grep '^vd' | tr '\n' ' ')
nets=$(ls /sys/class/net 2>/dev/null | grep -v '^lo$' | tr '\n' ' ')
echo "KVMBOX-LINUX virtio devices=$devs blocks=$blks nets=$nets"
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    kvmbox.shell) exec setsid cttyhack sh ;;
    kvmbox.run=*) sh -c "$(echo "${arg#kvmbox.run=}" | tr ',' ' ')" ;;
    esac
done
echo "KVMBOX-LINUX done"
poweroff -f
EOF_INIT
)

# Virtio drivers and what they depend on (from each module's .modinfo), dependencies first.
WANT="virtio virtio_ring virtio_pci virtio_mmio virtio_blk virtio_net virtio_console virtio_rng"
find_mod() { # module name -> path (file names may use '-' where module names use '_')
    n=$(echo "$1" | tr '_' '-')
    find "$MODROOT/kernel" \( -name "$1.ko" -o -name "$n.ko" -o -name "$(echo "$1" | tr '-' '_').ko" \) | head -n 1
}
ORDER=""
add_mod() {
    case " $ORDER " in *" $1 "*) return 0 ;; esac
    f=$(find_mod "$1")
    [ -n "$f" ] || return 0 # built in
    deps=$(tr '\0' '\n' < "$f" | sed -n 's/^depends=//p' | tr ',' ' ')
    for d in $deps; do add_mod "$d"; done
    ORDER="$ORDER $1"
}
for m in $WANT; do add_mod "$m"; done

HASH=$(printf '%s\n%s\n' "$INIT" "$ORDER" | sha256sum | cut -c1-12)
OUT="$CACHE_ROOT/initramfs/${KPKG}_$(echo "$BBVER" | tr ':' '_')_$HASH.cpio.gz"
if [ -f "$OUT" ]; then
    echo "$OUT"
    exit 0
fi

T=$(mktemp -d "$CACHE_ROOT/initramfs/.build.XXXXXX")
trap 'rm -rf "$T"' EXIT
mkdir -p "$T/root/bin" "$T/root/proc" "$T/root/sys" "$T/root/dev" "$T/root/tmp" \
    "$T/root/lib/modules"
cp "$BB" "$T/root/bin/busybox"
for applet in $("$BB" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$T/root/bin/$applet"
done
printf '%s\n' "$INIT" > "$T/root/init"
chmod 755 "$T/root/init"
for m in $ORDER; do
    cp "$(find_mod "$m")" "$T/root/lib/modules/$m.ko"
done
echo "$ORDER" | tr ' ' '\n' | sed '/^$/d' > "$T/root/lib/modules/load-order"
echo "$KREL" > "$T/root/lib/modules/kernel-release"
(cd "$T/root" && find . | sort | "$BB" cpio -o -H newc -R 0:0 2>/dev/null) | gzip -9n > "$T/initramfs.cpio.gz"
mv "$T/initramfs.cpio.gz" "$OUT"
log "built $OUT (modules:$ORDER)"
echo "$OUT"
