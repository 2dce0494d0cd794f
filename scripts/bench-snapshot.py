#!/usr/bin/env python3
"""Snapshot costs of kvmbox on KVM, beside Firecracker when its binary is found, with the
freestanding test guest (ELF64, PVH entry; 1 vCPU, 128 MiB unless --cpus/--memory say
otherwise) running its `dirty` scenario (it fills a 32 MiB buffer, then rewrites about one page
every few milliseconds: guest/testguest/README.md).

Each round, for each VMM in turn (so host load falls on all of them alike), through the VMM's
Firecracker-compatible API on a Unix socket:
  1. start the VMM with an API socket, configure the guest (PUT /boot-source, PUT
     /machine-config with track_dirty_pages) and start it (PUT /actions InstanceStart);
  2. after --warmup seconds, pause (PATCH /vm) and take a Full snapshot (PUT /snapshot/create),
     resume, run --gap seconds, pause and take a Diff snapshot; the time of each create request,
     the bytes each memory file takes on disk (st_blocks, the files are sparse) and the state
     file's size are kept;
  3. kill the VMM, start a fresh one with an API socket, and time PUT /snapshot/load of the
     Full snapshot with resume_vm true: from the request to the answer, after which the guest
     runs (the VMM answers once the vCPUs are resumed);
  4. merge the Diff's memory onto the Full's (kvmbox: `kvmbox snapshot merge`; the peer's own
     tool is not driven here) and time loading the Diff's state with it (kvmbox only).
Medians per VMM and the ratio kvmbox / Firecracker are printed, with the load average.

Firecracker is not part of kvmbox: build it yourself from its public sources and point the
script at it with KVMBOX_FIRECRACKER=/path/to/firecracker (default:
~/.cache/kvmbox-peers/bin/firecracker). A missing peer is reported and skipped.

With --debian, instead: Debian's cloud kernel with the busybox initramfs (the default guest,
guest/linux/) on the software engine, 1 vCPU, 512 MiB, driven by kvmbox alone: per round, the
cold boot to a shell that answers (process start to the answer of `echo` typed on the console),
a Full snapshot of that shell (create time, memory and state file sizes), and in a fresh process
the restore to the same shell answering (PUT /snapshot/load with resume_vm, then the same
`echo`; timed from the load request). Run it under the machine-wide heavy lock.

Usage: scripts/bench-snapshot.py [--runs N] [--kvmbox PATH] [--cpus N] [--memory MIB]
       [--warmup S] [--gap S]
       scripts/bench-snapshot.py --debian [--runs N] [--kvmbox PATH]
"""
import argparse, http.client, json, os, shutil, socket, statistics, subprocess, sys, tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.expanduser("~/.cache/kvmbox-peers/bin")


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=60)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.unix_path)


def api(sock, method, path, body=None):
    """One request; returns (status, seconds from sending to the whole answer)."""
    c = UnixHTTP(sock)
    data = json.dumps(body) if body is not None else None
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    t0 = time.perf_counter()
    c.request(method, path, body=data, headers=headers)
    r = c.getresponse()
    text = r.read()
    dt = time.perf_counter() - t0
    c.close()
    if r.status >= 300:
        raise RuntimeError(f"{method} {path} {body}: {r.status} {text.decode(errors='replace')}")
    return r.status, dt


class Vmm:
    def __init__(self, name, binary):
        self.name, self.binary = name, binary
        self.tmp = tempfile.mkdtemp(prefix=f"kvmbox-snapbench-{name}-")
        self.proc = None

    def start(self):
        sock = os.path.join(self.tmp, "api.sock")
        if os.path.exists(sock):
            os.unlink(sock)
        if self.name == "kvmbox":
            cmd = [self.binary, "run", "--accel", "kvm", "--api-sock", sock]
        else:
            cmd = [self.binary, "--api-sock", sock, "--level", "Error"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.time() + 10
        while True:
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(sock)
                s.close()
                return sock
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name}: no API socket: "
                                       f"{self.proc.stderr.read().decode(errors='replace')}")
                time.sleep(0.002)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
        if self.proc:
            self.proc.wait()
        self.proc = None

    def path(self, what):
        return os.path.join(self.tmp, what)


def on_disk(path):
    return os.stat(path).st_blocks * 512


def round_of(vmm, guest, args, kvmbox):
    r = {}
    sock = vmm.start()
    try:
        api(sock, "PUT", "/boot-source",
            {"kernel_image_path": guest, "boot_args": f"tests=dirty:{args.spin}"})
        api(sock, "PUT", "/machine-config", {"vcpu_count": args.cpus,
                                             "mem_size_mib": args.memory,
                                             "track_dirty_pages": True})
        api(sock, "PUT", "/actions", {"action_type": "InstanceStart"})
        time.sleep(args.warmup)
        for kind, gap in (("Full", 0), ("Diff", args.gap)):
            if gap:
                api(sock, "PATCH", "/vm", {"state": "Resumed"})
                time.sleep(gap)
            api(sock, "PATCH", "/vm", {"state": "Paused"})
            state, mem = vmm.path(f"{kind}.state"), vmm.path(f"{kind}.mem")
            for p in (state, mem):
                if os.path.exists(p):
                    os.unlink(p)
            _, dt = api(sock, "PUT", "/snapshot/create", {"snapshot_type": kind,
                                                          "snapshot_path": state,
                                                          "mem_file_path": mem})
            r[f"create {kind} (ms)"] = dt * 1e3
            r[f"{kind} memory on disk (KiB)"] = on_disk(mem) / 1024
            r[f"{kind} state file (KiB)"] = os.path.getsize(state) / 1024
    finally:
        vmm.stop()

    def load(state, mem):
        sock = vmm.start()
        try:
            _, dt = api(sock, "PUT", "/snapshot/load", {
                "snapshot_path": state,
                "mem_backend": {"backend_type": "File", "backend_path": mem},
                "resume_vm": True})
            # Still alive and running: the guest has seconds of work left.
            time.sleep(0.05)
            if vmm.proc.poll() is not None:
                raise RuntimeError(f"{vmm.name}: exited after restore")
            return dt
        finally:
            vmm.stop()

    r["load Full + resume (ms)"] = load(vmm.path("Full.state"), vmm.path("Full.mem")) * 1e3
    if vmm.name == "kvmbox":
        t0 = time.perf_counter()
        subprocess.run([kvmbox, "snapshot", "merge", vmm.path("Full.mem"), vmm.path("Diff.mem")],
                       check=True, stdout=subprocess.DEVNULL)
        r["merge Diff onto Full (ms)"] = (time.perf_counter() - t0) * 1e3
        r["load Diff on merged + resume (ms)"] = load(vmm.path("Diff.state"),
                                                      vmm.path("Full.mem")) * 1e3
    return r


class Console:
    """A kvmbox process whose console (stdin/stdout pipes) the script types into and reads."""

    def __init__(self, argv):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        self.buf, self.lock = b"", threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while True:
            b = self.proc.stdout.read1(4096)
            if not b:
                return
            with self.lock:
                self.buf += b

    def wait_for(self, marker, timeout=1800, start=0):
        """Offset just past `marker` in the output (searched from `start`)."""
        t0 = time.time()
        while True:
            with self.lock:
                i = self.buf.find(marker, start)
            if i >= 0:
                return i + len(marker)
            if time.time() - t0 > timeout or self.proc.poll() is not None:
                raise RuntimeError(f"no {marker!r}: {self.buf[-400:]!r}")
            time.sleep(0.005)

    def shell_answers(self, start):
        """Type a command; wait for the shell's answer (the marker is computed, so the echo
        of the typed line does not match)."""
        self.proc.stdin.write(b"echo KVMBOX-SHELL-$((6*7))\n")
        self.proc.stdin.flush()
        return self.wait_for(b"KVMBOX-SHELL-42", start=start)

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def debian_round(kvmbox, tmp):
    def script_output(path):
        out = subprocess.run(["bash", os.path.join(ROOT, path)], check=True,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout
        return out.decode().strip().splitlines()[-1]
    kernel = script_output("guest/linux/fetch-kernel.sh")
    initrd = script_output("guest/linux/build-initramfs.sh")
    sock, state, mem = (os.path.join(tmp, n) for n in ("deb.sock", "deb.state", "deb.mem"))
    for p in (sock, state, mem):
        if os.path.exists(p):
            os.unlink(p)
    r = {}
    t0 = time.perf_counter()
    vm = Console([kvmbox, "run", "--accel", "emu", "--kernel", kernel, "--initrd", initrd,
                  "--memory", "512M", "--cmdline", "console=ttyS0 reboot=k panic=-1 cryptomgr.notests",
                  "--api-sock", sock])
    try:
        at = vm.wait_for(b"starting a shell")
        vm.shell_answers(at)
        r["cold boot to shell answering (s)"] = time.perf_counter() - t0
        api(sock, "PATCH", "/vm", {"state": "Paused"})
        _, dt = api(sock, "PUT", "/snapshot/create",
                    {"snapshot_path": state, "mem_file_path": mem})
        r["create Full (ms)"] = dt * 1e3
        r["Full memory on disk (MiB)"] = on_disk(mem) / 2**20
        r["state file (KiB)"] = os.path.getsize(state) / 1024
    finally:
        vm.stop()
    os.unlink(sock)
    back = Console([kvmbox, "run", "--api-sock", sock])
    try:
        while not os.path.exists(sock):
            time.sleep(0.002)
        t0 = time.perf_counter()
        _, dt = api(sock, "PUT", "/snapshot/load", {
            "snapshot_path": state,
            "mem_backend": {"backend_type": "File", "backend_path": mem}, "resume_vm": True})
        r["load + resume (ms)"] = dt * 1e3
        back.shell_answers(0)
        r["restore to shell answering (s)"] = time.perf_counter() - t0
    finally:
        back.stop()
    return r


def debian(args):
    tmp = tempfile.mkdtemp(prefix="kvmbox-snapbench-debian-")
    rounds = []
    try:
        for i in range(args.runs):
            rounds.append(debian_round(args.kvmbox, tmp))
            print(f"round {i + 1}/{args.runs}: {rounds[-1]}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average "
          f"{' '.join(open('/proc/loadavg').read().split()[:3])}; {args.runs} runs; Debian cloud "
          f"kernel + busybox initramfs, software engine, 1 vCPU, 512 MiB")
    for k in rounds[0]:
        vals = [r[k] for r in rounds]
        print(f"{k:36} median {statistics.median(vals):10.2f}   runs "
              + ", ".join(f"{v:.2f}" for v in vals))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--kvmbox", default=os.path.join(ROOT, "target/x86_64-unknown-linux-gnu/release/kvmbox"))
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--memory", type=int, default=128, help="guest MiB (at least 80)")
    ap.add_argument("--spin", default="1000000", help="the dirty scenario's SPIN")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--gap", type=float, default=0.5)
    ap.add_argument("--debian", action="store_true",
                    help="the Debian guest on the engine: boot-to-shell beside restore-to-shell")
    args = ap.parse_args()
    if args.debian:
        return debian(args)
    subprocess.run(["bash", os.path.join(ROOT, "guest/testguest/build.sh"),
                    os.path.join(ROOT, "target/guest")], check=True, stdout=subprocess.DEVNULL)
    guest = os.path.join(ROOT, "target/guest/testguest.elf")
    vmms = [Vmm("kvmbox", args.kvmbox)]
    fc = os.environ.get("KVMBOX_FIRECRACKER", os.path.join(PEERS, "firecracker"))
    if os.access(fc, os.X_OK):
        vmms.append(Vmm("firecracker", fc))
    else:
        print(f"firecracker: not found at {fc} (set KVMBOX_FIRECRACKER); skipped")
    results = {v.name: [] for v in vmms}
    try:
        for i in range(args.runs):
            for v in vmms:
                results[v.name].append(round_of(v, guest, args, args.kvmbox))
            print(f"round {i + 1}/{args.runs} done", file=sys.stderr)
    finally:
        for v in vmms:
            shutil.rmtree(v.tmp, ignore_errors=True)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average "
          f"{' '.join(open('/proc/loadavg').read().split()[:3])}; {args.runs} runs; "
          f"test guest dirty:{args.spin}, {args.cpus} vCPU, {args.memory} MiB; KVM")
    keys = list(results["kvmbox"][0].keys())
    print(f"{'median':38}" + "".join(f"{v.name:>14}" for v in vmms)
          + ("   kvmbox/firecracker" if len(vmms) > 1 else ""))
    for k in keys:
        meds = [statistics.median(r[k] for r in results[v.name]) if k in results[v.name][0]
                else None for v in vmms]
        row = f"{k:38}" + "".join(f"{m:>14.1f}" if m is not None else f"{'-':>14}" for m in meds)
        if len(meds) > 1 and meds[1]:
            row += f"   {meds[0] / meds[1]:.2f}"
        print(row)


if __name__ == "__main__":
    main()
