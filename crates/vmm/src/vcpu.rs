//! vCPU threads and the commands the control loop sends them.
//!
//! Each vCPU runs on a host thread of its own, which owns its [`Vcpu`]. The control loop talks
//! to a thread through its [`VcpuHandle`]: it queues a [`VcpuCommand`] and kicks the vCPU out of
//! guest code ([`VcpuKicker`]); the thread takes the command when `run` returns
//! [`VcpuExit::Kicked`] and acknowledges it. So when [`VcpuHandle::pause`] returns, that vCPU
//! runs no guest code until it is resumed. Work that must happen on the vCPU's own thread (KVM
//! wants its vCPU ioctls there) travels as a [`VcpuTask`] and runs only while it is paused.

use kvmbox_cpu::{Vcpu, VcpuExit, VcpuKicker};
use kvmbox_devices::{ExitRequest, IoBus, VmControl};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Work run on a vCPU's own thread while it is paused (reading or writing its state).
pub type VcpuTask = Box<dyn FnOnce(&mut dyn Vcpu) + Send>;

/// What the control loop asks of a vCPU thread.
pub enum VcpuCommand {
    /// Stop running guest code; acknowledge with [`VcpuAck::Paused`].
    Pause,
    /// Run guest code again; acknowledge with [`VcpuAck::Resumed`].
    Resume,
    /// Run this task on the vCPU's thread (only while paused); it replies through its own channel.
    Run(VcpuTask),
    /// Leave the thread (the VM is stopping).
    Finish,
}

/// A vCPU thread's answer to [`VcpuCommand::Pause`] and [`VcpuCommand::Resume`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuAck {
    /// It runs no guest code.
    Paused,
    /// It runs guest code again.
    Resumed,
}

/// Why a command to a vCPU thread did not complete.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The thread has ended (the guest stopped or the vCPU failed).
    #[error("vCPU {0} has stopped")]
    Gone(usize),
    /// The thread did not answer in time.
    #[error("vCPU {0} did not answer within {1:?}")]
    Timeout(usize, Duration),
}

/// How long a vCPU thread may take to acknowledge a command. A vCPU leaves guest code within
/// microseconds of a kick (the engine checks its kick flag every few thousand instructions and
/// every millisecond while halted); this margin covers a loaded host.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// The control loop's end of one vCPU thread.
pub struct VcpuHandle {
    id: usize,
    commands: Sender<VcpuCommand>,
    acks: Receiver<VcpuAck>,
    kicker: Arc<dyn VcpuKicker>,
    thread: Option<JoinHandle<()>>,
}

/// What every vCPU thread of one VM shares.
#[derive(Clone)]
pub struct VcpuShared {
    /// Devices.
    pub io: Arc<IoBus>,
    /// Where a vCPU asks the VMM to stop the VM.
    pub control: Arc<VmControl>,
    /// How many vCPUs halted for good (with interrupts disabled).
    pub halted: Arc<AtomicUsize>,
    /// How many vCPUs the VM has.
    pub count: usize,
    /// The host CPUs each vCPU thread may run on (`--cpu-affinity`).
    pub affinity: Arc<crate::limits::Affinity>,
}

impl VcpuHandle {
    /// Start vCPU `id`'s thread. It runs guest code right away unless `paused`. `filtered`,
    /// if given, is dropped once the thread has its seccomp filter (or has given up), just
    /// before it runs guest code.
    pub fn spawn(
        id: usize,
        vcpu: Box<dyn Vcpu>,
        shared: VcpuShared,
        paused: bool,
        filtered: Option<Sender<()>>,
    ) -> std::io::Result<Self> {
        let (commands, command_rx) = channel();
        let (ack_tx, acks) = channel();
        let kicker = vcpu.kicker();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let control = shared.control.clone();
                // Pinned before the seccomp filter, which does not allow it.
                if let Some(cpus) = shared.affinity.of(id) {
                    if let Err(e) = crate::limits::pin_current_thread(cpus) {
                        eprintln!(
                            "kvmbox: vCPU {id}: cannot pin to host CPUs {}: {e}",
                            crate::limits::format_cpu_list(cpus)
                        );
                        control.request(ExitRequest::Error);
                        return;
                    }
                }
                // Before any guest code: a vCPU that cannot be filtered stops the VM.
                if let Err(e) = kvmbox_seccomp::apply(kvmbox_seccomp::ThreadKind::Vcpu) {
                    eprintln!("kvmbox: vCPU {id}: {e}");
                    control.request(ExitRequest::Error);
                    return;
                }
                drop(filtered);
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    VcpuThread {
                        id,
                        vcpu,
                        shared,
                        commands: command_rx,
                        acks: ack_tx,
                    }
                    .main(paused)
                }));
                if ran.is_err() {
                    // The panic hook printed the message; stop the VM rather than hang it.
                    control.request(ExitRequest::Error);
                }
            })?;
        Ok(Self {
            id,
            commands,
            acks,
            kicker,
            thread: Some(thread),
        })
    }

    /// Queue a command and kick the vCPU out of guest code so it sees it.
    fn send(&self, cmd: VcpuCommand) -> Result<(), VcpuError> {
        self.commands
            .send(cmd)
            .map_err(|_| VcpuError::Gone(self.id))?;
        self.kicker.kick();
        Ok(())
    }

    fn wait_ack(&self, want: VcpuAck) -> Result<(), VcpuError> {
        loop {
            match self.acks.recv_timeout(ACK_TIMEOUT) {
                Ok(a) if a == want => return Ok(()),
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(VcpuError::Timeout(self.id, ACK_TIMEOUT))
                }
                Err(RecvTimeoutError::Disconnected) => return Err(VcpuError::Gone(self.id)),
            }
        }
    }

    /// Ask the vCPU to stop running guest code (answer with [`VcpuHandle::wait_paused`]).
    pub fn request_pause(&self) -> Result<(), VcpuError> {
        self.send(VcpuCommand::Pause)
    }

    /// Wait until the vCPU acknowledges a pause.
    pub fn wait_paused(&self) -> Result<(), VcpuError> {
        self.wait_ack(VcpuAck::Paused)
    }

    /// Ask the vCPU to run guest code again (answer with [`VcpuHandle::wait_resumed`]).
    pub fn request_resume(&self) -> Result<(), VcpuError> {
        self.send(VcpuCommand::Resume)
    }

    /// Wait until the vCPU acknowledges a resume.
    pub fn wait_resumed(&self) -> Result<(), VcpuError> {
        self.wait_ack(VcpuAck::Resumed)
    }

    /// Run `f` on the vCPU's own thread and return its result. The vCPU must be paused (the
    /// control loop checks the VM state before calling this).
    pub fn run_on<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Vcpu) -> T + Send + 'static,
    ) -> Result<T, VcpuError> {
        let (tx, rx) = channel();
        self.send(VcpuCommand::Run(Box::new(move |v| {
            let _ = tx.send(f(v));
        })))?;
        rx.recv_timeout(ACK_TIMEOUT).map_err(|e| match e {
            RecvTimeoutError::Timeout => VcpuError::Timeout(self.id, ACK_TIMEOUT),
            RecvTimeoutError::Disconnected => VcpuError::Gone(self.id),
        })
    }

    /// Tell the thread to leave and wait for it.
    pub fn finish(mut self) {
        let _ = self.send(VcpuCommand::Finish);
        if let Some(t) = self.thread.take() {
            // A vCPU thread that panicked has already reported through the panic hook.
            let _ = t.join();
        }
    }
}

/// The vCPU thread's side.
struct VcpuThread {
    id: usize,
    vcpu: Box<dyn Vcpu>,
    shared: VcpuShared,
    commands: Receiver<VcpuCommand>,
    acks: Sender<VcpuAck>,
}

/// What the thread does after handling its queued commands.
enum Next {
    Run,
    Exit,
}

impl VcpuThread {
    fn main(mut self, paused: bool) {
        if paused {
            let _ = self.acks.send(VcpuAck::Paused);
            if let Next::Exit = self.paused() {
                return;
            }
        }
        loop {
            match self.vcpu.run(self.shared.io.as_ref()) {
                Ok(VcpuExit::Kicked) => {
                    if let Next::Exit = self.take_commands() {
                        return;
                    }
                }
                Ok(VcpuExit::Halted) => {
                    // Halted with interrupts off: this vCPU is done until the VM stops. (A guest
                    // often halts right after asking to stop: that is no error.)
                    let control = &self.shared.control;
                    if control.pending().is_none()
                        && self.shared.halted.fetch_add(1, Ordering::SeqCst) + 1
                            == self.shared.count
                    {
                        eprintln!("kvmbox: every vCPU halted with interrupts disabled; stopping");
                        control.request(ExitRequest::Error);
                    }
                    if let Next::Exit = self.halted_for_good() {
                        return;
                    }
                    // Restarted after S3: no longer one of the halted.
                    self.shared.halted.fetch_sub(1, Ordering::SeqCst);
                }
                Ok(VcpuExit::Shutdown) | Ok(VcpuExit::Reset) => {
                    self.shared.control.request(ExitRequest::Reset);
                    return;
                }
                Ok(VcpuExit::PowerOff) => {
                    self.shared.control.request(ExitRequest::PowerOff);
                    return;
                }
                Err(e) => {
                    eprintln!("\r\nkvmbox: vCPU {} stopped: {e}", self.id);
                    self.shared.control.request(ExitRequest::Error);
                    return;
                }
            }
        }
    }

    /// Handle what was queued before the kick. A kick with nothing queued (or one that
    /// only says the VM is stopping) is answered here too.
    fn take_commands(&mut self) -> Next {
        if self.shared.control.pending().is_some() {
            return Next::Exit;
        }
        // The guest entered ACPI S3: run no guest code until the VMM, which pauses every vCPU
        // and restarts them at the waking vector, resumes this one.
        if self.shared.control.asleep() {
            return self.paused();
        }
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                VcpuCommand::Pause => {
                    let _ = self.acks.send(VcpuAck::Paused);
                    if let Next::Exit = self.paused() {
                        return Next::Exit;
                    }
                }
                VcpuCommand::Resume => {
                    let _ = self.acks.send(VcpuAck::Resumed);
                }
                VcpuCommand::Run(task) => task(self.vcpu.as_mut()),
                VcpuCommand::Finish => return Next::Exit,
            }
        }
        Next::Run
    }

    /// Paused: serve commands until resumed or finished.
    fn paused(&mut self) -> Next {
        loop {
            match self.commands.recv() {
                Ok(VcpuCommand::Pause) => {
                    let _ = self.acks.send(VcpuAck::Paused);
                }
                Ok(VcpuCommand::Resume) => {
                    let _ = self.acks.send(VcpuAck::Resumed);
                    return Next::Run;
                }
                Ok(VcpuCommand::Run(task)) => task(self.vcpu.as_mut()),
                Ok(VcpuCommand::Finish) | Err(_) => return Next::Exit,
            }
        }
    }

    /// A vCPU that will not run again still answers the control loop (so pausing a VM with a
    /// dead vCPU works) until it is told to finish or the VM stops, or until the guest woke
    /// from ACPI S3 (which restarted every vCPU: an offline CPU waits for INIT/SIPI again).
    fn halted_for_good(&mut self) -> Next {
        let wakes = self.shared.control.wakes();
        loop {
            match self.commands.recv_timeout(Duration::from_millis(50)) {
                Ok(VcpuCommand::Pause) => {
                    let _ = self.acks.send(VcpuAck::Paused);
                }
                Ok(VcpuCommand::Resume) => {
                    let _ = self.acks.send(VcpuAck::Resumed);
                    if self.shared.control.wakes() != wakes {
                        return Next::Run;
                    }
                }
                Ok(VcpuCommand::Run(task)) => task(self.vcpu.as_mut()),
                Ok(VcpuCommand::Finish) | Err(RecvTimeoutError::Disconnected) => return Next::Exit,
                Err(RecvTimeoutError::Timeout) => {
                    if self.shared.control.pending().is_some() {
                        return Next::Exit;
                    }
                }
            }
        }
    }
}
