//! How devices ask the VMM to end or restart the VM.

use std::sync::Mutex;
use vmm_sys_util::eventfd::EventFd;

/// Why the guest wants the VM to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitRequest {
    /// ACPI power-off or equivalent: exit status 0.
    PowerOff,
    /// Reset (i8042 pulse, ACPI reset register, triple fault).
    Reset,
    /// isa-debug-exit style: the guest wrote this byte to the debug-exit port.
    DebugExit(u8),
    /// The user quit from the console (Ctrl-A x).
    UserQuit,
    /// A vCPU stopped on an error it cannot continue from.
    Error,
    /// kvmbox received this stop signal (SIGTERM, SIGINT, SIGHUP, SIGQUIT).
    Signal(i32),
}

/// Shared between devices, vCPU threads and the VMM thread. The first request wins; the
/// event fd wakes whoever waits for the VM to end.
pub struct VmControl {
    request: Mutex<Option<ExitRequest>>,
    event: EventFd,
}

impl VmControl {
    /// A control with no request pending.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            request: Mutex::new(None),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Ask the VMM to stop the VM. Later requests do not override the first.
    pub fn request(&self, req: ExitRequest) {
        let mut r = self.request.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(req);
        }
        // A failed write only happens when the counter would overflow: someone already woke.
        let _ = self.event.write(1);
    }

    /// The pending request, if any.
    pub fn pending(&self) -> Option<ExitRequest> {
        *self.request.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forget the pending request (after a reset that restarts the VM).
    pub fn clear(&self) {
        *self.request.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let _ = self.event.read();
    }

    /// The fd that becomes readable when a request is made.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}
