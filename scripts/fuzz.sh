#!/bin/sh
# Runs kvmbox's cargo-fuzz targets one after another, each for a fixed time, and prints one line
# of figures per target (the table in FUZZING.md comes from these lines).
#
#   scripts/fuzz.sh [-t SECONDS] [-n] [TARGET...]   (default: 180 s each, every target)
#
# -n: do not build, run the binaries already in target/fuzz (built by an earlier run or by
# `cargo fuzz build --target-dir target/fuzz` in a crate); the build otherwise happens before
# each target's timed run and is not counted in it.
#
# Installs cargo-fuzz (`cargo install cargo-fuzz --locked`) when it is missing. Runs on the
# default toolchain: nightly, or stable with RUSTC_BOOTSTRAP=1 so that it accepts the -Z flags
# cargo-fuzz passes (-Zsanitizer=address; the stable toolchain ships the ASan runtime). The four
# fuzz crates share one build directory, target/fuzz. One libFuzzer process per target (no
# -jobs/-workers: the same single fuzzing process as -jobs=1, without the supervisor process
# and its fuzz-0.log), under `nice -n 10`.
# Corpora stay in crates/*/fuzz/corpus/TARGET between runs; a crash leaves its input in
# crates/*/fuzz/artifacts/TARGET/ and the run's log in target/fuzz-logs/TARGET.log.
# exec_bytes gets the test guest's own machine code as a seed corpus (real instruction
# sequences); the engine, kernel-image, ACPI and command-line targets start at their full length
# (-len_control=0): libFuzzer's default grows inputs so slowly that a 3-minute run never
# reaches long instruction sequences or command lines near the kernel's limits.
# Exit status: 0 when no target crashed, 1 otherwise, 2 on bad usage.
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
secs=180
build=yes
while [ $# -gt 0 ]; do
    case $1 in
    -t)
        secs=${2:?"-t needs seconds"}
        shift 2
        ;;
    -n)
        build=no
        shift
        ;;
    -*)
        echo "usage: scripts/fuzz.sh [-t SECONDS] [-n] [TARGET...]" >&2
        exit 2
        ;;
    *) break ;;
    esac
done
want=" $* "
logs=$repo/target/fuzz-logs
mkdir -p "$logs"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1

# Seeds for exec_bytes: 256-byte windows of the test guest's .text, each behind a mode byte.
seed_engine() {
    guest=$(sh "$repo/guest/testguest/build.sh" "$repo/target/guest")
    text=$(mktemp)
    objcopy -O binary --only-section=.text "$guest" "$text"
    size=$(stat -c %s "$text")
    dir=$repo/crates/emu/fuzz/corpus/exec_bytes
    mkdir -p "$dir"
    i=0
    off=0
    while [ $off -lt "$size" ] && [ $i -lt 64 ]; do
        if [ ! -e "$dir/seed-text-$i" ]; then
            { printf "\\$(printf %o $((i % 4)))"; dd if="$text" bs=1 skip=$off count=256 2>/dev/null; } \
                >"$dir/seed-text-$i"
        fi
        off=$((off + 512))
        i=$((i + 1))
    done
    rm -f "$text"
}

# Seeds for image_open: small real images made by qemu-img (qcow2 v3 and v2 with a written
# cluster, empty VDI, VMDK sparse and stream-optimized, dynamic VHD; VHDX's smallest image,
# 8 MiB, exceeds the target's max_len), so the search starts inside every parser.
seed_images() {
    dir=$repo/crates/block/fuzz/corpus/image_open
    mkdir -p "$dir"
    data=$(mktemp)
    { head -c 1024 /dev/urandom; head -c 64512 /dev/zero; } >"$data"
    for f in qcow2:cluster_size=512 qcow2:cluster_size=4096,compat=0.10 vdi: vmdk: \
        vmdk:subformat=streamOptimized vpc:; do
        fmt=${f%%:*}
        opts=${f#*:}
        out=$dir/seed-$fmt-$(echo "$opts" | tr -c 'a-z0-9\n' - | cut -c1-24)
        [ -e "$out" ] && continue
        if [ "$fmt" = qcow2 ]; then
            qemu-img convert -q -f raw -O qcow2 -o "$opts" "$data" "$out"
        else
            qemu-img create -q -f "$fmt" ${opts:+-o "$opts"} "$out" 64K
        fi
    done
    rm -f "$data"
}

failed=0
# crate target max_len
while read -r crate target maxlen; do
    if [ "$want" != "  " ] && ! echo "$want" | grep -q " $target "; then
        continue
    fi
    extra=""
    case $target in
    exec_bytes)
        seed_engine
        extra="-len_control=0"
        ;;
    image_open)
        seed_images
        ;;
    exec_program | cmdline | kernel_image | acpi_tables)
        extra="-len_control=0"
        ;;
    esac
    corpus=$repo/$crate/fuzz/corpus/$target
    mkdir -p "$corpus"
    before=$(ls "$corpus" | wc -l)
    log=$logs/$target.log
    start=$(date -u +%FT%TZ)
    status=0
    if [ $build = yes ]; then
        (cd "$repo/$crate" && nice -n 10 cargo fuzz build --target-dir "$repo/target/fuzz" "$target")
    fi
    # What `cargo fuzz run` runs, without its build step inside the timed part.
    mkdir -p "$repo/$crate/fuzz/artifacts/$target"
    (cd "$repo/$crate/fuzz" && nice -n 10 "$repo/target/fuzz/x86_64-unknown-linux-gnu/release/$target" \
        -artifact_prefix="artifacts/$target/" -max_total_time="$secs" -max_len="$maxlen" \
        -print_final_stats=1 $extra "corpus/$target") >"$log" 2>&1 || status=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
    last=$(grep -E '^#[0-9]+' "$log" | tail -1)
    cov=$(echo "$last" | sed -n 's/.*cov: \([0-9]*\).*/\1/p')
    ft=$(echo "$last" | sed -n 's/.*ft: \([0-9]*\).*/\1/p')
    corp=$(echo "$last" | sed -n 's/.*corp: \([0-9]*\/[0-9]*[a-zA-Z]*\).*/\1/p')
    after=$(ls "$corpus" | wc -l)
    echo "$target: start $start, $secs s, max_len $maxlen, execs ${execs:-?}, exec/s ${rate:-?}," \
        "cov ${cov:-?}, ft ${ft:-?}, corp ${corp:-?}, corpus files $before -> $after, exit $status," \
        "log $log"
    if [ "$status" -ne 0 ]; then
        failed=1
        grep -m3 'panicked at\|ERROR: \|Test unit written\|SUMMARY' "$log" | sed 's/^/    /'
    fi
done <<EOF
crates/virtio virtqueue 8192
crates/virtio block_request 8192
crates/virtio net_tx 8192
crates/virtio net_rx 8192
crates/emu exec_bytes 4096
crates/emu exec_program 8192
crates/arch kernel_image 16384
crates/arch initrd_placement 64
crates/arch acpi_tables 8192
crates/arch cmdline 8192
crates/block image_open 65536
EOF
exit $failed
