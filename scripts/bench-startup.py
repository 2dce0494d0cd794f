#!/usr/bin/env python3
"""Benchmark kvmbox start-up and memory overhead with the freestanding test guest on KVM.

Measures, over N runs:
  - process start -> first byte on the guest's serial console,
  - process start -> kvmbox exit (guest ran `hello` and exited through the debug port),
  - VMM resident memory beyond the guest RAM the guest touched: the guest runs a long compute
    loop while this script reads /proc/PID/smaps; RSS of the guest-RAM mapping is subtracted.
Usage: scripts/bench-startup.py [--runs N] [--kvmbox PATH]
"""
import argparse, os, statistics, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_once(kvmbox, guest, memory):
    t0 = time.perf_counter()
    p = subprocess.Popen([kvmbox, "run", "--accel", "kvm", "--kernel", guest, "--memory", memory,
                          "--cmdline", "tests=hello"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = p.stdout.read(1)
    t_first = time.perf_counter() - t0
    rest = p.stdout.read()
    status = p.wait()
    t_exit = time.perf_counter() - t0
    if not first or status != 1 or b"result=ok" not in first + rest:
        sys.exit(f"guest run failed: status {status}: {(first + rest)[:400]!r} {p.stderr.read()[:400]!r}")
    return t_first, t_exit


def memory_overhead(kvmbox, guest, memory_mib, extra=()):
    p = subprocess.Popen([kvmbox, "run", "--accel", "kvm", "--kernel", guest, "--memory", f"{memory_mib}M",
                          "--cmdline", "tests=compute:20000000000", *extra], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        guest_rss = other_rss = 0
        size_kib = memory_mib * 1024
        cur_is_guest = False
        with open(f"/proc/{p.pid}/smaps") as f:
            for line in f:
                parts = line.split()
                if "-" in parts[0] and len(parts) >= 5 and ":" not in parts[0]:
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    # Guest RAM below the 32-bit hole is one anonymous mapping of the whole size
                    # (the kernel may merge a small neighbouring anonymous mapping into it).
                    cur_is_guest = len(parts) == 5 and size_kib <= (hi - lo) // 1024 <= size_kib + 4096
                elif parts[0] == "Rss:":
                    if cur_is_guest:
                        guest_rss += int(parts[1])
                    else:
                        other_rss += int(parts[1])
        return guest_rss, other_rss
    finally:
        p.kill()
        p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--kvmbox", default=os.path.join(ROOT, "target/release/kvmbox"))
    a = ap.parse_args()
    guest = os.path.join(ROOT, "target/guest/testguest.elf")
    subprocess.run(["bash", os.path.join(ROOT, "guest/testguest/build.sh")], check=True, stdout=subprocess.DEVNULL)
    run_once(a.kvmbox, guest, "128M")  # warm the page cache
    firsts, exits = [], []
    for _ in range(a.runs):
        f, e = run_once(a.kvmbox, guest, "128M")
        firsts.append(f * 1000)
        exits.append(e * 1000)
    g, o = memory_overhead(a.kvmbox, guest, 128)
    print(f"runs: {a.runs} (128 MiB guest, 1 vCPU, --accel kvm, test guest 'hello')")
    print(f"start -> first serial byte: median {statistics.median(firsts):.1f} ms, min {min(firsts):.1f}, max {max(firsts):.1f}")
    print(f"start -> exit:              median {statistics.median(exits):.1f} ms, min {min(exits):.1f}, max {max(exits):.1f}")
    print(f"resident memory while the guest runs: guest RAM touched {g / 1024:.1f} MiB, VMM beyond it {o / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
