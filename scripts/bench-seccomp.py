#!/usr/bin/env python3
"""What kvmbox's seccomp filters cost on the exit path.

1. Port-I/O exit round trips on KVM: the test guest's `pio:N` (ring-0 `inb 0xed`, each one
   exit to kvmbox and back: one KVM_RUN, so one pass of the vCPU filter), kvmbox run with and
   without `--no-seccomp`, alternating run by run; median TSC cycles per round trip.
2. The filter alone: crates/seccomp/examples/filter-cost (ioctl(-1, KVM_RUN) with no filter
   and under the vCPU filter), alternating; median ns per call.

Usage: scripts/bench-seccomp.py [--runs N] [--exits N]
   (after `cargo build --release --workspace --examples` and the test guest build; needs /dev/kvm)
"""
import argparse, os, re, statistics, subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KVMBOX = os.path.join(ROOT, "target/x86_64-unknown-linux-gnu/release/kvmbox")
GUEST = os.path.join(ROOT, "target/guest/testguest.elf")
COST = os.path.join(ROOT, "target/x86_64-unknown-linux-gnu/release/examples/filter-cost")


def tsc_mhz():
    for line in open("/proc/cpuinfo"):
        if line.startswith("cpu MHz"):
            return float(line.split(":")[1])
    raise SystemExit("no cpu MHz in /proc/cpuinfo")


def pio_cycles(exits, seccomp):
    cmd = [KVMBOX, "run", "--accel", "kvm", "--kernel", GUEST, "--memory", "128M",
           "--cmdline", f"tests=pio:{exits}"] + ([] if seccomp else ["--no-seccomp"])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600).stdout
    m = re.search(r"KVMBOX-TEST pio count=(\d+) bad=0 cycles=(\d+)", out)
    if not m:
        raise SystemExit(f"no pio line from {cmd}: {out}")
    return int(m.group(2)) / int(m.group(1))


def filter_ns(mode):
    return float(subprocess.run([COST, mode], capture_output=True, text=True,
                                check=True).stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=11)
    ap.add_argument("--exits", type=int, default=20000)
    a = ap.parse_args()
    mhz = tsc_mhz()
    print(f"load before: {os.getloadavg()}")
    pio = {True: [], False: []}
    cost = {"none": [], "vcpu": []}
    for _ in range(a.runs):
        for on in (True, False):
            pio[on].append(pio_cycles(a.exits, on))
        for mode in ("none", "vcpu"):
            cost[mode].append(filter_ns(mode))
    for on in (True, False):
        c = statistics.median(pio[on])
        print(f"pio round trip, seccomp {'on ' if on else 'off'}: median {c:,.0f} cycles "
              f"= {c / mhz:.2f} us (min {min(pio[on]) / mhz:.2f}, max {max(pio[on]) / mhz:.2f})")
    for mode in ("none", "vcpu"):
        print(f"ioctl(-1, KVM_RUN), filter {mode}: median {statistics.median(cost[mode]):.0f} ns "
              f"(min {min(cost[mode]):.0f}, max {max(cost[mode]):.0f})")
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
