//! Kill signals as stop requests. SIGHUP, SIGINT, SIGQUIT and SIGTERM are blocked in every
//! kvmbox thread and taken by one thread with `sigwait`: the first asks the VM to stop
//! ([`ExitRequest::Signal`]), so the VMM tears the VM down as for any other stop, restores the
//! terminal (the [`RawTerminal`](crate::console::RawTerminal) guard) and exits with
//! [`EXIT_SIGNAL`](crate::EXIT_SIGNAL) after "terminating on signal N", as QEMU does. A second
//! signal while that runs restores the terminal and exits at once.

use crate::console::TerminalRestore;
use kvmbox_devices::{ExitRequest, VmControl};
use std::sync::Arc;

/// The signals that stop the VM.
pub const STOP_SIGNALS: [libc::c_int; 4] =
    [libc::SIGHUP, libc::SIGINT, libc::SIGQUIT, libc::SIGTERM];

/// The stop signals, blocked in the calling thread and so in every thread it starts after.
pub struct StopSignals {
    set: libc::sigset_t,
}

impl StopSignals {
    /// Block the stop signals in this thread. Call it before starting other threads: they
    /// inherit the mask, so no vCPU or device thread is ever interrupted by one of them.
    pub fn block() -> std::io::Result<Self> {
        let set = vmm_sys_util::signal::create_sigset(&STOP_SIGNALS)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        // SAFETY: `set` is an initialized sigset; the old mask is not wanted (null).
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        Ok(Self { set })
    }

    /// Start the thread that turns the signals into a stop request on `control`. It is not
    /// joined: it waits in `sigwait` for the life of the process.
    pub fn spawn_waiter(
        self,
        control: Arc<VmControl>,
        terminal: Option<TerminalRestore>,
    ) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                kvmbox_seccomp::apply_or_exit(kvmbox_seccomp::ThreadKind::Signals);
                let mut stopping = false;
                loop {
                    let mut sig: libc::c_int = 0;
                    // SAFETY: `self.set` is an initialized sigset and `sig` a valid out-param.
                    if unsafe { libc::sigwait(&self.set, &mut sig) } != 0 {
                        continue;
                    }
                    if stopping {
                        // The orderly stop did not finish: the user insists.
                        if let Some(t) = &terminal {
                            t.restore();
                        }
                        eprintln!("\r\nkvmbox: terminating at once on second signal {sig}");
                        // SAFETY: _exit ends the process without running other threads' code.
                        unsafe { libc::_exit(crate::EXIT_SIGNAL) };
                    }
                    stopping = true;
                    control.request(ExitRequest::Signal(sig));
                }
            })
            .map(|_| ())
    }
}

/// Say that the VM ended on `sig` (as QEMU does) and return kvmbox's exit status for it.
pub fn terminated(sig: i32) -> i32 {
    eprintln!(
        "\r\nkvmbox: terminating on signal {sig} ({})",
        signal_name(sig)
    );
    crate::EXIT_SIGNAL
}

/// The name of a stop signal, for messages.
fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}
