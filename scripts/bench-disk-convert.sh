#!/usr/bin/env bash
# `kvmbox disk convert` beside `qemu-img convert` on the same images: raw -> qcow2 and
# qcow2 -> raw, a 512 MiB disk that is half random data (in 1 MiB runs) and half zeroes.
# kvmbox syncs the destination before it exits; qemu-img's default destination cache mode
# (`-t unsafe`) does not, `-t writeback` does, so qemu-img runs both ways.
# Usage: scripts/bench-disk-convert.sh [RUNS]   (needs a release build and qemu-img)
set -euo pipefail
runs=${1:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
kvmbox=$root/target/x86_64-unknown-linux-gnu/release/kvmbox
dir=$(mktemp -d /tmp/kvmbox-bench-convert.XXXXXX)
trap 'rm -rf "$dir"' EXIT
truncate -s 512M "$dir/src.raw"
for i in $(seq 0 2 511); do
    head -c 1M /dev/urandom | dd of="$dir/src.raw" bs=1M seek="$i" conv=notrunc status=none
done
qemu-img convert -O qcow2 "$dir/src.raw" "$dir/src.qcow2"
sync
t() { local s e; s=$(date +%s.%N); "$@" >/dev/null; e=$(date +%s.%N); echo "$e - $s" | bc; }
echo "$(date -u '+%F %H:%M UTC'), load $(cut -d' ' -f1-3 /proc/loadavg), $(qemu-img --version | head -1)"
echo "columns: qemu-img (no sync) / qemu-img -t writeback (synced) / kvmbox (synced), seconds"
for r in $(seq "$runs"); do
    rm -f "$dir"/o.*
    a=$(t qemu-img convert -O qcow2 "$dir/src.raw" "$dir/o.q.qcow2")
    rm -f "$dir/o.q.qcow2"
    b=$(t qemu-img convert -t writeback -O qcow2 "$dir/src.raw" "$dir/o.q.qcow2")
    c=$(t "$kvmbox" disk convert "$dir/src.raw" "$dir/o.k.qcow2" --format qcow2)
    d=$(t qemu-img convert -O raw "$dir/src.qcow2" "$dir/o.q.raw")
    rm -f "$dir/o.q.raw"
    e=$(t qemu-img convert -t writeback -O raw "$dir/src.qcow2" "$dir/o.q.raw")
    f=$(t "$kvmbox" disk convert "$dir/src.qcow2" "$dir/o.k.raw" --format raw)
    qemu-img compare "$dir/o.q.qcow2" "$dir/o.k.qcow2" >/dev/null
    cmp "$dir/o.q.raw" "$dir/o.k.raw"
    echo "run $r (load $(cut -d' ' -f1 /proc/loadavg)): raw->qcow2 $a / $b / $c; qcow2->raw $d / $e / $f"
done
