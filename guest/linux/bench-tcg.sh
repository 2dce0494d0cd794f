#!/bin/sh
# Boot-time benchmark of the kit under QEMU TCG: N runs (default 5) of qemu-tcg.sh with
# kvmbox.run=poweroff; for each run, the wall time from starting QEMU to the console line
# "KVMBOX-LINUX userspace-ready", the guest's uptime in that line, and the wall time until QEMU
# exits; then the medians.
#
#   guest/linux/bench-tcg.sh [-n RUNS] [qemu-tcg.sh options except -k/-i, e.g. -c 2 -a quiet --lz4]
#
# Kernel and initramfs are fetched/built before the first run and are not timed. Each run's
# console log is kept in a temporary directory, which is named on stderr when a run fails.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
die() { echo "bench-tcg: error: $*" >&2; exit 2; }

RUNS=5
if [ "${1:-}" = -n ]; then
    [ $# -ge 2 ] || die "-n needs a run count"
    RUNS=$2
    shift 2
fi
case "$RUNS" in '' | *[!0-9]* | 0) die "-n wants a positive run count, got '$RUNS'" ;; esac
LZ4=
for a in "$@"; do
    case "$a" in
        --lz4) LZ4=--lz4 ;;
        -k | -i) die "bench-tcg.sh picks the kernel and initramfs itself; drop $a" ;;
    esac
done

KERNEL=$(sh "$HERE/fetch-kernel.sh" | tail -n 1) || die "fetch-kernel.sh failed"
INITRD=$(sh "$HERE/build-initramfs.sh" $LZ4 | tail -n 1) || die "build-initramfs.sh failed"
LOGS=$(mktemp -d /tmp/kvmbox-bench-tcg.XXXXXX)

now() { date +%s.%N; }
RESULTS="$LOGS/results"
: >"$RESULTS"
echo "bench-tcg: $RUNS runs of qemu-tcg.sh $* (kernel $KERNEL, initramfs $INITRD)" >&2
i=1
while [ "$i" -le "$RUNS" ]; do
    log="$LOGS/run$i.log"
    start=$(now)
    # The marker's arrival is timed in this loop, as QEMU writes it.
    ready=$(timeout 300 sh "$HERE/qemu-tcg.sh" -k "$KERNEL" -i "$INITRD" -a kvmbox.run=poweroff "$@" \
        </dev/null 2>&1 | {
        t=
        while IFS= read -r line; do
            printf '%s\n' "$line" >>"$log"
            case "$line" in
                *"KVMBOX-LINUX userspace-ready"*) [ -n "$t" ] || t=$(now) ;;
            esac
        done
        echo "$t"
    })
    end=$(now)
    [ -n "$ready" ] || die "run $i: no 'KVMBOX-LINUX userspace-ready' line (log: $log)"
    grep -aq 'KVMBOX-LINUX poweroff-requested' "$log" || die "run $i: guest did not power off (log: $log)"
    uptime=$(sed -n 's/.*KVMBOX-LINUX userspace-ready uptime=\([0-9.]*\).*/\1/p' "$log" | head -n 1)
    awk -v i="$i" -v s="$start" -v r="$ready" -v e="$end" -v u="$uptime" \
        'BEGIN { printf "run %d: ready %.3f s  guest-uptime %s s  qemu-exit %.3f s\n", i, r - s, u, e - s }' | tee -a "$RESULTS"
    i=$((i + 1))
done
median() { # median of column $1 of $RESULTS
    awk -v c="$1" '{ print $c }' "$RESULTS" | sort -n | awk '{ v[NR] = $1 } END {
        if (NR % 2) printf "%.3f", v[(NR + 1) / 2]; else printf "%.3f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
echo "median: ready $(median 4) s  guest-uptime $(median 7) s  qemu-exit $(median 10) s  ($RUNS runs)"
rm -rf "$LOGS"
