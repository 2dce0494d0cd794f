//! Reporting a seccomp violation: the filters answer a forbidden system call with SIGSYS
//! (`SECCOMP_RET_TRAP`); this handler writes which thread made which call to stderr, then lets
//! SIGSYS end the process as its default action does.

use std::cell::Cell;

thread_local! {
    /// The kind of filter the calling thread installed (for the message).
    static KIND: Cell<&'static str> = const { Cell::new("its creator's") };
}

/// `si_code` of a SIGSYS raised by seccomp.
const SYS_SECCOMP: libc::c_int = 1;

/// Remember the calling thread's filter kind for the message.
pub(crate) fn set_thread_kind(name: &'static str) {
    KIND.with(|k| k.set(name));
}

/// Install the handler for the whole process. It runs once (`SA_RESETHAND`): by the time it
/// raises SIGSYS again, the default action (end the process, dumping core where allowed) is
/// back in place.
pub(crate) fn install_reporter() -> std::io::Result<()> {
    // SAFETY: sigaction is plain data, filled in below before use.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = report as *const () as libc::sighandler_t;
    act.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND | libc::SA_NODEFER;
    // SAFETY: `act.sa_mask` is a valid sigset to empty; `act` is initialized and the old
    // action is not wanted.
    let rc = unsafe {
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The system call number of a seccomp SIGSYS (`si_syscall`, which libc does not name):
/// `siginfo_t`'s union starts at byte 16 on x86-64, and its `_sigsys` member holds the
/// caller's address (8 bytes) then the call number.
///
/// # Safety
/// `info` must point at the siginfo_t of a SIGSYS with `si_code == SYS_SECCOMP`.
unsafe fn seccomp_syscall(info: *const libc::siginfo_t) -> libc::c_int {
    // SAFETY: per the contract, the kernel filled `_sigsys` at this offset of a siginfo_t,
    // which is 128 bytes long.
    unsafe {
        info.cast::<u8>()
            .add(24)
            .cast::<libc::c_int>()
            .read_unaligned()
    }
}

extern "C" fn report(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // Only async-signal-safe work here: no allocation, no locks; a message built on the stack.
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    if code == SYS_SECCOMP {
        let mut msg = Message::default();
        msg.push(b"\r\nkvmbox: seccomp: thread ");
        let mut name = [0u8; 16];
        // SAFETY: PR_GET_NAME writes at most 16 bytes (NUL included) into `name`; every
        // filter allows it.
        if unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) } == 0 {
            let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            msg.push(&name[..len]);
        }
        msg.push(b" (tid ");
        // SAFETY: gettid has no preconditions (and every filter allows it).
        msg.push_number(i64::from(unsafe { libc::gettid() }));
        msg.push(b", ");
        msg.push(KIND.with(Cell::get).as_bytes());
        msg.push(b" filter) made system call ");
        // SAFETY: a SIGSYS with si_code SYS_SECCOMP, as checked above.
        msg.push_number(i64::from(unsafe { seccomp_syscall(info) }));
        msg.push(
            b", which its filter does not allow: ending the process with SIGSYS \
              (see SECURITY.md; --no-seccomp turns the filters off)\r\n",
        );
        // SAFETY: write(2) of a buffer on this stack; a failure leaves nothing to do.
        unsafe { libc::write(libc::STDERR_FILENO, msg.buf.as_ptr().cast(), msg.len) };
    }
    // The handler is reset to the default action: SIGSYS now ends the process. If this
    // thread's filter forbids the tgkill that raise() makes (every kvmbox filter does, for
    // SIGSYS), the kernel's answer is that same SIGSYS, with the same effect.
    // SAFETY: raise is async-signal-safe.
    unsafe { libc::raise(libc::SIGSYS) };
}

/// A fixed buffer for the handler's message.
struct Message {
    buf: [u8; 256],
    len: usize,
}

impl Default for Message {
    fn default() -> Self {
        Self {
            buf: [0; 256],
            len: 0,
        }
    }
}

impl Message {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, n: i64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if n < 0 {
            self.push(b"-");
        }
        self.push(&digits[i..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_numbers() {
        let mut m = Message::default();
        m.push_number(0);
        m.push(b" ");
        m.push_number(41);
        m.push(b" ");
        m.push_number(-7);
        assert_eq!(&m.buf[..m.len], b"0 41 -7");
    }
}
