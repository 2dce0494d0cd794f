#!/usr/bin/env python3
"""Benchmark kvmbox's API (`kvmbox run --api-sock`): time to API-ready, resident memory with
the API, and pause/resume latency on both CPU engines.

Measures:
  - process start -> first answer to `GET /` (no kernel: kvmbox waits to be configured),
  - VmRSS of that idle process, and the VMM's resident memory beyond guest RAM while the test
    guest computes on KVM with the API on (as scripts/bench-startup.py measures it without),
  - pause and resume latency: the round trip of `PATCH /vm` (HTTP request to the answer, which
    kvmbox sends once every vCPU has acknowledged), while the test guest computes in ring 3 with
    2 vCPUs, on KVM and on the software engine.
Usage: scripts/bench-api.py [--runs N] [--kvmbox PATH]
"""
import argparse, importlib.util, os, socket, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def http(sock_path, method, path, body=None):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    b = body.encode() if body else b""
    s.sendall(f"{method} {path} HTTP/1.1\r\nContent-Length: {len(b)}\r\nConnection: close\r\n\r\n".encode() + b)
    out = b""
    while chunk := s.recv(4096):
        out += chunk
    s.close()
    return int(out.split()[1]), out


def fresh(sock_path):
    """kvmbox refuses an existing socket path; a killed kvmbox leaves its socket behind."""
    if os.path.exists(sock_path):
        os.unlink(sock_path)


def api_ready_once(kvmbox, sock_path):
    fresh(sock_path)
    t0 = time.perf_counter()
    p = subprocess.Popen([kvmbox, "run", "--api-sock", sock_path], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while True:
        try:
            status, _ = http(sock_path, "GET", "/")
            if status == 200:
                break
        except OSError:
            pass
        if p.poll() is not None:
            sys.exit(f"kvmbox exited: {p.stderr.read()!r}")
        time.sleep(0.0002)
    t = time.perf_counter() - t0
    with open(f"/proc/{p.pid}/status") as f:
        rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
    p.kill()
    p.wait()
    return t, rss


def pause_resume(kvmbox, guest, accel, sock_path, cycles):
    fresh(sock_path)
    p = subprocess.Popen([kvmbox, "run", "--accel", accel, "--kernel", guest, "--memory", "128M", "--cpus", "2",
                          "--cmdline", "tests=compute:20000000000", "--api-sock", sock_path],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not os.path.exists(sock_path):
            time.sleep(0.001)
        time.sleep(0.5)
        pauses, resumes = [], []
        for _ in range(cycles):
            for name, into in (("Paused", pauses), ("Resumed", resumes)):
                t0 = time.perf_counter()
                status, out = http(sock_path, "PATCH", "/vm", f'{{"state": "{name}"}}')
                into.append((time.perf_counter() - t0) * 1000)
                if status != 204:
                    sys.exit(f"PATCH /vm {name}: {out!r}")
                time.sleep(0.05)
        return pauses, resumes
    finally:
        p.kill()
        p.wait()


def summary(xs, unit):
    return f"median {statistics.median(xs):.2f} {unit}, min {min(xs):.2f}, max {max(xs):.2f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--kvmbox", default=os.path.join(ROOT, "target/x86_64-unknown-linux-gnu/release/kvmbox"))
    a = ap.parse_args()
    guest = os.path.join(ROOT, "target/guest/testguest.elf")
    subprocess.run(["bash", os.path.join(ROOT, "guest/testguest/build.sh")], check=True, stdout=subprocess.DEVNULL)
    tmp = tempfile.mkdtemp(prefix="kvmbox-bench-api-")
    sock_path = os.path.join(tmp, "api.sock")
    api_ready_once(a.kvmbox, sock_path)  # warm the page cache
    ready, rss = [], []
    for _ in range(a.runs):
        t, r = api_ready_once(a.kvmbox, sock_path)
        ready.append(t * 1000)
        rss.append(r / 1024)
    print(f"runs: {a.runs}")
    print(f"start -> API answers GET /: {summary(ready, 'ms')}")
    print(f"VmRSS, API up, VM not started: {summary(rss, 'MiB')}")
    spec = importlib.util.spec_from_file_location("bench_startup", os.path.join(ROOT, "scripts/bench-startup.py"))
    bs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bs)

    class WithApi(bs.Vmm):
        def command(self, *args):
            fresh(sock_path)
            return super().command(*args) + ["--api-sock", sock_path]

    for vmm in (bs.Vmm("kvmbox", a.kvmbox), WithApi("kvmbox-api", a.kvmbox)):
        g, o = bs.rss_beyond_guest(vmm, guest, 128)
        print(f"{vmm.name}: test guest computing on KVM: guest RAM touched {g:.1f} MiB, VMM beyond it {o:.1f} MiB")
    for accel in ("kvm", "emu"):
        p, r = pause_resume(a.kvmbox, guest, accel, sock_path, a.runs)
        print(f"{accel}, 2 vCPUs computing in ring 3: pause {summary(p, 'ms')}; resume {summary(r, 'ms')}")


if __name__ == "__main__":
    main()
