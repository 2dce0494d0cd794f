#!/usr/bin/env python3
"""Boot Debian's cloud kernel with the busybox kit on kvmbox's software engine and on QEMU TCG
(the same kernel, initramfs and command line), N runs each, wall time from process start to the
`KVMBOX-LINUX userspace-ready` line; print each run, the medians and the ratio.
Usage: scripts/bench-linux.py [--runs 5] [--cpus 1] [--kvmbox target/x86_64-unknown-linux-gnu/release/kvmbox]
"""
import argparse, os, statistics, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = b"KVMBOX-LINUX userspace-ready"
CMDLINE = "console=ttyS0 reboot=k panic=-1 cryptomgr.notests kvmbox.run=poweroff"


def script_output(path):
    out = subprocess.run(["bash", os.path.join(ROOT, path)], check=True, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL).stdout
    return out.decode().strip().splitlines()[-1]


def time_to_marker(argv, timeout=900):
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    buf = b""
    try:
        while True:
            chunk = p.stdout.read1(4096) if hasattr(p.stdout, "read1") else p.stdout.read(1)
            if not chunk:
                sys.exit(f"{argv[0]} ended before the marker: {buf[-600:]!r}")
            buf += chunk
            if MARKER in buf:
                return time.perf_counter() - t0
            if time.perf_counter() - t0 > timeout:
                sys.exit(f"{argv[0]}: no marker within {timeout} s")
    finally:
        p.kill()
        p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--kvmbox", default=os.path.join(ROOT, "target/x86_64-unknown-linux-gnu/release/kvmbox"))
    a = ap.parse_args()
    kernel = script_output("guest/linux/fetch-kernel.sh")
    initrd = script_output("guest/linux/build-initramfs.sh")
    kvmbox = [a.kvmbox, "run", "--accel", "emu", "--kernel", kernel, "--initrd", initrd,
              "--memory", "512M", "--cpus", str(a.cpus), "--cmdline", CMDLINE]
    qemu = ["qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-m", "512M", "-smp", str(a.cpus),
            "-nographic", "-nodefaults", "-serial", "stdio", "-no-reboot",
            "-kernel", kernel, "-initrd", initrd, "-append", CMDLINE]
    results = {}
    for name, argv in (("kvmbox --accel emu", kvmbox), ("qemu -accel tcg", qemu)):
        times = [time_to_marker(argv) for _ in range(a.runs)]
        results[name] = times
        print(f"{name:20s} runs: {', '.join(f'{t:.2f}' for t in times)} s; median {statistics.median(times):.2f} s",
              flush=True)
    k, q = (statistics.median(v) for v in results.values())
    print(f"ratio kvmbox/qemu (median): {k / q:.2f}x  ({a.cpus} vCPU, 512 MiB, {os.cpu_count()} host cores)")


if __name__ == "__main__":
    main()
