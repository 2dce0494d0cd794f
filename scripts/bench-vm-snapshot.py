#!/usr/bin/env python3
"""`kvmbox vm` operations on a 512 MiB Debian guest on the software engine, beside QEMU's
equivalents on the same kernel, initramfs and command line (QEMU TCG, HMP over a Unix socket).

The guest (Debian's cloud kernel and the busybox kit of scripts/test.sh) prints
`KVMBOX-LINUX count=N .` every 0.1 s. kvmbox, in a scratch KVMBOX_HOME:
  vm create (1 GiB qcow2 disk, no network) -> vm start (time until it returns: the guest runs)
  -> wait for count=30 -> N x `vm snapshot take sN` (live: memory, devices and disks), 2 s apart
  -> vm stop --force -> `vm clone --linked --snapshot s0` -> N x (`vm snapshot restore s0`,
  `vm start` from it, time to the guest's next count line, vm stop --force).
QEMU 7.2 (Debian's qemu-system-x86), a qcow2 disk: N x HMP `savevm sN` on the running guest,
N x `loadvm s0` (and time to the next count line), and `qemu-img create -b` of a linked overlay.
The time to the next count line includes what was left of the guest's `sleep 0.1` when the
snapshot was taken (up to 0.1 s).

Usage: scripts/bench-vm-snapshot.py [--rounds 3] [--kvmbox target/x86_64-unknown-linux-gnu/release/kvmbox]
"""
import argparse, glob, os, re, shutil, socket, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNT = "i=0; while :; do i=$((i+1)); echo KVMBOX-LINUX count=$i .; sleep 0.1; done"


def kit_cmd(text):
    """The kit's kvmbox.cmd= argument: the shell text with its spaces and specials %-escaped."""
    return "kvmbox.cmd=" + "".join("%%%02X" % ord(c) if c in ' %"\n\t\\' else c for c in text)


CMDLINE = "console=ttyS0 reboot=k panic=-1 cryptomgr.notests " + kit_cmd(COUNT)


def cached(pattern):
    found = glob.glob(os.path.expanduser(pattern))
    if not found:
        sys.exit(f"nothing at {pattern}: run scripts/test.sh once (it builds the Linux kit)")
    return found[0]


def wait_in(path, pattern, timeout=600):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if re.search(pattern, open(path, errors="replace").read()):
                return
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    sys.exit(f"timeout waiting for {pattern!r} in {path}")


def timed(argv, env=None):
    t0 = time.monotonic()
    r = subprocess.run(argv, env=env, capture_output=True, text=True)
    dt = time.monotonic() - t0
    if r.returncode:
        sys.exit(f"{' '.join(argv)}: status {r.returncode}\n{r.stdout}{r.stderr}")
    return dt


def med(xs):
    return sorted(xs)[len(xs) // 2]


def fmt(name, xs, digits=2):
    return f"{name} {' '.join(f'{x:.{digits}f}' for x in xs)} (median {med(xs):.{digits}f} s)"


def kvmbox(kb_bin, kernel, initrd, work, rounds):
    env = dict(os.environ, KVMBOX_HOME=os.path.join(work, "home"))
    kb = lambda *a: timed([kb_bin, "vm", *a], env)
    try:
        run_kvmbox(kb, kernel, initrd, work, rounds)
    finally:
        # Whatever happened, no VM of this run stays up.
        subprocess.run([kb_bin, "vm", "stop", "deb", "--force"], env=env, capture_output=True)


def run_kvmbox(kb, kernel, initrd, work, rounds):
    kb("create", "deb", "--kernel", kernel, "--initrd", initrd, "--cmdline", CMDLINE,
       "--memory", "512M", "--accel", "emu", "--net", "none", "--disk-size", "1G")
    log = os.path.join(work, "home/vms/deb/console.log")
    start = kb("start", "deb")
    wait_in(log, r"count=30 \.")
    takes = []
    for r in range(rounds):
        takes.append(kb("snapshot", "deb", "take", f"s{r}"))
        time.sleep(2)
    kb("stop", "deb", "--force")
    clone = kb("clone", "deb", "deb-clone", "--linked", "--snapshot", "s0")
    restores, returns, to_count = [], [], []
    for _ in range(rounds):
        restores.append(kb("snapshot", "deb", "restore", "s0"))
        # vm start keeps the last run's console as console.log.1: the new console.log starts empty.
        t0 = time.monotonic()
        returns.append(kb("start", "deb"))
        wait_in(log, r"count=\d+ \.", 60)
        to_count.append(time.monotonic() - t0)
        kb("stop", "deb", "--force")
    state = subprocess.run(["du", "-sm", os.path.join(work, "home/vms/deb/snapshots/s0")],
                           capture_output=True, text=True).stdout.split()[0]
    kb("delete", "deb-clone")
    kb("delete", "deb")
    print(f"kvmbox (engine): vm start returns {start:.2f} s; " + fmt("vm snapshot take", takes)
          + f"; linked clone from s0 {clone * 1000:.0f} ms; "
          + fmt("vm snapshot restore", restores, 3) + "; " + fmt("vm start from it returns", returns)
          + "; " + fmt("restore+start to the next count line", [a + b for a, b in zip(restores, to_count)])
          + f"; s0 takes {state} MiB on disk")


def hmp(sock, cmd):
    sock.sendall((cmd + "\n").encode())
    buf = b""
    t0 = time.monotonic()
    while not buf.rstrip().endswith(b"(qemu)") or cmd.encode() not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            sys.exit(f"QEMU's monitor closed during {cmd}: {buf!r}")
        buf += chunk
    if b"Error" in buf:
        sys.exit(f"QEMU: {cmd}: {buf.decode(errors='replace')}")
    return time.monotonic() - t0


def qemu(kernel, initrd, work, rounds):
    disk = os.path.join(work, "q.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk, "1G"], check=True)
    mon, log = os.path.join(work, "mon"), os.path.join(work, "q.log")
    p = subprocess.Popen(["qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-smp", "1",
                          "-nodefaults", "-display", "none", "-kernel", kernel, "-initrd", initrd,
                          "-append", CMDLINE, "-serial", "file:" + log,
                          "-drive", f"file={disk},if=virtio,format=qcow2",
                          "-monitor", f"unix:{mon},server,nowait", "-net", "none"])
    try:
        wait_in(log, r"count=30 \.")
        s = socket.socket(socket.AF_UNIX)
        s.connect(mon)
        buf = b""
        while not buf.rstrip().endswith(b"(qemu)"):
            buf += s.recv(65536)
        takes, loads, to_count = [], [], []
        for r in range(rounds):
            takes.append(hmp(s, f"savevm s{r}"))
            time.sleep(2)
        for _ in range(rounds):
            n = len(open(log, errors="replace").read())
            t0 = time.monotonic()
            loads.append(hmp(s, "loadvm s0"))
            while not re.search(r"count=\d+ \.", open(log, errors="replace").read()[n:]):
                if time.monotonic() - t0 > 60:
                    sys.exit("QEMU: no count line after loadvm")
                time.sleep(0.01)
            to_count.append(time.monotonic() - t0)
        clone = timed(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", disk,
                       os.path.join(work, "clone.qcow2")])
        print("QEMU 7.2 TCG: " + fmt("HMP savevm", takes) + "; " + fmt("loadvm", loads)
              + "; " + fmt("loadvm to the next count line", to_count)
              + f"; linked overlay (qemu-img create -b) {clone * 1000:.0f} ms")
    finally:
        p.kill()
        p.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kvmbox", default=os.path.join(ROOT, "target/x86_64-unknown-linux-gnu/release/kvmbox"))
    args = ap.parse_args()
    kernel = cached("~/.cache/kvmbox/linux/*/vmlinuz")
    initrd = cached("~/.cache/kvmbox/initramfs/*/initramfs.cpio.gz")
    work = tempfile.mkdtemp(prefix="kvmbox-bench-vm-")
    try:
        kvmbox(args.kvmbox, kernel, initrd, work, args.rounds)
        if shutil.which("qemu-system-x86_64"):
            qemu(kernel, initrd, work, args.rounds)
        else:
            print("qemu-system-x86_64 not found: QEMU side skipped (apt-get install qemu-system-x86)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
