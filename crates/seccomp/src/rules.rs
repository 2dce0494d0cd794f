//! What each kind of kvmbox thread may do: the one place where the filters are written.
//!
//! A thread's filter is what it does itself ([`own`]) plus everything the threads it starts
//! need ([`ThreadKind::starts`]): a thread inherits its creator's filter and then installs
//! its own, and the kernel lets a system call through only when every filter of the thread
//! allows it, so a creator must allow at least what its children do. vCPU threads start the
//! virtio workers and the PIT/RTC timer threads (when the guest first drives the device), so
//! their filter holds the block worker's file I/O too; each of those threads then narrows
//! itself to its own filter as it starts.
//!
//! The lists come from `strace -f` of real runs (the test guest on KVM and on the engine with
//! every device, snapshots saved and restored on both, the API, Linux on the engine) and from
//! reading the code paths that those runs did not reach (TAP offloads, terminal restore).

use crate::ioctls;
use crate::ThreadKind;
use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
use std::collections::BTreeMap;

/// The flags Rust's `std::thread` (glibc `pthread_create`) passes to `clone` for a thread.
pub(crate) const THREAD_CLONE_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SETTLS
    | libc::CLONE_PARENT_SETTID
    | libc::CLONE_CHILD_CLEARTID) as u64;

/// The flags of the exit child's `clone` (`crates/vmm/src/exit.rs`): same address space, a
/// process of its own.
pub(crate) const RELEASER_CLONE_FLAGS: u64 = (libc::CLONE_VM | libc::SIGCHLD) as u64;

/// One condition on argument `arg` (a 64-bit compare).
#[derive(Clone, Copy)]
struct Arg {
    index: u8,
    op: Op,
    value: u64,
}

#[derive(Clone, Copy)]
enum Op {
    Eq,
    /// The bits of the mask are all clear.
    Clear,
}

fn arg(index: u8, value: u64) -> Arg {
    Arg {
        index,
        op: Op::Eq,
        value,
    }
}

fn clear(index: u8, mask: u64) -> Arg {
    Arg {
        index,
        op: Op::Clear,
        value: mask,
    }
}

/// A set of allowed system calls, each either unconditional or allowed when one of its
/// alternatives (a list of argument conditions that must all hold) matches.
#[derive(Clone, Default)]
pub(crate) struct Rules {
    calls: BTreeMap<i64, Option<Vec<Vec<Arg>>>>,
}

impl Rules {
    /// Allow `calls` whatever their arguments.
    fn allow(mut self, calls: &[libc::c_long]) -> Self {
        for &c in calls {
            self.calls.insert(c, None);
        }
        self
    }

    /// Allow `call` when all of `args` hold (in addition to what was allowed before).
    fn allow_if(mut self, call: libc::c_long, args: &[Arg]) -> Self {
        // Nothing to add to a call already allowed whatever its arguments.
        if let Some(alternatives) = self.calls.entry(call).or_insert_with(|| Some(Vec::new())) {
            alternatives.push(args.to_vec());
        }
        self
    }

    /// Allow `ioctl` with each of the request numbers `requests`.
    fn ioctls(self, requests: &[u64]) -> Self {
        requests
            .iter()
            .fold(self, |r, &req| r.allow_if(libc::SYS_ioctl, &[request(req)]))
    }

    /// Everything either set allows.
    pub(crate) fn union(mut self, other: Rules) -> Self {
        for (call, alternatives) in other.calls {
            match alternatives {
                None => {
                    self.calls.insert(call, None);
                }
                Some(alts) => {
                    for a in alts {
                        self = self.allow_if(call, &a);
                    }
                }
            }
        }
        self
    }

    /// Whether `call` is allowed with some arguments (for tests).
    #[cfg(test)]
    pub(crate) fn mentions(&self, call: libc::c_long) -> bool {
        self.calls.contains_key(&call)
    }

    /// Whether every call `other` allows is allowed here at least as widely (for tests:
    /// a creator's filter must cover its children's).
    #[cfg(test)]
    pub(crate) fn covers(&self, other: &Rules) -> bool {
        other
            .calls
            .iter()
            .all(|(call, alts)| match (self.calls.get(call), alts) {
                (Some(None), _) => true,
                (Some(Some(mine)), Some(theirs)) => theirs.iter().all(|t| {
                    mine.iter().any(|m| {
                        m.len() == t.len()
                            && m.iter().zip(t).all(|(a, b)| {
                                a.index == b.index && a.value == b.value && a.op as u8 == b.op as u8
                            })
                    })
                }),
                _ => false,
            })
    }

    /// The rules in seccompiler's form.
    pub(crate) fn into_seccompiler(
        self,
    ) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
        let mut out = BTreeMap::new();
        for (call, alternatives) in self.calls {
            let rules = match alternatives {
                None => Vec::new(),
                Some(alts) => alts
                    .into_iter()
                    .map(|conds| {
                        SeccompRule::new(
                            conds
                                .into_iter()
                                .map(|a| {
                                    let (len, op) = match a.op {
                                        // ioctl request numbers are 32-bit in the kernel.
                                        Op::Eq if a.value <= u64::from(u32::MAX) => {
                                            (SeccompCmpArgLen::Dword, SeccompCmpOp::Eq)
                                        }
                                        Op::Eq => (SeccompCmpArgLen::Qword, SeccompCmpOp::Eq),
                                        Op::Clear => (
                                            SeccompCmpArgLen::Qword,
                                            SeccompCmpOp::MaskedEq(a.value),
                                        ),
                                    };
                                    let value = if matches!(a.op, Op::Clear) {
                                        0
                                    } else {
                                        a.value
                                    };
                                    SeccompCondition::new(a.index, len, op, value)
                                })
                                .collect::<Result<Vec<_>, _>>()?,
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            };
            out.insert(call, rules);
        }
        Ok(out)
    }
}

fn request(number: u64) -> Arg {
    arg(1, number)
}

/// Every kvmbox thread: memory (never executable; vCPUs add read-execute for the JIT), locks, its own signals and time, writing
/// (stderr, eventfds), ending, starting a child with its own filter, and kicking the vCPUs
/// out of guest code (any thread that asks the VM to stop does: `VmControl::request`).
fn base(pid: u64) -> Rules {
    use libc::*;
    Rules::default()
        .allow(&[
            SYS_brk,
            SYS_munmap,
            SYS_mremap,
            SYS_madvise,
            SYS_futex,
            SYS_sched_yield,
            SYS_sched_getaffinity,
            SYS_set_robust_list,
            SYS_rseq,
            SYS_rt_sigprocmask,
            SYS_rt_sigreturn,
            SYS_sigaltstack,
            SYS_clock_gettime,
            SYS_clock_nanosleep,
            SYS_nanosleep,
            SYS_restart_syscall,
            SYS_gettid,
            SYS_getpid,
            SYS_getrandom,
            SYS_write,
            SYS_close,
            SYS_exit,
            SYS_exit_group,
        ])
        .allow_if(SYS_mmap, &[clear(2, PROT_EXEC as u64)])
        .allow_if(SYS_mprotect, &[clear(2, PROT_EXEC as u64)])
        .allow_if(SYS_prctl, &[arg(0, PR_SET_NAME as u64)])
        .allow_if(SYS_prctl, &[arg(0, PR_GET_NAME as u64)])
        .allow_if(SYS_prctl, &[arg(0, PR_SET_NO_NEW_PRIVS as u64)])
        .allow_if(SYS_seccomp, &[arg(0, SECCOMP_SET_MODE_FILTER as u64)])
        .union(kicks_vcpus(pid))
}

/// Starting threads. `clone3` passes its flags in memory, out of a filter's reach: it is
/// answered ENOSYS (see `crate::deny_clone3`) and glibc falls back to `clone`, whose flags
/// are checked.
fn spawns_threads() -> Rules {
    Rules::default()
        .allow(&[libc::SYS_clone3])
        .allow_if(libc::SYS_clone, &[arg(0, THREAD_CLONE_FLAGS)])
}

/// Interrupting a vCPU of this process (KVM's kick: the first real-time signal).
fn kicks_vcpus(pid: u64) -> Rules {
    Rules::default().allow_if(
        libc::SYS_tgkill,
        &[arg(0, pid), arg(2, libc::SIGRTMIN() as u64)],
    )
}

/// Raising a guest interrupt: an MSI into KVM (and the MSI-X route it takes); an eventfd
/// write (irqfd) or a kick of a vCPU are in every filter.
fn raises_interrupts() -> Rules {
    Rules::default().ioctls(&ioctls::kvm_interrupts())
}

/// A virtio device worker: waits on its epoll set of eventfds (queue notifications, its stop
/// event) and the device's descriptors.
fn device_worker() -> Rules {
    use libc::*;
    Rules::default()
        .allow(&[SYS_epoll_wait, SYS_epoll_pwait, SYS_epoll_ctl, SYS_read])
        // The rate limiter's timer: armed when it holds a request back, read when it fires.
        .allow(&[SYS_timerfd_settime])
        .union(raises_interrupts())
}

/// What the block backends do on an open image: vectored reads and writes, syncs, discards and
/// write-zeroes, file metadata.
fn image_io() -> Rules {
    use libc::*;
    Rules::default()
        .allow(&[
            SYS_pread64,
            SYS_pwrite64,
            SYS_preadv,
            SYS_pwritev,
            SYS_preadv2,
            SYS_pwritev2,
            SYS_fsync,
            SYS_fdatasync,
            SYS_fallocate,
            SYS_ftruncate,
        ])
        .union(file_metadata())
}

/// Reading a file's metadata (`File::metadata`, sizes of images).
fn file_metadata() -> Rules {
    use libc::*;
    Rules::default().allow(&[SYS_fstat, SYS_newfstatat, SYS_statx, SYS_lseek])
}

/// What a thread of `kind` does itself.
fn own(kind: ThreadKind) -> Rules {
    use libc::*;
    match kind {
        // The control loop: builds and rebuilds machines (boot, reboot, snapshot restore,
        // the API's instance start), saves snapshots, opens images and TAP devices, serves
        // the API's requests, restores the terminal, and ends the process through the exit
        // child. The accelerator probe of `--accel auto` runs here too (KVM_RUN, its cache
        // file).
        ThreadKind::Vmm => Rules::default()
            // Stopping the passt a user network started (at the VM's end).
            .allow_if(SYS_kill, &[arg(1, SIGKILL as u64)])
            .allow_if(SYS_wait4, &[arg(2, 0)])
            .allow(&[
                SYS_openat,
                SYS_read,
                SYS_readv,
                SYS_writev,
                SYS_pread64,
                SYS_pwrite64,
                SYS_preadv,
                SYS_pwritev,
                SYS_ftruncate,
                SYS_fallocate,
                SYS_fsync,
                SYS_fdatasync,
                SYS_fstatfs,
                SYS_getdents64,
                SYS_access,
                SYS_readlink,
                SYS_getcwd,
                SYS_mkdir,
                SYS_mkdirat,
                SYS_rename,
                SYS_renameat,
                SYS_renameat2,
                SYS_unlink,
                SYS_unlinkat,
                SYS_eventfd2,
                SYS_epoll_create1,
                // Rate limiters' timers: made with their devices, fired by live updates.
                SYS_timerfd_create,
                SYS_timerfd_settime,
                SYS_poll,
                SYS_ppoll,
                SYS_pipe2,
                SYS_close_range,
                SYS_prlimit64,
                SYS_bind,
                SYS_listen,
                SYS_uname,
            ])
            .union(file_metadata())
            .allow_if(SYS_socket, &[arg(0, AF_UNIX as u64)])
            .allow_if(SYS_rt_sigaction, &[arg(0, SIGRTMIN() as u64)])
            // glibc's own SIGCANCEL and SIGSETXID (the first two real-time signals), whose
            // handlers it installs when the process starts its first thread.
            .allow_if(SYS_rt_sigaction, &[arg(0, 32)])
            .allow_if(SYS_rt_sigaction, &[arg(0, 33)])
            .allow_if(SYS_clone, &[arg(0, RELEASER_CLONE_FLAGS)])
            .allow_if(SYS_fcntl, &[arg(1, F_GETFL as u64)])
            .allow_if(SYS_fcntl, &[arg(1, F_SETFL as u64)])
            .allow_if(SYS_fcntl, &[arg(1, F_GETFD as u64)])
            .allow_if(SYS_fcntl, &[arg(1, F_SETFD as u64)])
            .allow_if(SYS_fcntl, &[arg(1, F_DUPFD_CLOEXEC as u64)])
            .allow_if(SYS_fcntl, &[arg(1, F_OFD_GETLK as u64)])
            .allow_if(SYS_fcntl, &[arg(1, F_OFD_SETLK as u64)])
            .ioctls(&ioctls::kvm_setup())
            .ioctls(&ioctls::kvm_vcpu())
            .ioctls(&ioctls::kvm_guest_programmed())
            .ioctls(&ioctls::kvm_interrupts())
            .ioctls(&[
                ioctls::TCGETS,
                ioctls::TCSETS,
                ioctls::TUNSETIFF,
                ioctls::TUNSETVNETHDRSZ,
                ioctls::TUNSETOFFLOAD,
                ioctls::BLKGETSIZE64,
            ])
            .union(spawns_threads()),
        // Runs the guest: KVM_RUN and its own registers on KVM (nothing of KVM on the
        // engine, which has no KVM descriptor), the guest's port and MMIO accesses into the
        // devices (interrupt routes, eventfds of moved BARs, TAP offloads the guest
        // negotiated), kicks of the other vCPUs, and the start of device workers (their
        // epoll set and eventfds).
        ThreadKind::Vcpu => Rules::default()
            .allow(&[SYS_read, SYS_eventfd2, SYS_epoll_create1, SYS_epoll_ctl])
            .allow_if(SYS_fcntl, &[arg(1, F_DUPFD_CLOEXEC as u64)])
            .allow_if(SYS_rt_sigaction, &[arg(0, SIGRTMIN() as u64)])
            .ioctls(&ioctls::kvm_vcpu())
            .ioctls(&ioctls::kvm_guest_programmed())
            .ioctls(&[ioctls::TUNSETOFFLOAD])
            .union(raises_interrupts())
            .union(spawns_threads())
            // The engine's JIT maps a page of its code cache read-execute once it has copied
            // code in (never writable and executable at once; `crates/emu/src/jit.rs`).
            .allow_if(SYS_mprotect, &[arg(2, (PROT_READ | PROT_EXEC) as u64)]),
        // The accept loop of the API socket: one thread per connection.
        ThreadKind::Api => Rules::default()
            .allow(&[SYS_accept4, SYS_accept])
            .union(spawns_threads()),
        // One API connection: HTTP over the accepted socket; requests go to the VMM thread
        // through a channel and an eventfd.
        ThreadKind::ApiConnection => {
            Rules::default().allow(&[SYS_read, SYS_recvfrom, SYS_sendto, SYS_writev, SYS_shutdown])
        }
        // sigwait for the stop signals; restores the terminal on a second one.
        ThreadKind::Signals => Rules::default()
            .allow(&[SYS_rt_sigtimedwait])
            .allow_if(SYS_ioctl, &[arg(0, 0), request(ioctls::TCSETS)]),
        // Reads stdin (descriptor 0 only) into the UART, which may interrupt the guest.
        ThreadKind::Console => Rules::default()
            .allow_if(SYS_read, &[arg(0, 0)])
            .union(raises_interrupts()),
        // The PIT's and RTC's timer threads: sleep to the next deadline, raise the IRQ.
        ThreadKind::Timer => raises_interrupts(),
        // virtio-blk: vectored I/O on its image, flushes, discards and write-zeroes.
        ThreadKind::BlockWorker => image_io().union(device_worker()),
        // A virtio-blk I/O thread: waits on a condition variable (futex) for large reads and
        // writes, tells the worker through an eventfd (write); no epoll, no interrupt, no
        // `read`. The image's calls are the worker's (a qcow2 write may allocate, grow the
        // file and write back metadata tables).
        ThreadKind::BlockIo => image_io(),
        // virtio-net: frames to and from the TAP device.
        // TAP: readv/writev; passt's stream socket: recvfrom/sendmsg, and passt's exit status
        // once its socket closed (wait4 without waiting).
        ThreadKind::NetWorker => Rules::default()
            .allow(&[SYS_readv, SYS_writev, SYS_recvfrom, SYS_sendmsg])
            .allow_if(SYS_wait4, &[arg(2, WNOHANG as u64)])
            .union(device_worker()),
        // virtio-rng: getrandom (in every filter) into the guest's buffers.
        ThreadKind::RngWorker => device_worker(),
        // virtio-vsock: accepts host connections on its listening Unix socket, connects
        // (without blocking) to the Unix sockets the guest's connections go to, and moves
        // their data; `socket` for Unix sockets only, so `connect` reaches nothing else.
        ThreadKind::VsockWorker => Rules::default()
            // std's UnixStream writes with send(MSG_NOSIGNAL): sendto.
            .allow(&[
                SYS_accept4,
                SYS_connect,
                SYS_recvfrom,
                SYS_sendto,
                SYS_shutdown,
            ])
            .allow_if(
                SYS_socket,
                &[
                    arg(0, AF_UNIX as u64),
                    arg(1, (SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC) as u64),
                ],
            )
            .union(device_worker()),
        // Handled by `releaser_rules`: it runs on no Rust runtime at all.
        ThreadKind::Releaser => Rules::default(),
        // Reads the helper's pipe and writes each line to stderr.
        ThreadKind::HelperOutput => Rules::default().allow(&[libc::SYS_read]),
    }
}

/// The exit child (`crates/vmm/src/exit.rs`) only closes a descriptor, waits in `read` and
/// exits (it is alone in its process: `exit_group` is the same): nothing of [`base`].
fn releaser_rules() -> Rules {
    Rules::default().allow(&[
        libc::SYS_close,
        libc::SYS_read,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ])
}

/// The whole filter of a thread of `kind`: its own rules and its children's.
pub(crate) fn rules(kind: ThreadKind, pid: u64) -> Rules {
    if kind == ThreadKind::Releaser {
        return releaser_rules();
    }
    kind.starts()
        .iter()
        .fold(base(pid).union(own(kind)), |r, &child| {
            r.union(rules(child, pid))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_creator_covers_the_threads_it_starts() {
        for &kind in ThreadKind::ALL {
            let mine = rules(kind, 42);
            for &child in kind.starts() {
                assert!(
                    mine.covers(&rules(child, 42)),
                    "{kind:?} does not allow all that {child:?} does"
                );
            }
        }
    }

    #[test]
    fn only_the_vmm_thread_opens_files_or_builds_vms() {
        for &kind in ThreadKind::ALL {
            let r = rules(kind, 42);
            assert_eq!(
                r.mentions(libc::SYS_openat),
                kind == ThreadKind::Vmm,
                "{kind:?}"
            );
            assert!(!r.mentions(libc::SYS_execve), "{kind:?}");
            // Only the vsock worker connects (to Unix sockets), and so the threads that
            // start it.
            assert_eq!(
                r.mentions(libc::SYS_connect),
                matches!(
                    kind,
                    ThreadKind::VsockWorker | ThreadKind::Vcpu | ThreadKind::Vmm
                ),
                "{kind:?}"
            );
        }
        let kvm_create = Rules::default().ioctls(&[ioctls::KVM_CREATE_VM()]);
        assert!(rules(ThreadKind::Vmm, 42).covers(&kvm_create));
        assert!(!rules(ThreadKind::Vcpu, 42).covers(&kvm_create));
    }
}
