#!/usr/bin/env bash
# `kvmbox disk convert` beside `qemu-img convert` on the same images: raw -> qcow2 and
# qcow2 -> raw, a 512 MiB disk that is half random data (in 1 MiB runs) and half zeroes.
# Usage: scripts/bench-disk-convert.sh [RUNS]   (needs a release build and qemu-img)
set -euo pipefail
runs=${1:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
kvmbox=$root/target/release/kvmbox
dir=$(mktemp -d /tmp/kvmbox-bench-convert.XXXXXX)
trap 'rm -rf "$dir"' EXIT
truncate -s 512M "$dir/src.raw"
for i in $(seq 0 2 511); do
    head -c 1M /dev/urandom | dd of="$dir/src.raw" bs=1M seek="$i" conv=notrunc status=none
done
qemu-img convert -O qcow2 "$dir/src.raw" "$dir/src.qcow2"
t() { local s e; s=$(date +%s.%N); "$@" >/dev/null; e=$(date +%s.%N); echo "$e - $s" | bc; }
for r in $(seq "$runs"); do
    rm -f "$dir"/o.*
    a=$(t qemu-img convert -O qcow2 "$dir/src.raw" "$dir/o.q.qcow2")
    b=$(t "$kvmbox" disk convert "$dir/src.raw" "$dir/o.k.qcow2" --format qcow2)
    c=$(t qemu-img convert -O raw "$dir/src.qcow2" "$dir/o.q.raw")
    d=$(t "$kvmbox" disk convert "$dir/src.qcow2" "$dir/o.k.raw" --format raw)
    qemu-img compare "$dir/o.q.qcow2" "$dir/o.k.qcow2" >/dev/null
    cmp "$dir/o.q.raw" "$dir/o.k.raw"
    echo "run $r: raw->qcow2 qemu-img ${a}s kvmbox ${b}s; qcow2->raw qemu-img ${c}s kvmbox ${d}s"
done
