//! How kvmbox ends a VM on KVM: it exits with the guest's status once its own part is done, and
//! the kernel's teardown of the VM runs in a child that outlives it briefly
//! (`crates/vmm/src/exit.rs`). This test makes its process a child subreaper so that the child
//! comes back to it, which is why it is a test binary of its own (in a binary shared with other
//! tests it would reap their kvmbox processes too).

mod common;

use common::{kvm_or_skip, kvmbox, testguest, CpuLease, TESTGUEST_TIMEOUT};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long the teardown child may take to end after kvmbox has: it exits as soon as kvmbox is
/// gone and its teardown took ~1 ms idle and up to ~30 ms on a loaded host (README, "Exit
/// status"); the margin covers a host far busier than that.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(20);

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [-1; 2];
    // SAFETY: pipe2 writes two new descriptors into the array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

#[test]
fn teardown_child_holds_no_descriptor_of_the_caller_and_ends_after_kvmbox() {
    if !kvm_or_skip("teardown_child_holds_no_descriptor_of_the_caller_and_ends_after_kvmbox") {
        return;
    }
    // SAFETY: PR_SET_CHILD_SUBREAPER only sets a flag on this process.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0, "prctl(PR_SET_CHILD_SUBREAPER)");
    // Besides stdout, kvmbox inherits the write end of a pipe as fd 3: its caller may wait for
    // end-of-file on any descriptor it passed, so no process of kvmbox may keep one open.
    let (extra_read, extra_write) = pipe();
    let extra = extra_write.as_raw_fd();
    let mut cmd = Command::new(kvmbox());
    cmd.args(["run", "--accel", "kvm", "--memory", "128M", "--kernel"])
        .arg(testguest())
        .args(["--cmdline", "tests=hello,poweroff"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: dup2 is async-signal-safe; it gives the child the pipe's write end as fd 3
    // (without CLOEXEC).
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(extra, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let _lease = CpuLease::shared();
    let mut child = cmd.spawn().expect("start kvmbox");
    drop(extra_write);
    let pid = child.id() as libc::pid_t;
    // A kvmbox that hangs is killed after the test guest's usual timeout (TESTING.md).
    let (done, watch) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if watch.recv_timeout(TESTGUEST_TIMEOUT).is_err() {
            // SAFETY: kill sends a signal to kvmbox, which has not been waited for yet.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let _ = done.send(());
    watchdog.join().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "kvmbox: {out}\n{err}");
    assert!(out.contains("KVMBOX-TEST poweroff"), "guest output: {out}");

    // kvmbox is gone, and no process holds fd 3's pipe any more: a read sees end-of-file
    // rather than EAGAIN (the teardown child was started after kvmbox closed it).
    // SAFETY: fcntl on a descriptor this test owns.
    unsafe { libc::fcntl(extra_read.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let mut byte = 0u8;
    // SAFETY: a one-byte read into `byte` from a descriptor this test owns.
    let n = unsafe { libc::read(extra_read.as_raw_fd(), (&mut byte as *mut u8).cast(), 1) };
    assert_eq!(
        n,
        0,
        "fd 3 is still open somewhere: {}",
        std::io::Error::last_os_error()
    );

    // The teardown child came back to this subreaper: it ends, cleanly, soon after kvmbox.
    let start = Instant::now();
    let mut orphans = Vec::new();
    loop {
        let mut st = 0;
        // SAFETY: waitpid with a valid out-param; WNOHANG never blocks.
        let r = unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) };
        if r > 0 {
            assert_ne!(r, pid, "kvmbox itself was reaped already");
            assert!(
                libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
                "the teardown child ended with wait status {st:#x}"
            );
            orphans.push(r);
            continue;
        }
        if r < 0 {
            // ECHILD: no child left.
            break;
        }
        assert!(
            start.elapsed() < TEARDOWN_TIMEOUT,
            "kvmbox's teardown child still runs {TEARDOWN_TIMEOUT:?} after kvmbox exited"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        orphans.len(),
        1,
        "kvmbox leaves exactly one teardown child: {orphans:?}"
    );
}
