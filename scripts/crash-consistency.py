#!/usr/bin/env python3
"""Crash consistency of kvmbox's virtio-blk: does every write the guest saw flushed survive a
SIGKILL of the VMM?

Each trial boots the test guest on KVM with the `crashrec` scenario (guest/testguest/records.c)
on a fresh disk image. The guest writes numbered, checksummed 512-byte records (record n in
sector n), a batch per request, flushes after each batch and prints "crashrec flushed N" once the
flush completed. The script SIGKILLs kvmbox at a random moment (a random delay after the first
completed flush, so the guest is writing when it dies), takes the highest N the console
shows, and checks records 0..N-1 of stream 0 in the image: magic, number, stream, payload and
checksum (scripts/kvmbox_records.py). A record the guest saw flushed that is missing or damaged
fails the trial.

Formats: `raw` (the image file itself is read) and `qcow2` (created and read with `qemu-img`;
after the kill `qemu-img check` must find no corruption and no check error; leaked clusters,
which a SIGKILL between a cluster allocation and its use may leave, are allowed and counted);
a format is one entry of FORMATS.

Usage: scripts/crash-consistency.py [--trials 100] [--format raw] [--kvmbox PATH] [--guest PATH]
       scripts/crash-consistency.py --check-image PATH --records N [--format raw]
Exit status: 0 when every trial passed, 1 when one failed, 2 on bad usage or a missing tool.
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from kvmbox_records import REC, check_record, check_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLUSHED = re.compile(rb"^crashrec flushed (\d+)\r?$", re.M)
BOOT_TIMEOUT_S = 60


class Raw:
    """A raw image: the file is the disk."""

    name = "raw"

    def create(self, path, size):
        with open(path, "wb") as f:
            f.truncate(size)

    def disk_arg(self, path):
        return path

    def read(self, path, offset, length):
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def check(self, path):
        """(problem or None, leaked clusters)."""
        return None, 0

    def version(self):
        return None


class Qcow2:
    """A qcow2 image, created, checked and read with qemu-img; kvmbox opens it by the
    `format=qcow2` disk option."""

    name = "qcow2"

    def __init__(self):
        if not shutil.which("qemu-img"):
            sys.exit("crash-consistency: --format qcow2 needs qemu-img (apt-get install qemu-utils)")

    def create(self, path, size):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)], check=True)

    def disk_arg(self, path):
        return f"{path},format=qcow2"

    def read(self, path, offset, length):
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(path)) as raw:
            subprocess.run(
                ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, raw.name], check=True
            )
            raw.seek(offset)
            return raw.read(length)

    def check(self, path):
        # Exit status 0: clean, 3: leaks only, 2: corruption, 1: the check could not finish.
        r = subprocess.run(
            ["qemu-img", "check", "--output=json", "-f", "qcow2", path],
            capture_output=True, text=True,
        )
        try:
            report = json.loads(r.stdout)
        except ValueError:
            report = {}
        bad = report.get("corruptions", 0) + report.get("check-errors", 0)
        if r.returncode not in (0, 3) or bad or "check-errors" not in report:
            return "qemu-img check: " + (r.stdout + r.stderr).strip().replace("\n", "; "), 0
        return None, report.get("leaks", 0)

    def version(self):
        out = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True).stdout
        return out.splitlines()[0] if out else None


FORMATS = {"raw": Raw, "qcow2": Qcow2}


def verify(fmt, image, flushed):
    """None if records 0..flushed-1 of `image` are intact, else the first problem."""
    if flushed == 0:
        return None
    bad = check_records(fmt.read(image, 0, flushed * REC), flushed, 0)
    return bad and bad + " (flushed)"


def trial(args, fmt, rng, workdir, index):
    image = os.path.join(workdir, f"disk{index}.{fmt.name}")
    log = os.path.join(workdir, f"console{index}.log")
    fmt.create(image, args.disk_mib << 20)
    cmd = [
        args.kvmbox, "run", "--accel", "kvm", "--kernel", args.guest, "--memory", "64M",
        "--cmdline", f"tests=crashrec:{args.batch}", "--disk", fmt.disk_arg(image),
    ]
    delay = rng.uniform(args.min_delay, args.max_delay)
    with open(log, "wb") as out:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        # The kill moment is counted from the guest's first completed flush, so every trial
        # kills the VMM while records are being written (however long the boot took).
        boot_deadline = time.monotonic() + BOOT_TIMEOUT_S
        while p.poll() is None and time.monotonic() < boot_deadline:
            with open(log, "rb") as f:
                if FLUSHED.search(f.read()):
                    break
            time.sleep(0.01)
        try:
            p.wait(timeout=delay)
            killed = False
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
            killed = True
    with open(log, "rb") as f:
        console = f.read()
    # Only complete lines count: the kill may cut the last one.
    counts = [int(m) for m in FLUSHED.findall(console[: console.rfind(b"\n") + 1])]
    flushed = max(counts, default=0)
    result = {
        "trial": index, "delay_s": round(delay, 3), "killed": killed, "flushed": flushed,
        "error": None,
    }
    if not killed and b"KVMBOX-TEST crashrec records=" not in console:
        last = console.decode(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        result["error"] = f"kvmbox exited with {p.returncode} before the kill: {last[0]}"
    if result["error"] is None:
        result["error"], result["leaks"] = fmt.check(image)
    if result["error"] is None:
        result["error"] = verify(fmt, image, flushed)
    # Records past the last flush the guest saw: written, perhaps, but never promised.
    if result["error"] is None:
        tail = fmt.read(image, flushed * REC, args.batch * 2 * REC)
        result["beyond"] = sum(
            1 for k in range(len(tail) // REC)
            if check_record(tail[k * REC:(k + 1) * REC], flushed + k, 0) is None
        )
    if result["error"] is None and not args.keep:
        os.unlink(image)
        os.unlink(log)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--format", choices=sorted(FORMATS), default="raw")
    ap.add_argument("--kvmbox", default=os.path.join(REPO, "target/x86_64-unknown-linux-gnu/release/kvmbox"))
    ap.add_argument("--guest", default=os.path.join(REPO, "target/guest/testguest.elf"))
    ap.add_argument("--batch", type=int, default=8, help="records per write+flush (1-64)")
    ap.add_argument("--disk-mib", type=int, default=16)
    ap.add_argument("--min-delay", type=float, default=0.0,
                    help="earliest kill, seconds after the first flush")
    ap.add_argument("--max-delay", type=float, default=3.0,
                    help="latest kill, seconds after the first flush")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--workdir", default=None, help="where images go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep passing trials' images and logs")
    ap.add_argument("--json", action="store_true", help="print one JSON object at the end")
    ap.add_argument("--check-image", metavar="PATH",
                    help="only verify records 0..--records-1 of an existing image")
    ap.add_argument("--records", type=int, default=0)
    args = ap.parse_args()
    if args.check_image:
        bad = verify(FORMATS[args.format](), args.check_image, args.records)
        print(f"{args.check_image}: records 0..{args.records - 1}: {bad or 'intact'}")
        return 1 if bad else 0
    for what, path in (("kvmbox", args.kvmbox), ("test guest", args.guest)):
        if not os.path.exists(path):
            ap.error(f"{what} {path} does not exist (cargo build --release; "
                     "guest/testguest/build.sh)")
    if not 1 <= args.batch <= 64 or args.trials < 1 or not 0 <= args.min_delay <= args.max_delay:
        ap.error("need --batch 1..64, --trials >= 1 and 0 <= --min-delay <= --max-delay")
    fmt = FORMATS[args.format]()
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    workdir = args.workdir or tempfile.mkdtemp(prefix="kvmbox-crash-")
    os.makedirs(workdir, exist_ok=True)
    print(f"crash-consistency: {args.trials} trials, format {fmt.name}, batch {args.batch}, "
          f"kill {args.min_delay}-{args.max_delay} s after the first flush, seed {seed}, in {workdir}")
    results = []
    start = time.monotonic()
    for i in range(args.trials):
        r = trial(args, fmt, rng, workdir, i)
        results.append(r)
        status = "ok" if r["error"] is None else "FAIL " + r["error"]
        leaks = f", leaked clusters {r.get('leaks', 0)}" if fmt.name != "raw" else ""
        print(f"trial {i:3}: kill {r['delay_s']:5.2f} s after the first flush, flushed {r['flushed']:5}, "
              f"intact past the last flush {r.get('beyond', '-')}{leaks}: {status}", flush=True)
    failed = [r for r in results if r["error"]]
    flushed = [r["flushed"] for r in results]
    summary = {
        "format": fmt.name, "trials": len(results), "failed": len(failed), "seed": seed,
        "killed": sum(r["killed"] for r in results),
        "records_verified": sum(flushed), "min_flushed": min(flushed), "max_flushed": max(flushed),
        "trials_with_no_flush": sum(1 for n in flushed if n == 0),
        "leaked_clusters": sum(r.get("leaks", 0) for r in results),
        "trials_with_leaks": sum(1 for r in results if r.get("leaks", 0)),
        "checker": fmt.version(),
        "seconds": round(time.monotonic() - start, 1),
    }
    print(f"total: {summary['trials']} trials, {summary['failed']} failed, "
          f"{summary['killed']} killed mid-run, {summary['records_verified']} flushed records "
          f"verified (per trial {summary['min_flushed']}..{summary['max_flushed']}), "
          f"{summary['leaked_clusters']} leaked clusters in {summary['trials_with_leaks']} trials, "
          f"{summary['seconds']} s")
    if args.json:
        print(json.dumps(summary))
    if args.workdir is None and not args.keep and not failed:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
