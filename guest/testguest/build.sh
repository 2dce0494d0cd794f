#!/bin/sh
# Builds the kvmbox test guest: guest/testguest/build.sh [OUTDIR]
# Output: OUTDIR/testguest.elf (default OUTDIR: <repo>/target/guest). Incremental (make).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:-$repo/target/guest}
for tool in gcc ld make; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "build.sh: '$tool' not found; install it with: apt-get install -y gcc binutils make" >&2
        exit 1
    fi
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
# Several test binaries may build at once: serialise on a lock in OUTDIR when flock exists.
if command -v flock >/dev/null 2>&1; then
    flock "$out/.testguest.lock" make -s -C "$here" OUT="$out"
else
    make -s -C "$here" OUT="$out"
fi
echo "$out/testguest.elf"
