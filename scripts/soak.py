#!/usr/bin/env python3
"""Soak: many kvmbox VMs started together and kept busy with disk and network I/O.

By default 20 test-guest VMs on KVM and 4 Linux VMs (Debian's cloud kernel + the busybox kit)
on the software engine, for 10 minutes. Each VM gets its own raw disk and a TAP device in a
network namespace of its own (kvmbox-fuzzsoak-<pid>-<n>, host end 10.0.0.1/24, deleted
afterwards), and kvmbox runs inside that namespace.

- Test guests run `soak:SECONDS` (guest/testguest/records.c): rounds of 4 MiB of checksummed
  records written, flushed, read back and verified on the disk, then 8 ARP requests to the host
  end. Their final line names the stream the disk holds; the script verifies every record.
- Linux guests loop: 1 MiB of random data written to /dev/vda with fsync, caches dropped, read
  back and compared, then 5 pings to the host end; they print the md5 of the last data, which
  the script compares with the image.

Every 5 s the script samples each kvmbox process: RSS, open file descriptors (/proc/PID/fd)
and threads (/proc/PID/task). It fails a VM that exits badly, reports an error, fails its data
check, exceeds the RSS bound (guest RAM + --rss-overhead-mib), keeps growing (RSS in the last
third of its samples above the peak of the first two thirds by more than --rss-growth-mib), or
has more descriptors or threads in every sample of the last third of its run than in any
sample of the first third (a device may hold one transiently while the guest restarts it).

Usage: sudo scripts/soak.py [--minutes 10] [--testguests 20] [--linux 4] [--json]
Exit status: 0 when every VM passed, 1 when one failed, 2 on bad usage or missing pieces.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from kvmbox_records import REC, check_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAP = "kbsoak0"
SAMPLE_S = 5
LINUX_MIB = 1

LINUX_SCRIPT = """ip link set lo up; ip link set eth0 up; ip addr add 10.0.0.2/24 dev eth0
end=$(( $(cut -d. -f1 /proc/uptime) + {secs} )); r=0; bad=0; pf=0; sum=none
while [ $(cut -d. -f1 /proc/uptime) -lt $end ]; do
 head -c {bytes} /dev/urandom >/tmp/d
 dd if=/tmp/d of=/dev/vda bs=64k conv=fsync 2>/dev/null || bad=$((bad+1))
 echo 3 >/proc/sys/vm/drop_caches
 sum=$(md5sum </tmp/d); back=$(head -c {bytes} /dev/vda | md5sum)
 [ "$sum" = "$back" ] || bad=$((bad+1))
 ping -q -c 5 -W 2 10.0.0.1 >/dev/null || pf=$((pf+1))
 r=$((r+1))
done
echo "KVMBOX-LINUX soak rounds=$r bad=$bad ping_failures=$pf md5=${{sum%% *}}"
"""


def kit_cmd(text):
    """`text` as the Linux kit's kvmbox.cmd= value (see guest/linux/init)."""
    out = "kvmbox.cmd="
    for ch in text:
        out += f"%{ord(ch):02X}" if ch in ' %"\n\t\\' else ch
    return out


def sh(*cmd):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def last_path(cmd):
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return out.strip().splitlines()[-1]


def sample(pid):
    """(rss_kib, fds, threads) of a live process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return rss, len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))
    except (OSError, StopIteration):
        return None


class Vm:
    def __init__(self, kind, index, ns, disk, log, cmd, mem_mib, ready):
        self.kind, self.index, self.ns, self.disk = kind, index, ns, disk
        self.name = f"{kind}{index}"
        self.log, self.mem_mib, self.ready = log, mem_mib, ready
        self.out = open(log, "wb")
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns] + cmd, stdin=subprocess.DEVNULL,
                                     stdout=self.out, stderr=subprocess.STDOUT)
        self.started = time.monotonic()
        self.samples = []  # (seconds since start, rss_kib, fds, threads, warmed_up)
        self.warm_at = None

    def console(self):
        with open(self.log, "rb") as f:
            return f.read().decode(errors="replace")

    def poll(self):
        if self.proc.poll() is not None:
            return
        s = sample(self.proc.pid)
        if s is None:
            return
        now = time.monotonic() - self.started
        if self.warm_at is None and self.ready in self.console():
            self.warm_at = now + 10  # first sample 10 s after the guest said it is running
        warm = self.warm_at is not None and now >= self.warm_at
        self.samples.append((round(now, 1), *s, warm))


def ns_create(name):
    sh("ip", "netns", "add", name)
    for cmd in (["ip", "tuntap", "add", "dev", TAP, "mode", "tap"],
                ["ip", "addr", "add", "10.0.0.1/24", "dev", TAP],
                ["ip", "link", "set", TAP, "up"], ["ip", "link", "set", "lo", "up"]):
        sh("ip", "netns", "exec", name, *cmd)


def judge(vm, args):
    """What is wrong with `vm` after it exited (a list; empty when it passed)."""
    problems = []
    console = vm.console()
    code = vm.proc.returncode
    if vm.kind == "tg":
        if code != 1:
            problems.append(f"exit status {code} (1 = the guest passed)")
        m = re.search(r"KVMBOX-TEST soak serial=(\S+) rounds=(\d+) stream=0x([0-9a-f]+) "
                      r"sectors=(\d+) blk_errors=(\d+) bad_records=(\d+) net_failures=(\d+)",
                      console)
        if not m:
            problems.append("no soak result line")
        else:
            vm.rounds = int(m.group(2))
            if any(int(m.group(i)) for i in (5, 6, 7)):
                problems.append(f"guest reported {m.group(0)}")
            sectors, stream = int(m.group(4)), int(m.group(3), 16)
            with open(vm.disk, "rb") as f:
                bad = check_records(f.read(sectors * REC), sectors, stream)
            if bad:
                problems.append(f"disk: {bad}")
            vm.verified = f"{sectors} records of stream {stream:#x}"
    else:
        if code != 0:
            problems.append(f"exit status {code} (0 = powered off)")
        m = re.search(r"KVMBOX-LINUX soak rounds=(\d+) bad=(\d+) ping_failures=(\d+) md5=(\S+)",
                      console)
        if not m:
            problems.append("no soak result line")
            panic = re.search(r"Kernel panic[^\r\n]*", console)
            if panic:
                problems.append(panic.group(0))
        else:
            vm.rounds = int(m.group(1))
            if int(m.group(2)) or int(m.group(3)):
                problems.append(f"guest reported {m.group(0)}")
            with open(vm.disk, "rb") as f:
                got = hashlib.md5(f.read(LINUX_MIB << 20)).hexdigest()
            if got != m.group(4):
                problems.append(f"disk md5 {got}, guest wrote {m.group(4)}")
            vm.verified = f"first {LINUX_MIB} MiB md5 {got}"
    warm = [s for s in vm.samples if s[4]]
    if len(warm) < 3:
        problems.append(f"only {len(warm)} samples after warm-up")
        return problems
    first, last = warm[0], warm[-1]
    peak = max(s[1] for s in warm)
    head = warm[: 2 * len(warm) // 3]
    tail = warm[2 * len(warm) // 3:]
    vm.figures = {
        "rss_mib_first": round(first[1] / 1024, 1), "rss_mib_last": round(last[1] / 1024, 1),
        "rss_mib_peak": round(peak / 1024, 1), "fds": [first[2], last[2]],
        "fds_range": [min(s[2] for s in warm), max(s[2] for s in warm)],
        "threads": [first[3], last[3]], "samples": len(warm),
    }
    if peak > (vm.mem_mib + args.rss_overhead_mib) * 1024:
        problems.append(f"RSS peak {peak // 1024} MiB above {vm.mem_mib} MiB of guest RAM + "
                        f"{args.rss_overhead_mib} MiB")
    grow = max(s[1] for s in tail) - max(s[1] for s in head)
    if grow > args.rss_growth_mib * 1024:
        problems.append(f"RSS still growing: last third peaks {grow // 1024} MiB above the rest")
    # Devices open descriptors and threads while the guest (re)starts them, so one sample can
    # catch a transient one: a leak is the floor of the last third above the first third's top.
    third = warm[: max(1, len(warm) // 3)]
    for i, what in ((2, "file descriptors"), (3, "threads")):
        if min(s[i] for s in tail) > max(s[i] for s in third):
            problems.append(f"{what} grew: {[s[i] for s in third]} ... {[s[i] for s in tail]}")
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--testguests", type=int, default=20, help="test-guest VMs on KVM")
    ap.add_argument("--linux", type=int, default=4, help="Linux VMs on the software engine")
    ap.add_argument("--kvmbox", default=os.path.join(REPO, "target/x86_64-unknown-linux-gnu/release/kvmbox"))
    ap.add_argument("--rss-overhead-mib", type=int, default=64,
                    help="RSS bound above guest RAM, per VM")
    ap.add_argument("--rss-growth-mib", type=int, default=8,
                    help="how far the last third of a VM's RSS samples may peak above the rest")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        ap.error("needs root (network namespaces and TAP devices)")
    if not os.path.exists(args.kvmbox):
        ap.error(f"{args.kvmbox} does not exist (cargo build --release -p kvmbox)")
    secs = int(args.minutes * 60)
    guest = last_path(["sh", os.path.join(REPO, "guest/testguest/build.sh"),
                       os.path.join(REPO, "target/guest")])
    kernel = initrd = None
    if args.linux:
        kernel = last_path(["sh", os.path.join(REPO, "guest/linux/fetch-kernel.sh")])
        initrd = last_path(["sh", os.path.join(REPO, "guest/linux/build-initramfs.sh")])
    workdir = args.workdir or tempfile.mkdtemp(prefix="kvmbox-soak-")
    os.makedirs(workdir, exist_ok=True)
    load0 = os.getloadavg()
    load_peak = load0[0]
    print(f"soak: {args.testguests} test guests on KVM + {args.linux} Linux guests on the "
          f"engine, {secs} s of I/O each, in {workdir}; load average {load0[0]:.2f} "
          f"{load0[1]:.2f} {load0[2]:.2f} on {os.cpu_count()} CPUs", flush=True)
    namespaces, vms = [], []
    start = time.monotonic()
    try:
        for kind, count in (("tg", args.testguests), ("linux", args.linux)):
            for i in range(count):
                ns = f"kvmbox-fuzzsoak-{os.getpid()}-{kind}{i}"
                ns_create(ns)
                namespaces.append(ns)
                disk = os.path.join(workdir, f"{kind}{i}.raw")
                with open(disk, "wb") as f:
                    f.truncate(8 << 20)
                net = ["--net", f"tap={TAP}"]
                if kind == "tg":
                    cmd = [args.kvmbox, "run", "--accel", "kvm", "--kernel", guest, "--memory",
                           "64M", "--cmdline", f"tests=soak:{secs}",
                           "--disk", f"{disk},serial=soak-{kind}{i}"] + net
                    vms.append(Vm(kind, i, ns, disk, disk + ".log", cmd, 64, "net mac="))
                else:
                    script = LINUX_SCRIPT.format(secs=secs, bytes=LINUX_MIB << 20)
                    cmd = [args.kvmbox, "run", "--accel", "emu", "--kernel", kernel, "--initrd",
                           initrd, "--memory", "256M", "--cmdline",
                           "console=ttyS0 reboot=k panic=-1 cryptomgr.notests " + kit_cmd(script),
                           "--disk", disk] + net
                    vms.append(Vm(kind, i, ns, disk, disk + ".log", cmd, 256,
                                  "KVMBOX-LINUX userspace-ready"))
        # Linux boots take minutes on the engine under load: allow 15 minutes beyond the soak.
        deadline = start + secs + 900
        while any(vm.proc.poll() is None for vm in vms):
            load_peak = max(load_peak, os.getloadavg()[0])
            if time.monotonic() > deadline:
                for vm in vms:
                    if vm.proc.poll() is None:
                        vm.proc.kill()
                        vm.killed = True
                break
            for vm in vms:
                vm.poll()
            time.sleep(SAMPLE_S)
    finally:
        for vm in vms:
            if vm.proc.poll() is None:
                vm.proc.kill()
            vm.proc.wait()
            vm.out.close()
        for ns in namespaces:
            subprocess.run(["ip", "netns", "del", ns])
    elapsed = time.monotonic() - start
    load1 = os.getloadavg()
    failed = 0
    report = []
    for vm in vms:
        problems = judge(vm, args)
        if getattr(vm, "killed", False):
            problems.insert(0, "still running at the deadline")
        failed += bool(problems)
        f = getattr(vm, "figures", {})
        line = (f"{vm.name:8} rounds {getattr(vm, 'rounds', '-'):>5}  RSS MiB "
                f"{f.get('rss_mib_first', '-')} -> {f.get('rss_mib_last', '-')} "
                f"(peak {f.get('rss_mib_peak', '-')})  fds {f.get('fds', '-')} range {f.get('fds_range', '-')}  threads "
                f"{f.get('threads', '-')}  data: {getattr(vm, 'verified', '-')}: "
                + ("ok" if not problems else "FAIL " + "; ".join(problems)))
        print(line)
        report.append({"vm": vm.name, "rounds": getattr(vm, "rounds", None), **f,
                       "problems": problems})
    print(f"total: {len(vms)} VMs, {failed} failed, {elapsed:.0f} s; load average peak "
          f"{load_peak:.2f}, at the end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    if args.json:
        print(json.dumps({"vms": report, "failed": failed, "seconds": round(elapsed),
                          "load_start": load0, "load_peak": load_peak, "load_end": load1}))
    if not failed and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
