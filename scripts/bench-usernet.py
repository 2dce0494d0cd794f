#!/usr/bin/env python3
"""User-mode networking benchmark: passt under kvmbox against QEMU's libslirp and QEMU + passt.

The same guest (the test guest's `udpecho` scenario: 10.0.2.15 behind the NAT, answering every
UDP datagram to port 7 with its payload + ID; guest/testguest/README.md) runs on KVM under

  kvmbox       kvmbox run --accel kvm --net user,hostfwd=udp::P-:7      (passt, started by kvmbox)
  qemu-slirp   qemu-system-x86_64 -accel kvm -netdev user,hostfwd=udp:127.0.0.1:P-:7  (libslirp)
  qemu-passt   qemu-system-x86_64 -accel kvm -netdev stream to a passt this script starts with
               kvmbox's own passt options (isolates the NAT from the VMM)

with a virtio-net-pci (modern) device in each, and `host-echo` (`--vmms ...,host-echo`): a host
process answering the same way with no VM, the ceiling of this Python client. From the host,
per VMM and round:
  latency     N request/response round trips of 64-byte datagrams, one in flight
              (median, p99; a datagram unanswered within 1 s counts as lost)
  throughput  1400-byte datagrams with W outstanding for S seconds (answered datagrams/s and
              MB/s of payload one way; a window unanswered for 0.2 s is counted lost, refilled)
              and the CPU time of the network path per answered datagram: the VMM's threads
              other than its vCPUs (vmm_cpu_us; host-echo: the echo process) plus passt
              (passt_cpu_us), from /proc's tick counts
  flood       F datagrams of 1400 bytes sent back to back without waiting, then 1 s to drain:
              the share answered (what the NAT and the guest drop under a flood)
Rounds alternate the VMMs' order; the host's load average is printed around each run.
`--kill-helper` instead kills the passt of kvmbox and of qemu-passt under a running guest and
reports what the VMM does. Everything is on 127.0.0.1. Needs /dev/kvm, passt and, for the QEMU
runs, qemu-system-x86 (7.2 here); builds nothing: run `guest/testguest/build.sh` and
`cargo build --release` first.

    python3 scripts/bench-usernet.py [--rounds 3] [--rtt 10000] [--seconds 3] [--window 32]
"""
import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KVMBOX = os.path.join(ROOT, "target/x86_64-unknown-linux-gnu/release/kvmbox")
GUEST = os.path.join(ROOT, "target/guest/testguest.elf")
GUEST_MB = os.path.join(ROOT, "target/guest/testguest-multiboot.elf")
# kvmbox's passt options (crates/virtio/src/net/user.rs), less --fd.
PASST_ARGS = ["--foreground", "--quiet", "--ipv4-only", "--interface", "lo",
              "--address", "10.0.2.15", "--netmask", "24", "--gateway", "10.0.2.2",
              "--dns-forward", "10.0.2.3", "--mac-addr", "52:55:0a:00:02:02"]
QEMU = ["qemu-system-x86_64", "-accel", "kvm", "-M", "q35", "-cpu", "host,-arch-capabilities",
        "-m", "128M", "-nographic", "-no-reboot", "-kernel", GUEST_MB,
        "-name", "bench,debug-threads=on",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]
NIC = ["-device", "virtio-net-pci,netdev=n0,disable-legacy=on"]
ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
ident = sys.argv[2].encode()
print("udpecho: host process, gateway 10.0.2.2 at none", flush=True)
while True:
    d, a = s.recvfrom(65536)
    s.sendto(d + ident, a)
"""


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg():
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def children(pid, comm):
    """PIDs of pid's children whose command name starts with comm."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        name = st[st.find("(") + 1:st.rfind(")")]
        ppid = int(st[st.rfind(")") + 2:].split()[1])
        if ppid == pid and name.startswith(comm):
            out.append(int(d))
    return out


class Vm:
    """One VMM running the udpecho guest with host UDP port `port` forwarded to guest port 7."""

    def __init__(self, kind, port, ident):
        self.kind, self.port, self.passt, self.sock_dir = kind, port, None, None
        tests = f"tests=udpecho:{ident}"
        if kind == "kvmbox":
            cmd = [KVMBOX, "run", "--accel", "kvm", "--kernel", GUEST, "--cmdline", tests,
                   "--memory", "128M", "--net", f"user,hostfwd=udp::{port}-:7"]
        elif kind == "qemu-slirp":
            cmd = QEMU + ["-append", tests, "-netdev",
                          f"user,id=n0,hostfwd=udp:127.0.0.1:{port}-:7"] + NIC
        elif kind == "host-echo":
            # No VM: a host process answering like the guest, the ceiling of this client.
            cmd = [sys.executable, "-c", ECHO, str(port), str(ident)]
        elif kind == "qemu-passt":
            self.sock_dir = tempfile.mkdtemp(prefix="bench-usernet-")
            # passt started as root drops to nobody before it makes its socket.
            os.chmod(self.sock_dir, 0o777)
            path = os.path.join(self.sock_dir, "passt.sock")
            self.passt = subprocess.Popen(["passt"] + PASST_ARGS + ["--socket", path,
                                                                   "-u", f"{port}:7"],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
            for _ in range(500):
                if os.path.exists(path):
                    break
                time.sleep(0.01)
            else:
                self.passt.kill()
                self.passt.wait()
                os.rmdir(self.sock_dir)
                raise RuntimeError("passt made no socket")
            cmd = QEMU + ["-append", tests, "-netdev",
                          f"stream,id=n0,server=off,addr.type=unix,addr.path={path}"] + NIC
        else:
            raise ValueError(kind)
        self.proc = None
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE)
        except OSError:
            self.stop()
            raise
        self.out = b""
        self.err = b""
        threading.Thread(target=self._read, args=("out", self.proc.stdout), daemon=True).start()
        threading.Thread(target=self._read, args=("err", self.proc.stderr), daemon=True).start()
        deadline = time.time() + 60
        while b"gateway 10.0.2.2 at" not in self.out:
            if time.time() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"{kind}: no ready line: {self.out!r} {self.err!r}")
            time.sleep(0.01)

    def path_cpu(self):
        """CPU seconds of the network path so far: (the VMM's threads except its vCPUs
        (kvmbox `vcpuN`, QEMU `CPU N/KVM`), the passt process if any)."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        pids = [self.passt.pid] if self.passt else children(self.proc.pid, "passt")
        for pid in pids:
            with open(f"/proc/{pid}/stat") as f:
                st = f.read()
            fields = st[st.rfind(")") + 2:].split()
            total += int(fields[11]) + int(fields[12])
        helper, total = total, 0
        for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
            try:
                with open(f"/proc/{self.proc.pid}/task/{tid}/stat") as f:
                    st = f.read()
            except OSError:
                continue
            name = st[st.find("(") + 1:st.rfind(")")]
            if name.startswith("vcpu") or name.endswith("/KVM"):
                continue
            fields = st[st.rfind(")") + 2:].split()
            total += int(fields[11]) + int(fields[12])
        return total / tick, helper / tick

    def _read(self, which, pipe):
        while True:
            b = pipe.read1(4096) if hasattr(pipe, "read1") else pipe.read(4096)
            if not b:
                return
            setattr(self, which, getattr(self, which) + b)

    def stop(self):
        for p in (self.proc, self.passt):
            if p and p.poll() is None:
                p.kill()
                p.wait()
        if self.sock_dir:
            for f in os.listdir(self.sock_dir):
                os.unlink(os.path.join(self.sock_dir, f))
            os.rmdir(self.sock_dir)
            self.sock_dir = None


def latency(port, n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1.0)
    dst = ("127.0.0.1", port)
    payload = bytes(64)
    rtts, lost = [], 0
    for _ in range(n):
        t = time.perf_counter_ns()
        s.sendto(payload, dst)
        try:
            s.recv(4096)
        except socket.timeout:
            lost += 1
            continue
        rtts.append(time.perf_counter_ns() - t)
    s.close()
    rtts.sort()
    if not rtts:
        return {"rtt_med_us": float("nan"), "rtt_p99_us": float("nan"), "rtt_lost": lost}
    return {"rtt_med_us": rtts[len(rtts) // 2] / 1e3,
            "rtt_p99_us": rtts[min(len(rtts) - 1, len(rtts) * 99 // 100)] / 1e3,
            "rtt_lost": lost}


def throughput(port, seconds, window, size=1400):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.settimeout(0.2)
    dst = ("127.0.0.1", port)
    payload = bytes(size)
    got = lost = 0
    out = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        while out < window:
            s.sendto(payload, dst)
            out += 1
        try:
            s.recv(4096)
            got += 1
            out -= 1
        except socket.timeout:
            lost += out
            out = 0
    elapsed = time.perf_counter() - start
    # Let the datagrams still in flight come back before the next phase.
    try:
        while True:
            s.recv(4096)
    except socket.timeout:
        pass
    s.close()
    return {"dgram_s": got / elapsed, "MB_s": got * size / elapsed / 1e6,
            "answered": got, "tput_lost": lost}


def flood(port, count, size=1400):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    dst = ("127.0.0.1", port)
    payload = bytes(size)
    got = 0
    s.setblocking(False)
    for _ in range(count):
        while True:
            try:
                s.sendto(payload, dst)
                break
            except BlockingIOError:
                time.sleep(0)
        try:
            while True:
                s.recv(4096)
                got += 1
        except BlockingIOError:
            pass
    s.settimeout(1.0)
    try:
        while True:
            s.recv(4096)
            got += 1
    except socket.timeout:
        pass
    s.close()
    return {"flood_answered_pct": 100.0 * got / count}


def kill_helper(kind):
    port = free_port()
    vm = Vm(kind, port, 9)
    try:
        pids = [vm.passt.pid] if vm.passt else children(vm.proc.pid, "passt")
        before = latency(port, 10)
        for p in pids:
            os.kill(p, signal.SIGKILL)
        time.sleep(1.0)
        after = latency(port, 3)
        time.sleep(0.5)
        state = "running" if vm.proc.poll() is None else f"exited {vm.proc.returncode}"
        print(f"{kind}: passt {pids} killed; before: {10 - before['rtt_lost']}/10 answered; "
              f"after: {3 - after['rtt_lost']}/3 answered; VMM {state}")
        print(f"  VMM stderr: {vm.err.decode(errors='replace').strip()!r}")
    finally:
        vm.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rtt", type=int, default=10000, help="round trips per latency run")
    ap.add_argument("--seconds", type=float, default=3.0, help="length of a throughput run")
    ap.add_argument("--window", type=int, default=32, help="datagrams outstanding")
    ap.add_argument("--flood", type=int, default=20000, help="datagrams in the flood")
    ap.add_argument("--vmms", default="kvmbox,qemu-slirp,qemu-passt")
    ap.add_argument("--kill-helper", action="store_true")
    a = ap.parse_args()
    for f in (KVMBOX, GUEST, GUEST_MB):
        if not os.path.exists(f):
            sys.exit(f"bench-usernet: {f} is missing (cargo build --release; "
                     "guest/testguest/build.sh)")
    vmms = a.vmms.split(",")
    if a.kill_helper:
        for k in vmms:
            if k in ("kvmbox", "qemu-passt"):
                kill_helper(k)
        return
    results = {k: [] for k in vmms}
    for r in range(a.rounds):
        order = vmms[r % len(vmms):] + vmms[:r % len(vmms)]
        for k in order:
            port = free_port()
            load0 = loadavg()
            vm = Vm(k, port, r)
            try:
                res = latency(port, a.rtt)
                cpu0 = vm.path_cpu()
                res.update(throughput(port, a.seconds, a.window))
                # CPU time of the network path per datagram answered (both directions).
                cpu1 = vm.path_cpu()
                n = max(1, res["answered"])
                res["vmm_cpu_us"] = (cpu1[0] - cpu0[0]) * 1e6 / n
                res["passt_cpu_us"] = (cpu1[1] - cpu0[1]) * 1e6 / n
                res["path_cpu_us"] = res["vmm_cpu_us"] + res["passt_cpu_us"]
                res.update(flood(port, a.flood))
            finally:
                vm.stop()
            res["load"] = f"{load0}-{loadavg()}"
            results[k].append(res)
            print(f"round {r} {k:<11} " + " ".join(
                f"{key}={v:.1f}" if isinstance(v, float) else f"{key}={v}"
                for key, v in res.items()), flush=True)
    print(f"\nmedians over {a.rounds} rounds (rtt: {a.rtt} round trips of 64 B; throughput: "
          f"1400 B, window {a.window}, {a.seconds} s; flood: {a.flood} x 1400 B)")
    keys = ["rtt_med_us", "rtt_p99_us", "dgram_s", "MB_s", "path_cpu_us",
            "flood_answered_pct"]
    print(f"{'vmm':<11} " + " ".join(f"{k:>18}" for k in keys) + "  lost(rtt/tput)")
    for k in vmms:
        rows = results[k]
        med = [statistics.median(x[key] for x in rows) for key in keys]
        lost = f"{sum(x['rtt_lost'] for x in rows)}/{sum(x['tput_lost'] for x in rows)}"
        print(f"{k:<11} " + " ".join(f"{v:>18.1f}" for v in med) + f"  {lost}")


if __name__ == "__main__":
    main()
