#!/bin/sh
# Fetch Debian's cloud kernel (linux-image-<abi>-cloud-amd64, the package that
# linux-image-cloud-amd64 depends on) and print the path of its bzImage.
#
# Result: ~/.cache/kvmbox/linux/<package>_<version>/vmlinuz (+ modules/<abi>/...).
# Idempotent and cached by package version: a second run does no network I/O.
# Runs `apt-get update` once if apt does not know the package. Needs root only
# for that update. All messages go to stderr; stdout is the bzImage path only.
set -eu

META=linux-image-cloud-amd64
CACHE_ROOT="${KVMBOX_CACHE:-${HOME:-/root}/.cache/kvmbox}/linux"
mkdir -p "$CACHE_ROOT"

log() { echo "fetch-kernel: $*" >&2; }

# Serialize concurrent runs (parallel tests) on one lock file.
exec 9>"$CACHE_ROOT/.lock"
flock 9

resolve() {
    # The versioned image package the metapackage depends on, and its version.
    PKG=$(apt-cache depends "$META" 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n 1)
    [ -n "$PKG" ] || return 1
    VER=$(apt-cache show --no-all-versions "$PKG" 2>/dev/null | sed -n 's/^Version: //p' | head -n 1)
    [ -n "$VER" ]
}

if ! resolve; then
    # apt does not know the package: fall back to a cached kernel before touching the network.
    cached=$(ls -d "$CACHE_ROOT"/linux-image-*_* 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$cached" ] && [ -f "$cached/vmlinuz" ]; then
        echo "$cached/vmlinuz"
        exit 0
    fi
    log "apt does not know $META; running apt-get update"
    apt-get update -qq >&2 || { log "apt-get update failed"; exit 1; }
    resolve || { log "no package $META in the configured Debian archives"; exit 1; }
fi

DEST="$CACHE_ROOT/${PKG}_${VER}"
if [ -f "$DEST/vmlinuz" ]; then
    echo "$DEST/vmlinuz"
    exit 0
fi

WORK=$(mktemp -d "$CACHE_ROOT/.tmp.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
log "downloading $PKG $VER"
if ! (cd "$WORK" && apt-get download -q -o APT::Sandbox::User=root "$PKG=$VER" >&2); then
    # Stale package lists name a version the mirror no longer has: refresh once and retry.
    log "download failed; running apt-get update and retrying"
    apt-get update -qq >&2 || { log "apt-get update failed"; exit 1; }
    resolve || { log "no package $META in the configured Debian archives"; exit 1; }
    DEST="$CACHE_ROOT/${PKG}_${VER}"
    if [ -f "$DEST/vmlinuz" ]; then
        echo "$DEST/vmlinuz"
        exit 0
    fi
    (cd "$WORK" && apt-get download -q -o APT::Sandbox::User=root "$PKG=$VER" >&2) || { log "apt-get download $PKG=$VER failed"; exit 1; }
fi
DEB=$(ls "$WORK"/*.deb | head -n 1)
mkdir -p "$WORK/root" "$WORK/out"
dpkg-deb -x "$DEB" "$WORK/root"

IMG=$(ls "$WORK"/root/boot/vmlinuz-* 2>/dev/null | head -n 1 || true)
[ -n "$IMG" ] || { log "$DEB has no /boot/vmlinuz-*"; exit 1; }
mv "$IMG" "$WORK/out/vmlinuz"
echo "$(basename "$IMG")" > "$WORK/out/VMLINUZ_NAME"
for d in "$WORK/root/lib/modules" "$WORK/root/usr/lib/modules"; do
    if [ -d "$d" ]; then
        mv "$d" "$WORK/out/modules"
        break
    fi
done
for f in "$WORK"/root/boot/config-* "$WORK"/root/boot/System.map-*; do
    [ -f "$f" ] && mv "$f" "$WORK/out/"
done
rm -rf "$DEST"
mv "$WORK/out" "$DEST"
echo "$DEST/vmlinuz"
