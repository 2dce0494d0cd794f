#!/usr/bin/env python3
"""Start-up, teardown, memory and exit costs of kvmbox on KVM, beside Firecracker and Cloud
Hypervisor when their binaries are found, with the freestanding test guest (ELF64, PVH entry).

For each machine shape (1 vCPU/128 MiB, 2 and 4 vCPUs/128 MiB, 1 vCPU/2 GiB) it runs every VMM
in turn, round after round (so host load falls on all of them alike), and reports per VMM:
  - process start -> first byte on the guest's serial console,
  - process start -> process exit: the guest prints `hello` and ends the VM the way each VMM
    supports (kvmbox: ACPI S5 power-off through the FADT's PM1a control register; Firecracker,
    which has no ACPI PM block: an i8042 reset, on which it exits; Cloud Hypervisor, whose
    hardware-reduced FADT has no PM1a block and which restarts on resets: to the guest's
    `hello` line, then killed, so its figure leaves out its teardown),
  - process start -> every process it started gone: kvmbox leaves the kernel's teardown of the
    VM to a child that outlives it (README, "Exit status"); this script is a child subreaper,
    so that child comes back to it and is waited for too. For the peers it equals the exit,
medians, and the ratios kvmbox / peer. Then, per VMM:
  - resident memory beyond guest RAM: the guest runs a long ring-3 loop while /proc/PID/smaps
    is read; the RSS of the guest-RAM mapping (the anonymous mapping of the guest's size) is
    subtracted; medians of 5 alternating runs, with the private (anonymous) part beside it,

  - `--accel auto`: start -> exit with the probe's answer kept for the boot and without,
  - exit round trips: the guest times N ring-0 reads of an unclaimed port (0xed) and N MMIO
    reads at an unclaimed address (0xdf000000); cycles per access are converted with the
    host's TSC rate (/proc/cpuinfo "cpu MHz", which is the TSC rate where the CPU has
    constant_tsc/tsc_known_freq); medians of --exit-runs runs per VMM, alternating.

Peer binaries are not part of kvmbox: build them yourself from their public sources and point
the script at them with KVMBOX_FIRECRACKER=/path/to/firecracker and
KVMBOX_CLOUD_HYPERVISOR=/path/to/cloud-hypervisor (default: ~/.cache/kvmbox-peers/bin/firecracker
and ~/.cache/kvmbox-peers/bin/cloud-hypervisor). A missing peer is reported and skipped.

Usage: scripts/bench-startup.py [--runs N] [--kvmbox PATH] [--baseline OLD_KVMBOX]
       [--shapes 1x128,2x128,4x128,1x2048] [--exit-count N] [--exit-runs N]
"""
import argparse, ctypes, json, os, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.expanduser("~/.cache/kvmbox-peers/bin")


class Vmm:
    """How to start one VMM on the test guest and tell that the guest ran."""

    def __init__(self, name, binary):
        self.name, self.binary = name, binary
        self.tmp = tempfile.mkdtemp(prefix=f"kvmbox-bench-{name}-")

    def command(self, guest, cpus, mem_mib, tests):
        end = "reboot:i8042" if self.name == "firecracker" else "poweroff"
        cmdline = f"tests={tests},{end}" if tests else f"tests={end}"
        if self.name.startswith("kvmbox"):
            return [self.binary, "run", "--accel", "kvm", "--kernel", guest, "--cpus", str(cpus),
                    "--memory", f"{mem_mib}M", "--cmdline", cmdline]
        if self.name == "firecracker":
            cfg = os.path.join(self.tmp, f"vm-{cpus}-{mem_mib}-{abs(hash(cmdline))}.json")
            with open(cfg, "w") as f:
                json.dump({"boot-source": {"kernel_image_path": guest, "boot_args": cmdline},
                           "drives": [],
                           "machine-config": {"vcpu_count": cpus, "mem_size_mib": mem_mib}}, f)
            return [self.binary, "--no-api", "--config-file", cfg, "--level", "Error"]
        return [self.binary, "--kernel", guest, "--cmdline", cmdline, "--cpus", f"boot={cpus}",
                "--memory", f"size={mem_mib}M", "--serial", "tty", "--console", "off"]


def run_once(vmm, guest, cpus, mem_mib, tests="hello", check=True):
    t0 = time.perf_counter()
    p = subprocess.Popen(vmm.command(guest, cpus, mem_mib, tests), stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = p.stdout.read(1)
    t_first = time.perf_counter() - t0
    if vmm.name == "cloud-hypervisor" and tests == "hello":
        # The test guest finds no PM1a control register in Cloud Hypervisor's FADT (hardware-
        # reduced ACPI) and CH restarts on resets: time it to the guest's `hello` line instead.
        rest = b""
        while b"KVMBOX-TEST hello" not in first + rest:
            line = p.stdout.readline()
            if not line:
                break
            rest += line
        t_exit = time.perf_counter() - t0
        p.kill()
        p.wait()
        run_once.gone = t_exit * 1000
        return t_first * 1000, t_exit * 1000, (first + rest).decode(errors="replace")
    rest = p.stdout.read()
    status = p.wait()
    t_exit = time.perf_counter() - t0
    reap_orphans()
    t_gone = time.perf_counter() - t0
    out = (first + rest).decode(errors="replace")
    if check and (status != 0 or "KVMBOX-TEST" not in out or "result=fail" in out):
        sys.exit(f"{vmm.name}: guest run failed: status {status}: {out[:600]!r} "
                 f"{p.stderr.read()[:600]!r}")
    run_once.gone = t_gone * 1000
    return t_first * 1000, t_exit * 1000, out


def become_subreaper():
    """Orphans of the VMMs (kvmbox's teardown child) are reparented to this script."""
    PR_SET_CHILD_SUBREAPER = 36
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit("cannot become a child subreaper (prctl PR_SET_CHILD_SUBREAPER)")


def reap_orphans():
    """Wait for every remaining child (the Popen ones are waited for already)."""
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def rss_beyond_guest(vmm, guest, mem_mib):
    p = subprocess.Popen(vmm.command(guest, 1, mem_mib, "compute:20000000000"),
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        guest_rss = other_rss = other_anon = 0
        size_kib = mem_mib * 1024
        cur_is_guest = False
        with open(f"/proc/{p.pid}/smaps") as f:
            for line in f:
                parts = line.split()
                if "-" in parts[0] and len(parts) >= 5 and ":" not in parts[0]:
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    # Guest RAM below the 32-bit hole is one mapping of the whole size (the
                    # kernel may merge a small neighbouring anonymous mapping into it).
                    cur_is_guest = size_kib <= (hi - lo) // 1024 <= size_kib + 4096
                elif parts[0] == "Rss:":
                    if cur_is_guest:
                        guest_rss += int(parts[1])
                    else:
                        other_rss += int(parts[1])
                elif parts[0] == "Anonymous:" and not cur_is_guest:
                    other_anon += int(parts[1])
        return guest_rss / 1024, other_rss / 1024, other_anon / 1024
    finally:
        p.kill()
        p.wait()


def tsc_mhz():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1])
    return None


def exit_costs(vmm, guest, n):
    # An unclaimed MMIO read may return other than all ones on a peer (the scenario then
    # counts "bad" reads and fails); its timing still holds.
    _, _, out = run_once(vmm, guest, 1, 128, f"pio:{n},mmio:{n}", check=False)
    res = {}
    for line in out.splitlines():
        w = line.split()
        if len(w) > 2 and w[0] == "KVMBOX-TEST" and w[1] in ("pio", "mmio"):
            kv = dict(x.split("=", 1) for x in w[2:] if "=" in x)
            res[w[1]] = int(kv["cycles"]) / int(kv["count"])
    return res


def accel_probe_cost(kvmbox, guest, runs):
    """Start -> exit of `--accel auto` with the probe cache off and on (alternating)."""
    cmd = [kvmbox, "run", "--accel", "auto", "--kernel", guest, "--memory", "128M",
           "--cmdline", "tests=poweroff"]
    times = {"off": [], "on": []}
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fill the cache
    for _ in range(runs):
        for mode in ("off", "on"):
            env = dict(os.environ)
            if mode == "off":
                env["KVMBOX_ACCEL_CACHE"] = "off"
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[mode].append((time.perf_counter() - t0) * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


def find_peers():
    found, missing = [], []
    for name, env in (("firecracker", "KVMBOX_FIRECRACKER"),
                      ("cloud-hypervisor", "KVMBOX_CLOUD_HYPERVISOR")):
        path = os.environ.get(env) or os.path.join(PEERS, name)
        if os.access(path, os.X_OK):
            found.append(Vmm(name, path))
        else:
            missing.append(f"{name}: not found at {path} (set {env})")
    return found, missing


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--kvmbox", default=os.path.join(ROOT, "target/x86_64-unknown-linux-gnu/release/kvmbox"))
    ap.add_argument("--shapes", default="1x128,2x128,4x128,1x2048",
                    help="comma-separated VCPUSxMIB machine shapes")
    ap.add_argument("--exit-count", type=int, default=20000)
    ap.add_argument("--exit-runs", type=int, default=5,
                    help="alternating runs of the exit round-trip guest per VMM")
    ap.add_argument("--baseline", help="another kvmbox binary to run alongside (an older build)")
    a = ap.parse_args()
    become_subreaper()
    guest = os.path.join(ROOT, "target/guest/testguest.elf")
    subprocess.run(["bash", os.path.join(ROOT, "guest/testguest/build.sh")], check=True,
                   stdout=subprocess.DEVNULL)
    peers, missing = find_peers()
    for m in missing:
        print(f"MISSING PEER: {m}; measuring without it")
    if a.baseline:
        peers.insert(0, Vmm("kvmbox-baseline", a.baseline))
    vmms = [Vmm("kvmbox", a.kvmbox)] + peers
    for v in vmms:
        run_once(v, guest, 1, 128)  # warm the page cache
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"load average at start: {os.getloadavg()[0]:.1f}, runs per VMM and shape: {a.runs}")
    for shape in a.shapes.split(","):
        cpus, mem = (int(x) for x in shape.split("x"))
        firsts = {v.name: [] for v in vmms}
        exits = {v.name: [] for v in vmms}
        gones = {v.name: [] for v in vmms}
        for _ in range(a.runs):
            for v in vmms:
                f, e, _ = run_once(v, guest, cpus, mem)
                firsts[v.name].append(f)
                exits[v.name].append(e)
                gones[v.name].append(run_once.gone)
        print(f"\n{cpus} vCPU, {mem} MiB: start -> first serial byte / start -> exit / "
              f"start -> all its processes gone (ms), load average now {os.getloadavg()[0]:.1f}")
        med = {n: statistics.median(x) for n, x in exits.items()}
        gone = {n: statistics.median(x) for n, x in gones.items()}
        for v in vmms:
            e = exits[v.name]
            print(f"  {v.name:17} first byte median {statistics.median(firsts[v.name]):7.1f}   "
                  f"exit median {med[v.name]:7.1f}  min {min(e):7.1f}  max {max(e):7.1f}   "
                  f"all gone median {gone[v.name]:7.1f}")
        for v in peers:
            print(f"  kvmbox / {v.name}: {med['kvmbox'] / med[v.name]:.2f} "
                  f"(all gone: {gone['kvmbox'] / gone[v.name]:.2f})")
    rounds = 5
    print(f"\nresident memory while the guest runs (1 vCPU, 128 MiB; medians of {rounds} "
          "alternating runs; private: the anonymous part, which no other process shares):")
    rss = {v.name: [] for v in vmms}
    for _ in range(rounds):
        for v in vmms:
            rss[v.name].append(rss_beyond_guest(v, guest, 128))
    for v in vmms:
        g, o, p = (statistics.median(x[i] for x in rss[v.name]) for i in range(3))
        print(f"  {v.name:17} guest RAM touched {g:6.1f} MiB, VMM beyond it {o:6.2f} MiB "
              f"(min {min(x[1] for x in rss[v.name]):.2f}, max "
              f"{max(x[1] for x in rss[v.name]):.2f}), private {p:5.2f} MiB")
    probe = accel_probe_cost(a.kvmbox, guest, a.runs)
    print(f"\n--accel auto, start -> exit (guest powers off at once): probe every time "
          f"{probe['off']:.1f} ms, answer kept for this boot {probe['on']:.1f} ms (medians)")
    mhz = tsc_mhz()
    costs = {v.name: {"pio": [], "mmio": []} for v in vmms}
    for _ in range(a.exit_runs):
        for v in vmms:
            for k, c in exit_costs(v, guest, a.exit_count).items():
                costs[v.name][k].append(c)
    print(f"\nexit round trips ({a.exit_count} each, ring 0, TSC {mhz} MHz; medians of "
          f"{a.exit_runs} alternating runs, min-max):")
    for v in vmms:
        cells = [f"{k} {statistics.median(c):9.0f} cycles = {statistics.median(c) / mhz:6.2f} us "
                 f"({min(c) / mhz:.2f}-{max(c) / mhz:.2f})"
                 for k, c in costs[v.name].items() if c and mhz]
        print(f"  {v.name:17} " + "   ".join(cells))


if __name__ == "__main__":
    main()
