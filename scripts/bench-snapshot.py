#!/usr/bin/env python3
"""Snapshot benchmark on KVM with the test guest: create time, file sizes, restore latency.

Usage: scripts/bench-snapshot.py [KVMBOX] [TESTGUEST]   (defaults: target/release/kvmbox,
target/guest/testguest.elf). Boots the test guest (2 vCPUs, 128 MiB, a long ring-3 compute)
with --api-sock, pauses it, times PUT /snapshot/create, reports the state file's size and the
memory file's apparent and on-disk sizes, then starts a fresh `kvmbox run --api-sock` and times
PUT /snapshot/load with resume_vm (answered once every vCPU runs). Five rounds; median printed.
"""
import json, os, socket, statistics, subprocess, sys, tempfile, time

KVMBOX = sys.argv[1] if len(sys.argv) > 1 else "target/release/kvmbox"
GUEST = sys.argv[2] if len(sys.argv) > 2 else "target/guest/testguest.elf"


def http(sock, method, path, body=None):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    data = json.dumps(body) if body is not None else ""
    s.sendall((f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n{data}").encode())
    out = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        out += b
    s.close()
    status = int(out.split()[1])
    assert status == 204, (method, path, out)


def wait_sock(sock):
    for _ in range(10000):
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock)
            s.close()
            return
        except OSError:
            time.sleep(0.001)
    raise SystemExit("no API socket")


def round_(d, i):
    sock, state, mem = f"{d}/a{i}.sock", f"{d}/state{i}", f"{d}/mem{i}"
    vm = subprocess.Popen([KVMBOX, "run", "--accel", "kvm", "--cpus", "2", "--memory", "128M",
                           "--kernel", GUEST, "--cmdline", "tests=compute:100000000000",
                           "--api-sock", sock], stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    wait_sock(sock)
    time.sleep(0.3)
    http(sock, "PATCH", "/vm", {"state": "Paused"})
    t = time.perf_counter()
    http(sock, "PUT", "/snapshot/create", {"snapshot_path": state, "mem_file_path": mem})
    create = time.perf_counter() - t
    vm.kill()
    vm.wait()
    st = os.stat(mem)
    sizes = (os.path.getsize(state), st.st_size, st.st_blocks * 512)
    sock2 = f"{d}/b{i}.sock"
    vm2 = subprocess.Popen([KVMBOX, "run", "--accel", "kvm", "--api-sock", sock2],
                           stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    wait_sock(sock2)
    t = time.perf_counter()
    http(sock2, "PUT", "/snapshot/load",
         {"snapshot_path": state, "mem_backend": {"backend_type": "File", "backend_path": mem},
          "resume_vm": True})
    load = time.perf_counter() - t
    vm2.kill()
    vm2.wait()
    return create, load, sizes


with tempfile.TemporaryDirectory() as d:
    rounds = [round_(d, i) for i in range(5)]
create = statistics.median(r[0] for r in rounds) * 1000
load = statistics.median(r[1] for r in rounds) * 1000
state, mem, disk = rounds[-1][2]
print(f"snapshot create (PUT /snapshot/create, paused 2-vCPU 128 MiB test guest): {create:.1f} ms median of 5")
print(f"snapshot load to running (PUT /snapshot/load with resume_vm): {load:.1f} ms median of 5")
print(f"state file {state} bytes; memory file {mem} bytes apparent, {disk} bytes on disk")
