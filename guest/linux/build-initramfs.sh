#!/bin/sh
# Build the default kvmbox Linux initramfs and print its path (last line of stdout).
#
#   guest/linux/build-initramfs.sh [--lz4]
#
# Contents: Debian's busybox-static, guest/linux/init as /init, guest/linux/etc/kvmbox/* as
# /etc/kvmbox/*, /bin/kvmbox-atomics (atomics/atomics.c, built here with the host's
# `gcc -O2 -static`: Debian packages gcc and libc6-dev), and the virtio modules of the kernel
# that fetch-kernel.sh fetches (with every module they depend on, in dependency order, listed
# in /lib/modules/kvmbox-load-order).
#
# Result: ~/.cache/kvmbox/initramfs/<key>/initramfs.cpio.gz (or .cpio.lz4 with --lz4; the Debian
# cloud kernel has CONFIG_RD_LZ4=y). <key> = kernel package and version + busybox-static version
# + a hash of this script, init, etc/kvmbox/*, atomics/atomics.c and the gcc version; a second
# run with the same inputs does no work and no network I/O. Concurrent runs are serialised with
# flock. Needs root only to install missing host tools (cpio, gcc, libc6-dev) and for
# `apt-get update`. Messages go to stderr.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE="${KVMBOX_CACHE:-${HOME:-/root}/.cache/kvmbox}"
OUT_ROOT="$CACHE/initramfs"
BB_ROOT="$CACHE/busybox"

log() { echo "build-initramfs: $*" >&2; }
die() { log "error: $*"; exit 1; }

COMPRESS=gz
while [ $# -gt 0 ]; do
    case "$1" in
        --lz4) COMPRESS=lz4 ;;
        --gzip) COMPRESS=gz ;;
        -h | --help)
            sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2
            exit 0
            ;;
        *) die "unknown argument '$1' (expected --lz4 or --gzip)" ;;
    esac
    shift
done

# Modules the kit loads: "name required|optional". Built-in drivers (modules.builtin) are skipped.
WANTED="virtio required
virtio_ring required
virtio_pci_modern_dev optional
virtio_pci_legacy_dev optional
virtio_pci required
virtio_mmio optional
virtio_blk required
failover optional
net_failover optional
virtio_net required
virtio_console required
virtio_rng required
vsock optional
vmw_vsock_virtio_transport optional
evdev optional
button optional"

need_tool() { # need_tool <command> <debian package>
    command -v "$1" >/dev/null 2>&1 && return 0
    log "$1 not found; installing Debian package $2"
    if [ "$(id -u)" -ne 0 ]; then
        die "$1 is missing and installing $2 needs root (run: apt-get install -y $2)"
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >&2 ||
        { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >&2; } ||
        die "apt-get install $2 failed"
    command -v "$1" >/dev/null 2>&1 || die "installed $2 but $1 is still missing"
}

need_tool cpio cpio
need_tool sha256sum coreutils
need_tool flock util-linux
need_tool dpkg-deb dpkg
[ "$COMPRESS" = gz ] && need_tool gzip gzip
[ "$COMPRESS" = lz4 ] && need_tool lz4 lz4
need_tool gcc gcc
LIBC_A=$(gcc -print-file-name=libc.a)
if [ ! -f "$LIBC_A" ]; then
    log "gcc has no static libc (libc.a); installing Debian package libc6-dev"
    [ "$(id -u)" -eq 0 ] || die "libc.a is missing and installing libc6-dev needs root (run: apt-get install -y libc6-dev)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q libc6-dev >&2 || die "apt-get install libc6-dev failed"
fi

[ -f "$HERE/init" ] || die "missing $HERE/init"
[ -d "$HERE/etc/kvmbox" ] || die "missing $HERE/etc/kvmbox"
[ -f "$HERE/atomics/atomics.c" ] || die "missing $HERE/atomics/atomics.c"

# --- kernel (and its modules) -------------------------------------------------------------
VMLINUZ=$(sh "$HERE/fetch-kernel.sh" | tail -n 1) || die "fetch-kernel.sh failed"
[ -f "$VMLINUZ" ] || die "fetch-kernel.sh printed '$VMLINUZ', which is not a file"
KDIR=$(dirname "$VMLINUZ")
KKEY=$(basename "$KDIR") # <package>_<version>
[ -d "$KDIR/modules" ] || die "$KDIR has no modules/ (delete $KDIR and rerun fetch-kernel.sh)"
set -- "$KDIR"/modules/*/
if [ $# -ne 1 ] || [ ! -d "$1" ]; then
    die "expected exactly one kernel release under $KDIR/modules"
fi
KVER=$(basename "$1")

# --- busybox-static -------------------------------------------------------------------------
mkdir -p "$BB_ROOT" "$OUT_ROOT"
exec 8>"$BB_ROOT/.lock"
flock 8

bb_resolve() {
    BBVER=$(apt-cache show --no-all-versions busybox-static 2>/dev/null | sed -n 's/^Version: //p' | head -n 1)
    [ -n "$BBVER" ]
}
# Directory named like apt's .deb files: busybox-static_<version with ':' as %3a>.
bb_dir() { printf '%s/busybox-static_%s' "$BB_ROOT" "$(printf %s "$BBVER" | sed -e 's/:/%3a/g' -e 's|/|_|g')"; }

if ! bb_resolve; then
    cached=$(ls -d "$BB_ROOT"/*/busybox 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$cached" ]; then
        BBVER=$(basename "$(dirname "$cached")" | sed -e 's/^busybox-static_//' -e 's/%3a/:/g')
    else
        log "apt does not know busybox-static; running apt-get update"
        apt-get update -qq >&2 || die "apt-get update failed"
        bb_resolve || die "no package busybox-static in the configured Debian archives"
    fi
fi
BBDIR=$(bb_dir)
if [ ! -x "$BBDIR/busybox" ]; then
    BBWORK=$(mktemp -d "$BB_ROOT/.tmp.XXXXXX")
    trap 'rm -rf "$BBWORK"' EXIT
    log "downloading busybox-static $BBVER"
    if ! (cd "$BBWORK" && apt-get download -q -o APT::Sandbox::User=root "busybox-static=$BBVER" >&2); then
        log "download failed; running apt-get update and retrying"
        apt-get update -qq >&2 || die "apt-get update failed"
        bb_resolve || die "no package busybox-static in the configured Debian archives"
        BBDIR=$(bb_dir)
        if [ ! -x "$BBDIR/busybox" ]; then
            (cd "$BBWORK" && apt-get download -q -o APT::Sandbox::User=root "busybox-static=$BBVER" >&2) ||
                die "apt-get download busybox-static=$BBVER failed"
        fi
    fi
    if [ ! -x "$BBDIR/busybox" ]; then
        dpkg-deb -x "$BBWORK"/busybox-static_*.deb "$BBWORK/root" || die "dpkg-deb -x of busybox-static failed"
        [ -x "$BBWORK/root/bin/busybox" ] || die "busybox-static $BBVER has no /bin/busybox"
        rm -rf "$BBDIR"
        mkdir -p "$BBWORK/out"
        mv "$BBWORK/root/bin/busybox" "$BBWORK/out/busybox"
        mv "$BBWORK/out" "$BBDIR"
    fi
    rm -rf "$BBWORK"
    trap - EXIT
fi
flock -u 8
BUSYBOX="$BBDIR/busybox"
for applet in sh mount insmod setsid cttyhack poweroff reboot nproc depmod adjtimex awk sed acpid; do
    "$BUSYBOX" --list | grep -qx "$applet" || die "$BUSYBOX lacks the '$applet' applet"
done

# --- cache key and lock ---------------------------------------------------------------------
HASH=$( (
    cd "$HERE"
    for f in build-initramfs.sh init atomics/atomics.c $(find etc/kvmbox -type f | LC_ALL=C sort); do
        printf '%s\n' "$f"
        cat "$f"
    done
    gcc --version | head -n 1
) | sha256sum | cut -c1-16)
KEY="${KKEY}+$(basename "$BBDIR")+$HASH"
OUT="$OUT_ROOT/$KEY"
IMG="$OUT/initramfs.cpio.$COMPRESS"

exec 9>"$OUT_ROOT/.lock"
flock 9
if [ -f "$IMG" ]; then
    echo "$IMG"
    exit 0
fi

WORK=$(mktemp -d "$OUT_ROOT/.tmp.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
log "building $IMG"

# --- module dependency resolution -----------------------------------------------------------
# A private copy of the module tree (hard links where possible) so depmod's output and any
# decompression never touch fetch-kernel.sh's cache.
MT="$WORK/modtree/lib/modules"
mkdir -p "$MT"
cp -al "$KDIR/modules/$KVER" "$MT/" 2>/dev/null || cp -a "$KDIR/modules/$KVER" "$MT/"
MD="$MT/$KVER"
# busybox insmod loads plain ELF only: decompress any compressed modules first.
find "$MD" \( -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz' \) | while read -r z; do
    case "$z" in
        *.xz) "$BUSYBOX" xz -dc "$z" >"${z%.xz}.tmp" ;;
        *.gz) "$BUSYBOX" gzip -dc "$z" >"${z%.gz}.tmp" ;;
        *.zst) need_tool zstd zstd && zstd -q -dc "$z" >"${z%.zst}.tmp" ;;
    esac || die "cannot decompress $z"
    base=${z%.*}
    mv "$base.tmp" "$base"
    rm -f "$z"
done
"$BUSYBOX" depmod -b "$WORK/modtree" "$KVER" || die "depmod for $KVER failed"
[ -s "$MD/modules.dep" ] || die "depmod wrote no modules.dep for $KVER"

# Ordered list of module paths (relative to $MD): each module after all of its dependencies.
ORDER=$(printf '%s\n' "$WANTED" | awk -v depfile="$MD/modules.dep" -v builtin="$MD/modules.builtin" '
    function modname(p,   n) { n = p; sub(/.*\//, "", n); sub(/\.ko$/, "", n); gsub(/-/, "_", n); return n }
    function visit(p,   i, n, parts) {
        if (p in done) return
        if (p in onstack) { print "dependency cycle at " p > "/dev/stderr"; exit 3 }
        onstack[p] = 1
        n = split(deps[p], parts, " ")
        for (i = 1; i <= n; i++) {
            if (!(parts[i] in deps)) { print "modules.dep names " parts[i] " but has no line for it" > "/dev/stderr"; exit 3 }
            visit(parts[i])
        }
        delete onstack[p]
        done[p] = 1
        print p
    }
    BEGIN {
        while ((getline line < depfile) > 0) {
            c = index(line, ":"); if (c == 0) continue
            p = substr(line, 1, c - 1)
            deps[p] = substr(line, c + 1)
            path[modname(p)] = p
        }
        while ((getline line < builtin) > 0) isbuiltin[modname(line)] = 1
    }
    NF == 2 {
        if ($1 in path) visit(path[$1])
        else if ($1 in isbuiltin) print "module " $1 " is built into the kernel" > "/dev/stderr"
        else if ($2 == "required") { print "error: kernel has no module " $1 " (neither a module nor built in)" > "/dev/stderr"; exit 2 }
        else print "optional module " $1 " not present in this kernel; skipped" > "/dev/stderr"
    }') || die "module dependency resolution failed for kernel $KVER"
printf '%s\n' "$ORDER" | sed 's/^/  module: /' >&2

# --- root filesystem ------------------------------------------------------------------------
R="$WORK/root"
mkdir -p "$R/bin" "$R/sbin" "$R/usr/bin" "$R/usr/sbin" "$R/dev" "$R/proc" "$R/sys" "$R/tmp" \
    "$R/run" "$R/root" "$R/etc/kvmbox" "$R/lib/modules/$KVER"
chmod 1777 "$R/tmp"
cp "$BUSYBOX" "$R/bin/busybox"
chmod 0755 "$R/bin/busybox"
# Applet links at build time (/init only installs them when they are missing): saves ~400
# symlink syscalls per boot, which matters on a slow software CPU.
"$BUSYBOX" --list-full | while read -r a; do
    [ -e "$R/$a" ] || [ -L "$R/$a" ] || ln -s /bin/busybox "$R/$a"
done
cp "$HERE/init" "$R/init"
chmod 0755 "$R/init"
for f in "$HERE"/etc/kvmbox/*; do
    cp "$f" "$R/etc/kvmbox/"
    chmod 0755 "$R/etc/kvmbox/$(basename "$f")"
done
gcc -O2 -static -Wall -o "$R/bin/kvmbox-atomics" "$HERE/atomics/atomics.c" >&2 ||
    die "gcc -O2 -static of $HERE/atomics/atomics.c failed"
chmod 0755 "$R/bin/kvmbox-atomics"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$R/etc/passwd"
printf 'root:x:0:\n' >"$R/etc/group"

: >"$R/lib/modules/kvmbox-load-order"
for p in $ORDER; do
    mkdir -p "$R/lib/modules/$KVER/$(dirname "$p")"
    cp "$MD/$p" "$R/lib/modules/$KVER/$p"
    echo "/lib/modules/$KVER/$p" >>"$R/lib/modules/kvmbox-load-order"
done
# A modules.dep limited to the included modules, so `modprobe` works inside the guest too.
printf '%s\n' "$ORDER" | awk -v depfile="$MD/modules.dep" '
    NR == FNR { keep[$0] = 1; next }
    { c = index($0, ":"); if (substr($0, 1, c - 1) in keep) print }' - "$MD/modules.dep" \
    >"$R/lib/modules/$KVER/modules.dep"
for f in modules.builtin modules.order; do
    [ -f "$MD/$f" ] && cp "$MD/$f" "$R/lib/modules/$KVER/"
done
# /dev/console lets the kernel give /init a console before devtmpfs is mounted (init also
# reopens the console itself, so an unprivileged build without this node still works).
mknod -m 600 "$R/dev/console" c 5 1 2>/dev/null || log "warning: cannot mknod dev/console (not root?); /init reopens it"

# --- archive --------------------------------------------------------------------------------
mkdir -p "$WORK/out"
(
    cd "$R"
    find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet --reproducible
) >"$WORK/initramfs.cpio" || die "cpio failed"
case "$COMPRESS" in
    gz) gzip -9 -n -c "$WORK/initramfs.cpio" >"$WORK/out/initramfs.cpio.gz" ;;
    lz4) lz4 -l -9 -q -c "$WORK/initramfs.cpio" >"$WORK/out/initramfs.cpio.lz4" ;;
esac || die "compressing the initramfs failed"

{
    echo "kernel_package=$KKEY"
    echo "kernel_release=$KVER"
    echo "vmlinuz=$VMLINUZ"
    echo "busybox_version=$BBVER"
    echo "kit_hash=$HASH"
} >"$WORK/out/INFO"
printf '%s\n' "$ORDER" >"$WORK/out/MODULES"

mkdir -p "$OUT"
for f in "$WORK"/out/*; do
    mv -f "$f" "$OUT/"
done
log "built $(du -h "$IMG" | cut -f1) $IMG"
echo "$IMG"
