//! Each thread kind's filter, installed for real on a thread of a child process: what the
//! thread needs still works, and one call it must not make ends the process with SIGSYS and
//! names the call on stderr.
//!
//! The child is this test binary run again on the single test `child`, with the case to play
//! in `KVMBOX_SECCOMP_CASE`; the parent checks how it ended.

use kvmbox_seccomp::ThreadKind;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;

const CASE_ENV: &str = "KVMBOX_SECCOMP_CASE";

/// What a case does after installing its filter.
#[derive(Clone, Copy, Debug)]
enum Action {
    /// `openat` of a file.
    Open,
    /// An AF_INET socket.
    InetSocket,
    /// An AF_UNIX socket.
    UnixSocket,
    /// Start a thread and join it (clone3 refused, clone with thread flags).
    SpawnThread,
    /// Map memory executable.
    MapExec,
    /// `read` from a descriptor other than stdin.
    ReadPipe,
    /// Write to stderr.
    WriteStderr,
    /// `execve`.
    Exec,
    /// KVM_CREATE_VM on a descriptor (the filter decides before the kernel looks at it).
    KvmCreateVm,
    /// The vCPU kick (the first real-time signal, blocked here) to this thread.
    Kick,
    /// A signal to another process (`kill` of process 1, signal 0).
    SignalOther,
    /// A new thread (under the same filter) allocates 16 blocks of 100 KiB and frees them:
    /// malloc must neither read a file for it (the arena limit, the overcommit policy when it
    /// gives memory back) nor fail.
    ThreadHeap,
}

/// (filter, action, whether the filter allows it). The call number is what the message must
/// name when it does not.
const CASES: &[(ThreadKind, Action, bool)] = &[
    (ThreadKind::Vcpu, Action::SpawnThread, true),
    (ThreadKind::Vcpu, Action::WriteStderr, true),
    (ThreadKind::Vcpu, Action::Open, false),
    (ThreadKind::Vcpu, Action::InetSocket, false),
    (ThreadKind::Vcpu, Action::KvmCreateVm, false),
    (ThreadKind::Vcpu, Action::MapExec, false),
    (ThreadKind::Vmm, Action::Open, true),
    (ThreadKind::Vmm, Action::UnixSocket, true),
    (ThreadKind::Vmm, Action::SpawnThread, true),
    (ThreadKind::Vmm, Action::InetSocket, false),
    (ThreadKind::Vmm, Action::Exec, false),
    (ThreadKind::Api, Action::SpawnThread, true),
    (ThreadKind::Api, Action::Open, false),
    (ThreadKind::ApiConnection, Action::UnixSocket, false),
    (ThreadKind::ApiConnection, Action::SpawnThread, false),
    (ThreadKind::Vcpu, Action::Kick, true),
    (ThreadKind::Vcpu, Action::SignalOther, false),
    (ThreadKind::Signals, Action::Kick, true),
    (ThreadKind::Signals, Action::ReadPipe, false),
    (ThreadKind::Console, Action::Kick, true),
    (ThreadKind::Console, Action::ReadPipe, false),
    (ThreadKind::Timer, Action::WriteStderr, true),
    (ThreadKind::Timer, Action::SpawnThread, false),
    (ThreadKind::BlockWorker, Action::ReadPipe, true),
    (ThreadKind::BlockWorker, Action::Open, false),
    (ThreadKind::BlockIo, Action::WriteStderr, true),
    (ThreadKind::BlockIo, Action::ReadPipe, false),
    (ThreadKind::BlockIo, Action::Open, false),
    (ThreadKind::BlockIo, Action::SpawnThread, false),
    (ThreadKind::BlockIo, Action::KvmCreateVm, false),
    (ThreadKind::NetWorker, Action::InetSocket, false),
    (ThreadKind::RngWorker, Action::Open, false),
    (ThreadKind::VsockWorker, Action::InetSocket, false),
    (ThreadKind::VsockWorker, Action::Open, false),
    (ThreadKind::Releaser, Action::ReadPipe, true),
    (ThreadKind::Releaser, Action::WriteStderr, false),
    (ThreadKind::HelperOutput, Action::ReadPipe, true),
    (ThreadKind::HelperOutput, Action::WriteStderr, true),
    (ThreadKind::HelperOutput, Action::Open, false),
    (ThreadKind::HelperOutput, Action::SpawnThread, false),
    (ThreadKind::Vmm, Action::SignalOther, false),
    (ThreadKind::Vcpu, Action::ThreadHeap, true),
    (ThreadKind::Api, Action::ThreadHeap, true),
];

fn syscall_of(a: Action) -> libc::c_long {
    match a {
        Action::Open => libc::SYS_openat,
        Action::InetSocket | Action::UnixSocket => libc::SYS_socket,
        Action::SpawnThread | Action::ThreadHeap => libc::SYS_clone,
        Action::MapExec => libc::SYS_mmap,
        Action::ReadPipe => libc::SYS_read,
        Action::WriteStderr => libc::SYS_write,
        Action::Exec => libc::SYS_execve,
        Action::KvmCreateVm => libc::SYS_ioctl,
        Action::Kick => libc::SYS_tgkill,
        Action::SignalOther => libc::SYS_kill,
    }
}

/// Do `a` with raw calls (so that little else runs under the filter); true if it worked.
/// `pipe` is the read end of a pipe whose write end is closed.
fn act(a: Action, pipe: libc::c_int) -> bool {
    // SAFETY: plain system calls on descriptors and memory this function owns (or on
    // descriptor 0 and -1, which they cannot harm); results are checked.
    unsafe {
        match a {
            Action::Open => {
                let fd = libc::open(c"/proc/self/stat".as_ptr(), libc::O_RDONLY);
                fd >= 0 && libc::close(fd) == 0
            }
            Action::InetSocket | Action::UnixSocket => {
                let family = if matches!(a, Action::InetSocket) {
                    libc::AF_INET
                } else {
                    libc::AF_UNIX
                };
                let fd = libc::socket(family, libc::SOCK_STREAM, 0);
                fd >= 0 && libc::close(fd) == 0
            }
            Action::SpawnThread => std::thread::spawn(|| 7).join().ok() == Some(7),
            Action::ThreadHeap => {
                std::thread::spawn(|| {
                    let blocks: Vec<Vec<u8>> = (0..16).map(|_| vec![1u8; 100 << 10]).collect();
                    let sum: usize = blocks.iter().map(|b| b.len()).sum();
                    drop(std::hint::black_box(blocks));
                    sum
                })
                .join()
                .ok()
                    == Some(16 * (100 << 10))
            }
            Action::MapExec => {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                p != libc::MAP_FAILED
            }
            Action::ReadPipe => {
                let mut b = 0u8;
                libc::read(pipe, (&mut b as *mut u8).cast(), 1) == 0
            }
            Action::WriteStderr => libc::write(2, b"x\n".as_ptr().cast(), 2) == 2,
            Action::Exec => {
                let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
                libc::execv(c"/bin/true".as_ptr(), argv.as_ptr());
                false
            }
            Action::KvmCreateVm => {
                // On stdin: whatever the descriptor is, the filter decides first.
                libc::ioctl(0, 0xae01, 0);
                true
            }
            Action::Kick => {
                let sig = libc::SIGRTMIN();
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, sig);
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), sig) == 0
            }
            Action::SignalOther => {
                libc::kill(1, 0);
                true
            }
        }
    }
}

/// The child: installs the case's filter on this thread and acts. Runs only under `CASE_ENV`.
#[test]
fn child() {
    let Ok(case) = std::env::var(CASE_ENV) else {
        return;
    };
    let (kind, action, _) = CASES[case.parse::<usize>().expect("case index")];
    kvmbox_seccomp::enable().expect("enable");
    // The pipe for ReadPipe, made before the filter, which may forbid pipe2.
    let mut fds = [-1; 2];
    // SAFETY: pipe writes two descriptors into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: closing our own write end.
    unsafe { libc::close(fds[1]) };
    if matches!(kind, ThreadKind::Releaser) {
        let f = kvmbox_seccomp::PreparedFilter::new(kind)
            .expect("compile")
            .expect("enabled");
        assert!(f.install(), "install");
    } else {
        kvmbox_seccomp::apply(kind).expect("apply");
    }
    let worked = act(action, fds[0]);
    // Report with the one call every filter allows, and end at once (no harness code runs
    // under the filter).
    // SAFETY: exit_group ends this child process.
    unsafe { libc::syscall(libc::SYS_exit_group, if worked { 0 } else { 3 }) };
}

#[test]
fn each_filter_allows_what_its_thread_needs_and_kills_on_the_rest() {
    let me = std::env::current_exe().expect("test binary");
    for (i, &(kind, action, allowed)) in CASES.iter().enumerate() {
        let out = Command::new(&me)
            .args(["--exact", "child", "--nocapture", "--test-threads", "1"])
            .env(CASE_ENV, i.to_string())
            .output()
            .expect("run the child");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let what = format!("{kind:?} {action:?}: {:?}\nstderr: {stderr}", out.status);
        if allowed {
            assert_eq!(out.status.code(), Some(0), "should work: {what}");
            assert!(!stderr.contains("seccomp"), "{what}");
        } else {
            assert_eq!(
                out.status.signal(),
                Some(libc::SIGSYS),
                "should end by SIGSYS: {what}"
            );
            // The releaser cannot write, and glibc makes the clone of a new thread with every
            // signal blocked (the kernel then ends the process without running the handler):
            // those violations show only in the audit log.
            if kind != ThreadKind::Releaser && !matches!(action, Action::SpawnThread) {
                let needle = format!(", {} filter) made system call", kind.name());
                assert!(stderr.contains(&needle), "{what}");
                assert!(
                    stderr.contains(&format!("made system call {},", syscall_of(action))),
                    "{what}"
                );
            }
        }
    }
}
