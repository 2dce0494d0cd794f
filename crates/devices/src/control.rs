//! How devices ask the VMM to end or restart the VM.

use kvmbox_cpu::VcpuKicker;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
/// event fd wakes whoever waits for the VM to end, and the VM's vCPUs are kicked out of guest
/// code at once (a vCPU thread that finds a request pending ends by itself, so it is usually
/// gone by the time the VMM thread, woken, stops the VM).
///
/// It also carries ACPI S3: the PM block [`VmControl::suspend`]s (every vCPU leaves guest code
/// and waits, the VMM wakes and keeps them paused), a wake event [`VmControl::wake`]s, and the
/// VMM restarts the vCPUs at the guest's waking vector and calls [`VmControl::resumed`].
pub struct VmControl {
    request: Mutex<Option<ExitRequest>>,
    event: EventFd,
    kickers: Mutex<Vec<Arc<dyn VcpuKicker>>>,
    asleep: AtomicBool,
    wake: AtomicBool,
    wakes: AtomicU64,
}

impl VmControl {
    /// A control with no request pending.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            request: Mutex::new(None),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
            kickers: Mutex::new(Vec::new()),
            asleep: AtomicBool::new(false),
            wake: AtomicBool::new(false),
            wakes: AtomicU64::new(0),
        })
    }

    /// The kickers of the running VM's vCPUs (replacing those of an earlier VM).
    pub fn set_kickers(&self, kickers: Vec<Arc<dyn VcpuKicker>>) {
        *self.kickers.lock().unwrap_or_else(|e| e.into_inner()) = kickers;
    }

    /// Ask the VMM to stop the VM. Later requests do not override the first.
    pub fn request(&self, req: ExitRequest) {
        let first = {
            let mut r = self.request.lock().unwrap_or_else(|e| e.into_inner());
            let first = r.is_none();
            if first {
                *r = Some(req);
            }
            first
        };
        // A failed write only happens when the counter would overflow: someone already woke.
        let _ = self.event.write(1);
        if first {
            self.kick_all();
        }
    }

    /// The guest entered S3: every vCPU stops running guest code (it is kicked now and waits
    /// for the VMM's commands) and the VMM is woken to pause them.
    pub fn suspend(&self) {
        self.wake.store(false, Ordering::SeqCst);
        self.asleep.store(true, Ordering::SeqCst);
        let _ = self.event.write(1);
        self.kick_all();
    }

    /// Whether the guest is in S3 (from [`VmControl::suspend`] to [`VmControl::resumed`]).
    pub fn asleep(&self) -> bool {
        self.asleep.load(Ordering::SeqCst)
    }

    /// A wake event while the guest is in S3: the VMM restarts it.
    pub fn wake(&self) {
        if self.asleep() {
            self.wake.store(true, Ordering::SeqCst);
            let _ = self.event.write(1);
        }
    }

    /// Take a pending wake event (the VMM, which then restarts the vCPUs).
    pub fn take_wake(&self) -> bool {
        self.wake.swap(false, Ordering::SeqCst)
    }

    /// The VMM restarted the guest after S3.
    pub fn resumed(&self) {
        self.wakes.fetch_add(1, Ordering::SeqCst);
        self.asleep.store(false, Ordering::SeqCst);
    }

    /// How many times the guest woke from S3 (a vCPU that halted for good runs again after
    /// one: the wake restarted it).
    pub fn wakes(&self) -> u64 {
        self.wakes.load(Ordering::SeqCst)
    }

    fn kick_all(&self) {
        for k in self
            .kickers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            k.kick();
        }
    }

    /// The pending request, if any.
    pub fn pending(&self) -> Option<ExitRequest> {
        *self.request.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forget the pending request (after a reset that restarts the VM).
    pub fn clear(&self) {
        *self.request.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.asleep.store(false, Ordering::SeqCst);
        self.wake.store(false, Ordering::SeqCst);
        let _ = self.event.read();
    }

    /// The fd that becomes readable when a request is made.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}
