#!/usr/bin/env bash
# Run kvm-unit-tests' x86 tests on QEMU TCG, on kvmbox's engine (--accel emu), on kvmbox with
# KVM and on QEMU with KVM (where /dev/kvm exists), and print one table of results. The QEMU KVM
# column tells what the host's KVM itself does with a test (on hosts where KVM emulates parts of
# the guest, a failure there is the host's, not kvmbox's).
#
#   scripts/kvm-unit-tests.sh [options] KUT_DIR [TEST...]
#
# KUT_DIR is a kvm-unit-tests tree configured and built by hand outside this repository
# (`./configure && make`): kvmbox neither vendors nor builds it. TESTs are section names of
# KUT_DIR/x86/unittests.cfg (default: every test run_tests.sh runs by default on x86_64).
# Each test runs with the arguments unittests.cfg gives it: smp, test_args / extra_params'
# -append, the memory size and CPU model of qemu_params (QEMU gets qemu_params as they are),
# and its timeout (default 90 s, as run_tests.sh).
#
# Options:
#   --engines LIST   comma-separated subset of tcg,emu,kvm,qkvm (default: all; kvm and qkvm only
#                    with /dev/kvm)
#   --timeout SECS   per-test timeout instead of unittests.cfg's
#   --kvm-timeout S  per-test timeout on KVM, kvmbox's and QEMU's (default: --timeout or
#                    unittests.cfg's)
#   --logs DIR       keep each run's console output in DIR (default: a temporary directory)
#   --kvmbox PATH    kvmbox binary (default: target/x86_64-unknown-linux-gnu/release/kvmbox, built if missing)
#   --qemu PATH      QEMU binary (default: qemu-system-x86_64 on PATH)
#
# A cell is PASS/FAIL/SKIP with kvm-unit-tests' own counts (n tests, f unexpected failures,
# s skipped), TIMEOUT, SKIP(no DEVICE) on kvmbox when the test's qemu_params ask for a device
# kvmbox does not have, or "-" when the engine was not run. Exit status: 0.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
engines="tcg,emu,kvm,qkvm"
timeout_override=""
kvm_timeout=""
logs=""
kvmbox="$here/target/x86_64-unknown-linux-gnu/release/kvmbox"
qemu="qemu-system-x86_64"

while [ $# -gt 0 ]; do
    case "$1" in
        --engines) engines=$2; shift 2 ;;
        --timeout) timeout_override=$2; shift 2 ;;
        --kvm-timeout) kvm_timeout=$2; shift 2 ;;
        --logs) logs=$2; shift 2 ;;
        --kvmbox) kvmbox=$2; shift 2 ;;
        --qemu) qemu=$2; shift 2 ;;
        -h|--help) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "kvm-unit-tests.sh: unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
done
if [ $# -lt 1 ]; then
    echo "usage: scripts/kvm-unit-tests.sh [options] KUT_DIR [TEST...]" >&2
    exit 2
fi
kut=$(cd "$1" && pwd)
shift
cfg="$kut/x86/unittests.cfg"
if [ ! -f "$cfg" ] || ! ls "$kut"/x86/*.flat >/dev/null 2>&1; then
    echo "kvm-unit-tests.sh: $kut is not a built kvm-unit-tests tree (no x86/unittests.cfg or x86/*.flat; run ./configure && make there)" >&2
    exit 2
fi
has() { [[ ",$engines," == *",$1,"* ]]; }
if { has kvm || has qkvm; } && [ ! -w /dev/kvm ]; then
    echo "kvm-unit-tests.sh: no usable /dev/kvm: the KVM columns are skipped" >&2
    engines=${engines//kvm/}
fi
if { has tcg || has qkvm; } && ! command -v "$qemu" >/dev/null; then
    echo "kvm-unit-tests.sh: $qemu not found: the QEMU columns are skipped" >&2
    engines=${engines//tcg/}
    engines=${engines//qkvm/}
fi
if { has emu || has kvm; } && [ ! -x "$kvmbox" ]; then
    (cd "$here" && cargo build --release -p kvmbox >&2)
fi
if [ -z "$logs" ]; then
    logs=$(mktemp -d /tmp/kvm-unit-tests.XXXXXX)
fi
mkdir -p "$logs"

# unittests.cfg as one line per test: name|file|smp|args|qemu_params|arch|timeout|accel|groups|check
parse_cfg() {
    awk '
    function flush() {
        if (name != "") print name "|" file "|" smp "|" args "|" qp "|" arch "|" to "|" acc "|" grp "|" chk
        name = ""; file = ""; smp = "1"; args = ""; qp = ""; arch = ""; to = ""; acc = ""; grp = ""; chk = ""
    }
    function val(s) { sub(/^[^=]*=[ \t]*/, "", s); gsub(/^["\047]|["\047]$/, "", s); return s }
    /^[ \t]*#/ { next }
    /^\[.*\]/ { flush(); name = $0; gsub(/[\[\] \t]/, "", name); next }
    /^file[ \t]*=/ { file = val($0) }
    /^smp[ \t]*=/ { smp = val($0) }
    /^test_args[ \t]*=/ { args = val($0) }
    /^extra_params[ \t]*=/ { e = val($0); if (match(e, /-append [^-]*/)) { a = substr(e, RSTART + 8, RLENGTH - 8); gsub(/["\047]/, "", a); args = a; sub(/-append [^-]*/, "", e) } qp = qp " " e }
    /^qemu_params[ \t]*=/ { qp = qp " " val($0) }
    /^arch[ \t]*=/ { arch = val($0) }
    /^timeout[ \t]*=/ { to = val($0) }
    /^accel[ \t]*=/ { acc = val($0) }
    /^groups[ \t]*=/ { grp = val($0) }
    /^check[ \t]*=/ { chk = val($0) }
    END { flush() }
    ' "$cfg"
}

# -m from qemu_params, in MiB (QEMU's default: 128).
mem_mib() {
    local m
    m=$(sed -n 's/.*-m \([0-9]*[gGmM]\{0,1\}\).*/\1/p' <<<"$1")
    case "$m" in
        "") echo 128 ;;
        *[gG]) echo $(( ${m%[gG]} * 1024 )) ;;
        *[mM]) echo "${m%[mM]}" ;;
        *) echo "$m" ;;
    esac
}

# Turn a run's exit status and console log into a cell.
verdict() {
    local status=$1 log=$2 summary counts=""
    summary=$(grep -a '^SUMMARY:' "$log" | tail -1 || true)
    if [ -n "$summary" ]; then
        local n f s
        n=$(sed -n 's/^SUMMARY: \([0-9]*\) tests.*/\1/p' <<<"$summary")
        f=$(sed -n 's/.*, \([0-9]*\) unexpected failures.*/\1/p' <<<"$summary")
        s=$(sed -n 's/.*, \([0-9]*\) skipped.*/\1/p' <<<"$summary")
        counts=" ${n:-0}/${f:-0}/${s:-0}"
    fi
    # QEMU exits with 1 when it cannot start (an option this build lacks, -cpu host without
    # KVM): that is no pass.
    if [ "$status" = 1 ] && [ -z "$summary" ] &&
        grep -a '^qemu-system-x86_64: ' "$log" | grep -avq -e ': warning:' -e 'terminating on signal'; then
        echo "ERROR(qemu)"
        return
    fi
    case "$status" in
        1) echo "PASS$counts" ;;
        77) echo "SKIP$counts" ;;
        124|137) echo "TIMEOUT$counts" ;;
        3) echo "FAIL$counts" ;;
        *) echo "FAIL(rc=$status)$counts" ;;
    esac
}

run_one() {
    local engine=$1 name=$2 file=$3 smp=$4 args=$5 qp=$6 to=$7 log status
    log="$logs/$name.$engine.log"
    local -a cmd
    case "$engine" in
        tcg|qkvm)
            local accel=tcg
            [ "$engine" = qkvm ] && accel=kvm
            # shellcheck disable=SC2206
            cmd=("$qemu" --no-reboot -nodefaults -device pc-testdev
                -device isa-debug-exit,iobase=0xf4,iosize=0x4 -display none -serial stdio
                -device pci-testdev -machine accel=$accel -kernel "$kut/x86/$file"
                -smp "$smp" -append "$args" $qp)
            ;;
        emu|kvm)
            cmd=("$kvmbox" run --accel "$engine" --testdev --kernel "$kut/x86/$file"
                --cpus "$smp" --memory "$(mem_mib "$qp")" "--cmdline=$args")
            ;;
    esac
    set +e
    timeout -k 5 "$to" "${cmd[@]}" </dev/null >"$log" 2>&1
    status=$?
    set -e
    verdict "$status" "$log"
}

printf '%-28s %-22s %-22s %-22s %-22s\n' "test" "QEMU TCG" "kvmbox emu" "kvmbox kvm" "QEMU kvm"
parse_cfg | while IFS='|' read -r name file smp args qp arch to acc grp chk; do
    if [ $# -gt 0 ]; then
        wanted=0
        for t in "$@"; do [ "$t" = "$name" ] && wanted=1; done
        [ $wanted = 1 ] || continue
    else
        # What run_tests.sh runs by default on x86_64.
        [ "$arch" = "i386" ] && continue
        [[ " $grp " == *" nodefault "* ]] && continue
    fi
    [ -f "$kut/x86/$file" ] || continue
    # run_tests.sh evaluates test_args in the shell (kvmclock_test passes `date +%s`).
    args=$(eval "echo $args")
    to=${to:-90}
    to=${to%s}
    [ -n "$timeout_override" ] && to=$timeout_override
    skip_reason=""
    for c in $chk; do
        path=${c%%=*}
        want=${c#*=}
        if [ ! -r "$path" ] || [ "$(cat "$path")" != "$want" ]; then
            skip_reason="SKIP(check)"
        fi
    done
    # A device the test asks QEMU for (qemu_params' -device) that kvmbox does not have: the test
    # cannot find out by itself (intel_iommu reads VT-d registers at a fixed address), so it is
    # skipped on kvmbox with the device named, as run_tests.sh skips what a host lacks.
    no_device=""
    for d in $(grep -o -- '-device [^ ,]*' <<<"$qp" | cut -d' ' -f2); do
        case "$d" in
            pc-testdev|isa-debug-exit) ;;
            *) no_device="SKIP(no $d)"; break ;;
        esac
    done
    cells=()
    for engine in tcg emu kvm qkvm; do
        if ! has "$engine"; then
            cells+=("-")
        elif [ -n "$skip_reason" ]; then
            cells+=("$skip_reason")
        elif [ -n "$no_device" ] && [ "$engine" != "tcg" ] && [ "$engine" != "qkvm" ]; then
            cells+=("$no_device")
        elif [ "$acc" = "kvm" ] && [ "$engine" != "kvm" ] && [ "$engine" != "qkvm" ]; then
            cells+=("SKIP(kvm only)")
        else
            t=$to
            [[ "$engine" == *kvm ]] && [ -n "$kvm_timeout" ] && t=$kvm_timeout
            cells+=("$(run_one "$engine" "$name" "$file" "$smp" "$args" "$qp" "$t")")
        fi
    done
    printf '%-28s %-22s %-22s %-22s %-22s\n' "$name" "${cells[0]}" "${cells[1]}" "${cells[2]}" \
        "${cells[3]}"
done
echo "(counts: tests/unexpected failures/skipped from the test's SUMMARY line; logs in $logs)"
