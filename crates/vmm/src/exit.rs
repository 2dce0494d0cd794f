//! Ending the kvmbox process once its VM has ended, without making the caller wait for the
//! kernel's teardown of that VM.
//!
//! When the last user of an address space that held a KVM VM goes away, the kernel tears the
//! VM down: it waits for SRCU grace periods (`mmu_notifier_unregister` in `kvm_destroy_vm`,
//! and `__mmu_notifier_release` when the address space is torn down), stops the VM's
//! NX-huge-page recovery thread and frees guest memory. That takes ~1 ms on an idle host and
//! 5-30 ms on a busy one (the grace periods wait for kernel workers that must be scheduled),
//! and a process's parent sees it exit only after all of it. Nothing of kvmbox's result
//! depends on it, so at the end kvmbox:
//! 1. has stopped its vCPUs and dropped its devices (so disk images and TAP devices are
//!    closed, and the terminal restored) and flushes its output;
//! 2. closes every file descriptor except the VM's (the callers waiting for end-of-file on
//!    its output see it now);
//! 3. starts a child that shares its address space (`clone(CLONE_VM)`) and holds the VM's
//!    descriptor, and exits. The child waits until kvmbox is gone (a pipe whose write end
//!    only kvmbox holds), then exits too: as the address space's and the VM's last user, it is
//!    the one that runs the kernel's teardown. The child inherits the VMM thread's seccomp
//!    filter and narrows itself at once to its own (`close`, `read`, `exit`), compiled by
//!    kvmbox before the `clone` since the child must not allocate.
//!
//! Where any of that cannot be done (an old kernel without `close_range`, no process left to
//! start), kvmbox exits plainly and the teardown happens in its own exit.

use std::io::Write;
use std::os::fd::RawFd;

/// The child's stack: it only closes a descriptor and waits in `read`.
const RELEASER_STACK: usize = 16 << 10;

/// Flush stdout and stderr, hand the release of the kernel objects behind `keep` (and of the
/// address space) to a child process as described above, and exit with `status`.
pub(crate) fn exit_leaving_release(status: i32, keep: &[RawFd]) -> ! {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    if !keep.is_empty() && close_all_but(keep) {
        spawn_releaser();
    }
    // SAFETY: _exit ends the process; no other thread's state needs to be looked after (the
    // vCPUs and devices are stopped, output is flushed).
    unsafe { libc::_exit(status) }
}

/// Close every descriptor but `keep`; false if the kernel could not do it.
fn close_all_but(keep: &[RawFd]) -> bool {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter_map(|&fd| u32::try_from(fd).ok())
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut first = 0u32;
    for k in keep {
        if k > first && !close_range(first, k - 1) {
            return false;
        }
        first = k + 1;
    }
    close_range(first, u32::MAX)
}

fn close_range(first: u32, last: u32) -> bool {
    // SAFETY: close_range only closes descriptors of this process; none of the ones closed
    // here is used again (the process exits right after).
    unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) == 0 }
}

/// Start the child that outlives kvmbox (see the module docs). Failures leave the teardown
/// to kvmbox's own exit.
fn spawn_releaser() {
    let mut fds = [-1; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return;
    }
    let [read_end, write_end] = fds;
    // A filter that cannot be compiled leaves the child under the VMM thread's.
    let filter = kvmbox_seccomp::PreparedFilter::new(kvmbox_seccomp::ThreadKind::Releaser)
        .ok()
        .flatten();
    // The process ends in a moment and the child needs its stack and arguments until it
    // exits: leaked.
    let stack = Box::leak(vec![0u8; RELEASER_STACK].into_boxed_slice());
    let top = stack.as_mut_ptr_range().end as usize & !15;
    let args = Box::leak(Box::new(ReleaserArgs {
        read_end,
        write_end,
        filter,
    }));
    let arg = (args as *mut ReleaserArgs).cast::<libc::c_void>();
    // SAFETY: the child shares this address space and runs `releaser` on its own stack
    // (`top`, 16-byte aligned, leaked so it stays valid); `releaser` makes only raw system
    // calls, so it touches no lock or allocator state that a thread of this process may hold.
    // Without CLONE_THREAD, CLONE_FILES or CLONE_SIGHAND it is a process of its own with a copy
    // of the descriptor table (the VM's descriptor and the pipe).
    unsafe {
        libc::clone(
            releaser,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::SIGCHLD,
            arg,
        );
        libc::close(read_end);
    }
}

/// What the child gets: the pipe's two ends and its seccomp filter.
struct ReleaserArgs {
    read_end: RawFd,
    write_end: RawFd,
    filter: Option<kvmbox_seccomp::PreparedFilter>,
}

/// The child: keep the address space and the VM until kvmbox has exited (its exit closes the
/// pipe's write end), then exit and so release them.
extern "C" fn releaser(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the leaked `ReleaserArgs` of `spawn_releaser`, never freed.
    let args = unsafe { &*arg.cast::<ReleaserArgs>() };
    if let Some(f) = &args.filter {
        // Raw system calls only; a refusal leaves the inherited filter in place.
        f.install();
    }
    let (read_end, write_end) = (
        libc::c_long::from(args.read_end),
        libc::c_long::from(args.write_end),
    );
    let mut byte = 0u8;
    // SAFETY: raw system calls on this process's own copies of the pipe's descriptors; `byte`
    // is on this child's stack. A read that ends early (a signal) only means the teardown may
    // happen in kvmbox's exit after all.
    unsafe {
        libc::syscall(libc::SYS_close, write_end);
        libc::syscall(libc::SYS_read, read_end, &mut byte as *mut u8, 1usize);
    }
    0
}
