#!/bin/sh
# Check the kit end to end under QEMU TCG (~30 s): for 1 and 2 vCPUs, kvmbox.run=info reports the
# CPU count, a MemTotal that fits -m, all virtio modules loaded and virtio-rng-pci bound as the
# hw_random source; kvmbox.run=poweroff, reboot and panic (panic=-1) end QEMU; kvmbox.cmd runs a
# %XX-encoded command and reports its exit status; a bad kvmbox.run name gives status 127.
# Prints one line per check; exit status 0 only if every check passed.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
KERNEL=$(sh "$HERE/fetch-kernel.sh" | tail -n 1)
INITRD=$(sh "$HERE/build-initramfs.sh" | tail -n 1)
LOG=$(mktemp /tmp/kvmbox-test-tcg.XXXXXX)
trap 'rm -f "$LOG"' EXIT
FAILED=0

boot() { # boot <qemu-tcg.sh args...>: console (\r stripped) in $LOG, QEMU's status in $RC
    {
        st=0
        timeout 120 sh "$HERE/qemu-tcg.sh" -k "$KERNEL" -i "$INITRD" "$@" </dev/null 2>&1 || st=$?
        echo "QEMU-STATUS $st"
    } | tr -d '\r' >"$LOG"
    RC=$(sed -n 's/^QEMU-STATUS //p' "$LOG") # 124: timed out, the guest never ended QEMU
}
check() { # check <description> <shell condition>
    if eval "$2"; then
        echo "ok   $1"
    else
        echo "FAIL $1"
        sed 's/^/     | /' "$LOG" | grep -a 'KVMBOX\|kvmbox-init\|panic\|error' | head -n 20
        FAILED=1
    fi
}
field() { sed -n "s/.*KVMBOX-LINUX info .*$1=\([^ ]*\).*/\1/p" "$LOG" | head -n 1; }

for cpus in 1 2; do
    boot -c "$cpus" -m 512M -a kvmbox.run=info -- -device virtio-rng-pci
    check "$cpus vCPU: userspace-ready marker" "grep -aq '^KVMBOX-LINUX userspace-ready uptime=[0-9]' \"\$LOG\""
    check "$cpus vCPU: cpus=$cpus" "[ \"\$(field cpus)\" = $cpus ]"
    mem=$(field memtotal_kb)
    check "$cpus vCPU: memtotal_kb=$mem within 400000..524288 for -m 512M" \
        "[ -n \"$mem\" ] && [ \"$mem\" -gt 400000 ] && [ \"$mem\" -le 524288 ]"
    mods=$(field modules)
    missing=
    for m in virtio virtio_ring virtio_pci virtio_blk virtio_net virtio_console virtio_rng vmw_vsock_virtio_transport; do
        case ",$mods," in *",$m,"*) ;; *) missing="$missing $m" ;; esac
    done
    check "$cpus vCPU: virtio modules loaded (missing:${missing:- none})" "[ -z \"$missing\" ]"
    check "$cpus vCPU: virtio-rng bound (virtio_devices=$(field virtio_devices), hwrng=$(field hwrng))" \
        "[ \"\$(field hwrng)\" = virtio_rng.0 ]"
    check "$cpus vCPU: no insmod warnings" "! grep -aq 'kvmbox-init: warning' \"\$LOG\""
    check "$cpus vCPU: cmd-exit=0 and power-off" "grep -aqx 'KVMBOX-LINUX cmd-exit=0' \"\$LOG\" && [ $RC -eq 0 ]"
done

for what in poweroff reboot panic; do
    boot -a "kvmbox.run=$what"
    check "kvmbox.run=$what ends QEMU" "grep -aq 'KVMBOX-LINUX $what-requested' \"\$LOG\" && [ $RC -eq 0 ]"
done

boot -a 'kvmbox.cmd=echo%20"x%20y%25"%3Bexit%207'
check "kvmbox.cmd decodes %XX and reports the status" \
    "grep -aqx 'x y%' \"\$LOG\" && grep -aqx 'KVMBOX-LINUX cmd-exit=7' \"\$LOG\""
boot -a 'kvmbox.run=../init'
check "kvmbox.run=../init is refused with status 127" "grep -aqx 'KVMBOX-LINUX cmd-exit=127' \"\$LOG\""

[ "$FAILED" -eq 0 ] && echo "test-tcg: all checks passed" || echo "test-tcg: FAILED"
exit "$FAILED"
