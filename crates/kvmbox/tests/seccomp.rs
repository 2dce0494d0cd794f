//! Every thread of a running VM is under its seccomp filter (`Seccomp: 2` in
//! /proc/PID/task/*/status) on both CPU backends, and none is with `--no-seccomp`. The test
//! guest brings up the threads a VM has on a terminal-less run: both vCPUs, the virtio-blk
//! worker (`tests=crashrec:1` writes and flushes records on the disk until it is full, far
//! longer than the test looks), the PIT's timer, the console forwarder (stdin is a pipe), the
//! signal waiter, the API's accept loop and one open connection. What each filter allows and
//! refuses is tested in `crates/seccomp/tests/filters.rs`.

mod common;

use common::{api, kvm_or_skip, task_dirs, testguest, CpuLease, Interactive, TESTGUEST_TIMEOUT};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

/// The seccomp mode of every thread of `pid`: (thread name, mode).
fn seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for path in task_dirs(pid) {
        // A thread may end between the listing and the reads: skip it.
        let (Ok(comm), Ok(status)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("status")),
        ) else {
            continue;
        };
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .expect("a Seccomp: line")
            .trim()
            .to_string();
        out.push((comm.trim().to_string(), mode));
    }
    out.sort();
    out
}

/// A sparse 1 GiB raw disk for `tests=crashrec`, removed on drop.
struct Disk(PathBuf);

impl Disk {
    fn new(name: &str) -> Self {
        let p =
            std::env::temp_dir().join(format!("kvmbox-seccomp-{name}-{}.img", std::process::id()));
        std::fs::File::create(&p)
            .and_then(|f| f.set_len(1 << 30))
            .expect("create the disk image");
        Self(p)
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Boot the test guest on `accel` with a disk and the API, wait until it writes to the disk,
/// open an API connection, check every thread's seccomp mode is `mode`, then stop it with
/// SIGTERM.
fn check_threads(name: &str, accel: &str, extra: &[&str], mode: &str) {
    let disk = Disk::new(name);
    let sock = api::sock_path(name);
    let guest = testguest();
    let mut args = vec![
        "run",
        "--accel",
        accel,
        "--kernel",
        guest.to_str().expect("utf-8 path"),
        "--cmdline",
        "tests=crashrec:1",
        "--cpus",
        "2",
        "--memory",
        "128M",
        "--disk",
        disk.0.to_str().expect("utf-8 path"),
        "--api-sock",
        sock.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    let _lease = CpuLease::shared();
    let mut vm = Interactive::spawn(&args);
    vm.expect("crashrec flushed ", TESTGUEST_TIMEOUT);
    // One request on a kept-alive connection: its thread waits for the next one. The first
    // connection that succeeds is the one kept, so that no other connection's thread is ending
    // while the threads are listed.
    let start = std::time::Instant::now();
    let mut conn = loop {
        match UnixStream::connect(&sock) {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    start.elapsed() < TESTGUEST_TIMEOUT,
                    "no API socket: {e}; stderr: {}",
                    vm.stderr()
                );
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    };
    conn.set_read_timeout(Some(TESTGUEST_TIMEOUT)).unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.ends_with(b"}") {
        let n = conn.read(&mut buf).unwrap_or_else(|e| {
            panic!(
                "reading the API's answer: {e}; console:\n{}\nstderr:\n{}",
                vm.console(),
                vm.stderr()
            )
        });
        assert!(
            n > 0,
            "the API closed a kept-alive connection; stderr: {}",
            vm.stderr()
        );
        answer.extend_from_slice(&buf[..n]);
    }

    let threads = seccomp_modes(vm.id());
    let names: Vec<&str> = threads.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "kvmbox",
        "vcpu0",
        "vcpu1",
        "virtio-blk",
        "virtio-blk-io",
        "pit",
        "console",
        "signals",
        "api",
        "api-conn",
    ] {
        assert!(names.contains(&want), "no {want} thread among {threads:?}");
    }
    for (thread, m) in &threads {
        assert_eq!(m, mode, "thread {thread} of {threads:?}");
    }
    drop(conn);
    // A stop signal: the signal thread asks the VM to stop and kicks the vCPUs (on KVM a
    // tgkill from that thread); kvmbox stops as documented (status 8).
    // SAFETY: kill sends SIGTERM to the kvmbox process this test started.
    assert_eq!(unsafe { libc::kill(vm.id() as i32, libc::SIGTERM) }, 0);
    assert_eq!(
        vm.wait_exit(TESTGUEST_TIMEOUT),
        Some(8),
        "status after SIGTERM; stderr: {}",
        vm.stderr()
    );
    assert!(!vm.stderr().contains("seccomp"), "stderr: {}", vm.stderr());
}

#[test]
fn every_thread_is_filtered_on_kvm() {
    if !kvm_or_skip("every_thread_is_filtered_on_kvm") {
        return;
    }
    check_threads("kvm", "kvm", &[], "2");
}

#[test]
fn every_thread_is_filtered_on_the_engine() {
    check_threads("emu", "emu", &[], "2");
}

#[test]
fn no_seccomp_leaves_every_thread_unfiltered() {
    check_threads("off", "emu", &["--no-seccomp"], "0");
}
