//! kvmbox's seccomp filters: one per kind of thread, written as rules in [`rules`], compiled
//! with `seccompiler` and installed by each thread on itself as it starts, before the guest
//! runs any code.
//!
//! The filters are off until [`enable`] (the `kvmbox` binary calls it unless `--no-seccomp`),
//! so the libraries' unit tests run unfiltered. A system call a filter does not allow is
//! answered with SIGSYS: the handler [`enable`] installs writes the thread's kind, its tid and
//! the call's number to stderr, then SIGSYS ends the process. The filters are installed with
//! `SECCOMP_FILTER_FLAG_LOG`, so the kernel's audit log (`dmesg`: `audit: type=1326 ...
//! syscall=N`) names the call too.

mod ioctls;
mod rules;
mod sigsys;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use std::sync::atomic::{AtomicBool, Ordering};

/// The kinds of kvmbox threads, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: the VMM's control loop.
    Vmm,
    /// A vCPU.
    Vcpu,
    /// The API socket's accept loop.
    Api,
    /// One API connection.
    ApiConnection,
    /// The stop-signal waiter.
    Signals,
    /// The stdin forwarder of the serial console.
    Console,
    /// A device timer thread (PIT, RTC).
    Timer,
    /// The virtio-blk worker: the block I/O thread.
    BlockWorker,
    /// One of a virtio-blk queue's I/O threads (large reads and writes run there side by side).
    BlockIo,
    /// The virtio-net worker.
    NetWorker,
    /// The virtio-rng worker.
    RngWorker,
    /// The virtio-vsock worker.
    VsockWorker,
    /// The child that outlives kvmbox to release the VM (`crates/vmm/src/exit.rs`).
    Releaser,
    /// Copies a helper program's messages (passt's stderr) to kvmbox's stderr.
    HelperOutput,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: &'static [ThreadKind] = &[
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::Api,
        ThreadKind::ApiConnection,
        ThreadKind::Signals,
        ThreadKind::Console,
        ThreadKind::Timer,
        ThreadKind::BlockWorker,
        ThreadKind::BlockIo,
        ThreadKind::NetWorker,
        ThreadKind::RngWorker,
        ThreadKind::VsockWorker,
        ThreadKind::Releaser,
        ThreadKind::HelperOutput,
    ];

    /// The kind's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Api => "api",
            ThreadKind::ApiConnection => "api-connection",
            ThreadKind::Signals => "signals",
            ThreadKind::Console => "console",
            ThreadKind::Timer => "timer",
            ThreadKind::BlockWorker => "virtio-blk",
            ThreadKind::BlockIo => "virtio-blk-io",
            ThreadKind::NetWorker => "virtio-net",
            ThreadKind::RngWorker => "virtio-rng",
            ThreadKind::VsockWorker => "virtio-vsock",
            ThreadKind::Releaser => "exit-child",
            ThreadKind::HelperOutput => "helper-output",
        }
    }

    /// The kinds of thread a thread of this kind may start (whose needs its filter must
    /// cover, see [`rules`]).
    fn starts(self) -> &'static [ThreadKind] {
        use ThreadKind::*;
        match self {
            Vmm => &[
                Vcpu,
                Api,
                Signals,
                Console,
                Timer,
                BlockWorker,
                BlockIo,
                NetWorker,
                RngWorker,
                VsockWorker,
                Releaser,
                HelperOutput,
            ],
            Vcpu => &[
                Timer,
                BlockWorker,
                BlockIo,
                NetWorker,
                RngWorker,
                VsockWorker,
            ],
            Api => &[ApiConnection],
            _ => &[],
        }
    }
}

/// What can go wrong setting up a filter.
#[derive(Debug)]
pub enum Error {
    /// seccompiler refused the rules (a bug in [`rules`]).
    Compile(seccompiler::Error),
    /// The kernel refused the filter or the SIGSYS handler.
    Install(std::io::Error),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Compile(e) => write!(f, "compiling a seccomp filter: {e}"),
            Error::Install(e) => write!(
                f,
                "installing a seccomp filter: {e} (--no-seccomp runs without filters)"
            ),
        }
    }
}

impl std::error::Error for Error {}

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turn the filters on for this process: from now on [`apply`] installs them. Installs the
/// SIGSYS handler that reports a violation.
pub fn enable() -> Result<(), Error> {
    sigsys::install_reporter().map_err(Error::Install)?;
    one_malloc_arena();
    ENABLED.store(true, Ordering::SeqCst);
    Ok(())
}

/// Whether [`enable`] was called.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// Install the filter of `kind` on the calling thread (and so on every thread it starts from
/// now on, under their own filters). Does nothing unless [`enable`] was called.
pub fn apply(kind: ThreadKind) -> Result<(), Error> {
    if !enabled() {
        return Ok(());
    }
    let deny_clone3 = deny_clone3()?;
    let filter = compile(kind)?;
    sigsys::set_thread_kind(kind.name());
    install(&deny_clone3, 0).map_err(Error::Install)?;
    install(&filter, libc::SECCOMP_FILTER_FLAG_LOG).map_err(Error::Install)
}

/// [`apply`] for a thread that has no way to report an error: on failure, say why and end
/// the process (status 1) rather than run unfiltered.
pub fn apply_or_exit(kind: ThreadKind) {
    if let Err(e) = apply(kind) {
        eprintln!("kvmbox: {} thread: {e}", kind.name());
        // SAFETY: _exit ends the process; nothing of this thread's state needs to survive.
        unsafe { libc::_exit(1) };
    }
}

/// A filter compiled ahead of time, to be installed where nothing may allocate (the exit
/// child, which shares the address space of a process whose other threads may hold the
/// allocator's locks).
pub struct PreparedFilter {
    program: BpfProgram,
}

impl PreparedFilter {
    /// The filter of `kind`, or `None` when the filters are off.
    pub fn new(kind: ThreadKind) -> Result<Option<Self>, Error> {
        if !enabled() {
            return Ok(None);
        }
        Ok(Some(Self {
            program: compile(kind)?,
        }))
    }

    /// Install it on the calling thread with raw system calls only; false if the kernel
    /// refused.
    pub fn install(&self) -> bool {
        install(&self.program, libc::SECCOMP_FILTER_FLAG_LOG).is_ok()
    }
}

/// One malloc arena for every thread (glibc's `M_ARENA_MAX` = 1; small blocks still come from
/// each thread's lock-free cache). With more, glibc reads files on whichever thread happens to
/// need them, under a filter without `openat`: /sys/devices/system/cpu/online the first time a
/// thread needs an arena beyond the first few, and /proc/sys/vm/overcommit_memory the first
/// time a thread's arena gives memory back (seen: a guest's virtio-net activation ended the VM
/// with SIGSYS). The one arena is the brk heap, which gives memory back with `brk` and reads
/// nothing; and no thread pays for an arena of its own (a heap mapping and its touched pages),
/// as with musl's single heap in Firecracker.
fn one_malloc_arena() {
    // SAFETY: mallopt only sets a malloc parameter; no allocation is in progress here.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
}

/// The BPF program of `kind`: its rules allowed, everything else trapped (SIGSYS).
fn compile(kind: ThreadKind) -> Result<BpfProgram, Error> {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as u64;
    let rules = rules::rules(kind, pid)
        .into_seccompiler()
        .map_err(|e| Error::Compile(e.into()))?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| Error::Compile(e.into()))?;
    BpfProgram::try_from(filter).map_err(|e| Error::Compile(e.into()))
}

/// A second filter beside every thread's: `clone3` fails with ENOSYS, so that glibc falls
/// back to `clone`, whose flags (unlike `clone3`'s, passed in memory) a filter can check.
fn deny_clone3() -> Result<BpfProgram, Error> {
    let filter = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(|e| Error::Compile(e.into()))?;
    BpfProgram::try_from(filter).map_err(|e| Error::Compile(e.into()))
}

/// `PR_SET_NO_NEW_PRIVS` then `seccomp(SECCOMP_SET_MODE_FILTER, flags, program)`: raw system
/// calls, no allocation.
fn install(program: &[seccompiler::sock_filter], flags: libc::c_ulong) -> std::io::Result<()> {
    let prog = libc::sock_fprog {
        len: u16::try_from(program.len())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::E2BIG))?,
        // seccompiler's sock_filter is the kernel's struct (code, jt, jf, k), as libc's.
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl with these arguments only sets this thread's no_new_privs bit.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `prog` points at `program`, which lives across the call; the kernel copies it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags,
            &prog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
