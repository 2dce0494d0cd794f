//! The control loop: one place that owns the VM's lifecycle. It waits on the guest's own stop
//! requests ([`VmControl`]: power-off, reset, debug-exit, console quit, a failed vCPU) and on
//! the API's requests, and serves both on the VMM thread.

use crate::config::{AccelChoice, FileConfig, OnReboot, Overrides, VmConfig};
use crate::console::{spawn_stdin_forwarder, RawTerminal};
use crate::machine::{Backend, Machine};
use crate::signals::StopSignals;
use crate::state::{Action, StateError, VmState};
use crate::vm::{Error, SerialSlot};
use crate::{EXIT_ERROR, EXIT_POWEROFF, EXIT_REBOOT};
use kvmbox_api::{ApiError, ApiReply, ApiRequest, ApiResult, ApiServer};
use kvmbox_cpu::Accel;
use kvmbox_devices::legacy::debug_exit::DebugExit;
use kvmbox_devices::{ExitRequest, VmControl};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

mod api;

type Result<T> = std::result::Result<T, Error>;

/// What the VM is to be booted from, before it is.
enum Boot {
    /// A complete configuration (from flags or a file).
    Ready(Box<VmConfig>),
    /// Being configured through the API, over what flags and file gave.
    Pending(Box<api::PreBoot>),
}

/// The VMM thread's state.
struct Controller {
    control: Arc<VmControl>,
    serial_slot: SerialSlot,
    state: VmState,
    boot: Boot,
    /// The configuration the running machine was built from.
    running_cfg: Option<VmConfig>,
    machine: Option<Machine>,
    api: Option<ApiServer>,
    extras: api::Extras,
    /// The VMM thread's seccomp filter is installed (see [`Controller::sandbox`]).
    sandboxed: bool,
    /// The VM's control group, once made (kept across `--on-reboot restart`).
    cgroup: Option<crate::limits::VmCgroup>,
    /// The guest is in ACPI S3 and its vCPUs are paused until a wake event.
    suspended: bool,
}

/// How a run of kvmbox ended: its exit status, and what is left of the VM (its backend's VM
/// and guest memory), released when this is dropped or by [`Ended::exit_process`].
pub struct Ended {
    status: i32,
    backend: Option<Backend>,
}

impl Ended {
    /// kvmbox's exit status.
    pub fn status(&self) -> i32 {
        self.status
    }

    /// End the process with the exit status (255 for one that does not fit a byte, as
    /// `std::process::ExitCode` would). The kernel's teardown of the VM (KVM's and the
    /// guest memory's) is left to a short-lived child process, so that the caller sees
    /// kvmbox exit without waiting for it (see [`crate::exit`]).
    pub fn exit_process(self) -> ! {
        let Ended { status, backend } = self;
        let keep: Vec<_> = backend.iter().filter_map(|b| b.vm.kernel_fd()).collect();
        // Released by the child (or by the exit), never here.
        std::mem::forget(backend);
        crate::exit::exit_leaving_release(i32::from(u8::try_from(status).unwrap_or(u8::MAX)), &keep)
    }
}

/// Run the VM described by `cfg` until it ends.
pub fn run(cfg: &VmConfig) -> Result<Ended> {
    let signals = enter_vmm_thread()?;
    Controller::new(Boot::Ready(Box::new(cfg.clone())), None)?.serve(signals)
}

/// Make the calling thread the VMM thread: the stop signals are blocked before any thread
/// starts (see `crate::signals`). Its seccomp filter comes once the machine is built
/// ([`Controller::sandbox`]).
fn enter_vmm_thread() -> Result<StopSignals> {
    StopSignals::block().map_err(|e| Error::Host(format!("blocking stop signals: {e}")))
}

/// `kvmbox run --restore STATE --restore-mem MEM [--accel A] [--track-dirty-pages]
/// [--api-sock PATH] [limits]`: build the machine a snapshot saved and run it (on `accel`, the
/// saved backend when `None`; logging dirty pages for Diff snapshots when
/// `track_dirty_pages`; under `limits`), resumed, or paused (`--restore-paused`) unless
/// `resume`.
pub fn run_restored(
    state: &Path,
    mem: &Path,
    accel: Option<Accel>,
    track_dirty_pages: bool,
    api_sock: Option<&Path>,
    limits: &crate::Limits,
    resume: bool,
) -> Result<Ended> {
    let signals = enter_vmm_thread()?;
    let api = api_sock
        .map(|p| ApiServer::start(p).map_err(|e| Error::Host(e.to_string())))
        .transpose()?;
    // Nothing to boot: the machine comes from the snapshot.
    let boot = Boot::Pending(Box::new(api::PreBoot::new(None, Overrides::default())?));
    let mut c = Controller::new(boot, api)?;
    c.restore(state, mem, accel, track_dirty_pages, limits, resume)?;
    c.serve(signals)
}

/// `kvmbox run --api-sock PATH`: serve the API on `path`. With a kernel in `file`/`o`, boot
/// from them right away; otherwise wait to be configured and started through the API.
pub fn run_with_api(file: Option<FileConfig>, o: Overrides, path: &Path) -> Result<Ended> {
    let signals = enter_vmm_thread()?;
    let boot = if api::has_kernel(file.as_ref(), &o) {
        Boot::Ready(Box::new(VmConfig::build(file, o)?))
    } else {
        // Check what the flags say now, so a typo is still an error before anything runs.
        let pre = api::PreBoot::new(file, o)?;
        Boot::Pending(Box::new(pre))
    };
    let api = ApiServer::start(path).map_err(|e| Error::Host(e.to_string()))?;
    Controller::new(boot, Some(api))?.serve(signals)
}

impl Controller {
    fn new(boot: Boot, api: Option<ApiServer>) -> Result<Self> {
        Ok(Self {
            control: Arc::new(VmControl::new().map_err(|e| Error::Host(format!("eventfd: {e}")))?),
            serial_slot: Arc::new(Mutex::new(None)),
            state: VmState::NotStarted,
            boot,
            running_cfg: None,
            machine: None,
            api,
            extras: api::Extras::default(),
            sandboxed: false,
            cgroup: None,
            suspended: false,
        })
    }

    fn accel(cfg: &VmConfig) -> Accel {
        match cfg.accel {
            AccelChoice::Fixed(a) => a,
            AccelChoice::Auto => kvmbox_doctor::choose_accel_cached().accel,
        }
    }

    /// Build and start the machine from `cfg`.
    fn start(&mut self, cfg: VmConfig) -> Result<()> {
        let accel = Self::accel(&cfg);
        if kvmbox_seccomp::enabled()
            && cfg.on_reboot == OnReboot::Restart
            && cfg.nets.iter().any(|n| n.starts_a_helper())
        {
            return Err(Error::Config(crate::ConfigError::Invalid(
                "--net user with --on-reboot restart needs --no-seccomp for now: each restart \
                 starts passt again, and the VMM thread's seccomp filter forbids starting \
                 programs once a VM has run"
                    .into(),
            )));
        }
        // Before the guest's memory is made (so it is charged to the group) and before the
        // VMM thread's seccomp filter.
        if self.cgroup.is_none() {
            self.cgroup = crate::limits::VmCgroup::setup(&cfg.limits)
                .map_err(|e| Error::Host(format!("resource limits: {e}")))?;
        }
        // The vCPUs run at once, the boot CPU waiting neither for the others nor for this
        // thread's filter, whose install (~1 ms: the kernel checks and compiles it) overlaps
        // the guest's start.
        let machine = Machine::build(&cfg, accel, &self.control)?;
        self.sandbox()?;
        *self.serial_slot.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(machine.platform.serial.clone());
        self.machine = Some(machine);
        self.running_cfg = Some(cfg);
        self.state = VmState::Running;
        self.extras.log(&format!("VM {}", self.state));
        Ok(())
    }

    /// Build the machine saved in `state`/`mem` (on `accel`, the saved backend when `None`)
    /// and leave it paused, or running with `resume`.
    fn restore(
        &mut self,
        state: &Path,
        mem: &Path,
        accel: Option<Accel>,
        track_dirty_pages: bool,
        limits: &crate::Limits,
        resume: bool,
    ) -> Result<()> {
        let next = self
            .state
            .check(Action::LoadSnapshot)
            .map_err(|e| Error::Snapshot(e.to_string()))?;
        // As in `start`: before the guest's memory is mapped and before the seccomp filter.
        if self.cgroup.is_none() {
            self.cgroup = crate::limits::VmCgroup::setup(limits)
                .map_err(|e| Error::Host(format!("resource limits: {e}")))?;
        }
        let (machine, cfg) =
            crate::snapshot::load(state, mem, accel, track_dirty_pages, limits, &self.control)?;
        self.sandbox()?;
        *self.serial_slot.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(machine.platform.serial.clone());
        self.machine = Some(machine);
        self.running_cfg = Some(cfg);
        self.state = next;
        self.extras.log(&format!("VM {} (restored)", self.state));
        if resume {
            self.machine.as_ref().map_or(Ok(()), |m| m.resume())?;
            self.state = VmState::Running;
            self.extras.log(&format!("VM {}", self.state));
        }
        Ok(())
    }

    /// Install the VMM thread's seccomp filter (once; when `kvmbox_seccomp::enable` was
    /// called): after the machine is built, which is where helper programs (passt) start and
    /// inherit no filter, and before this thread handles anything the guest did (its vCPUs
    /// may already run: each vCPU thread installed its own filter before guest code, and
    /// what the guest makes reaches this thread only through the loop in `serve`, after
    /// `start` returns). Until then this thread has parsed no guest data; the API's threads
    /// have their own filters from the start.
    fn sandbox(&mut self) -> Result<()> {
        if !self.sandboxed {
            kvmbox_seccomp::apply(kvmbox_seccomp::ThreadKind::Vmm)
                .map_err(|e| Error::Host(e.to_string()))?;
            self.sandboxed = true;
        }
        Ok(())
    }

    fn stop_machine(&mut self) {
        drop(self.stop_keeping_backend());
    }

    /// Stop the machine short of its backend (see [`Machine::stop_keeping_backend`]).
    fn stop_keeping_backend(&mut self) -> Option<Backend> {
        let backend = self.machine.take().map(Machine::stop_keeping_backend);
        *self.serial_slot.lock().unwrap_or_else(|e| e.into_inner()) = None;
        backend
    }

    /// The loop: returns how the VM ended.
    fn serve(mut self, signals: StopSignals) -> Result<Ended> {
        // The raw-mode guard restores the terminal however the VM ends.
        let raw = RawTerminal::enable(libc::STDIN_FILENO);
        signals
            .spawn_waiter(self.control.clone(), raw.as_ref().map(|r| r.restorer()))
            .map_err(|e| Error::Host(format!("cannot start the signal thread: {e}")))?;
        spawn_stdin_forwarder(self.serial_slot.clone(), self.control.clone());
        if let Boot::Ready(cfg) = &self.boot {
            let cfg = (**cfg).clone();
            self.start(cfg)?;
        }
        loop {
            if let Some(req) = self.control.pending() {
                if let Some(ended) = self.guest_request(req)? {
                    self.state = VmState::Stopped;
                    self.extras.log(&format!("VM {}", self.state));
                    if req == ExitRequest::UserQuit && raw.is_some() {
                        // The guest's last line may be a prompt: leave the user's shell a
                        // fresh line.
                        eprint!("\r\n");
                    }
                    return Ok(ended);
                }
                continue;
            }
            self.sleep_or_wake()?;
            while let Some(p) = self.api.as_ref().and_then(ApiServer::try_next) {
                let answer = self.api_request(&p.request);
                p.respond(answer);
            }
            self.wait();
        }
    }

    /// ACPI S3: once the guest entered it, pause its vCPUs; on a wake event (the RTC alarm,
    /// the power button) restart them at the waking vector the guest left in the FACS, memory
    /// and devices as they were. A guest that left no waking vector boots again, as after a
    /// reset.
    fn sleep_or_wake(&mut self) -> Result<()> {
        if !self.control.asleep() {
            return Ok(());
        }
        let Some(m) = self.machine.as_ref() else {
            return Ok(());
        };
        if !self.suspended {
            m.pause()?;
            self.suspended = true;
            self.extras.log("guest suspended to RAM (ACPI S3)");
        }
        if self.control.take_wake() {
            let vector = m.waking_vector();
            if vector == 0 {
                self.extras
                    .log("guest woke from S3 with no waking vector: resetting");
                self.control.request(ExitRequest::Reset);
                return Ok(());
            }
            m.restart_at_waking_vector(vector)?;
            self.control.resumed();
            m.resume()?;
            self.suspended = false;
            self.extras
                .log(&format!("guest woke from S3 at waking vector {vector:#x}"));
        }
        Ok(())
    }

    /// Sleep until the guest or the API wants something.
    fn wait(&self) {
        let mut fds = [
            libc::pollfd {
                fd: self.control.event().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.api.as_ref().map_or(-1, ApiServer::event_fd),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds (a negative fd is ignored by poll), and their count.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
    }

    /// The guest (or the console, or a failed vCPU) asked the VM to stop: end it, or restart
    /// it on a reset with `--on-reboot restart`. Returns how it ended when kvmbox ends.
    fn guest_request(&mut self, req: ExitRequest) -> Result<Option<Ended>> {
        let restart = req == ExitRequest::Reset
            && self
                .running_cfg
                .as_ref()
                .is_some_and(|c| c.on_reboot == OnReboot::Restart);
        if restart {
            self.stop_machine();
            self.control.clear();
            self.suspended = false;
            let cfg = self.running_cfg.take().unwrap_or_else(|| unreachable!());
            self.start(cfg)?;
            return Ok(None);
        }
        let backend = self.stop_keeping_backend();
        let status = match req {
            ExitRequest::Reset => EXIT_REBOOT,
            ExitRequest::UserQuit | ExitRequest::PowerOff => EXIT_POWEROFF,
            ExitRequest::DebugExit(v) => DebugExit::status(v),
            ExitRequest::Error => EXIT_ERROR,
            ExitRequest::Signal(sig) => crate::signals::terminated(sig),
        };
        Ok(Some(Ended { status, backend }))
    }

    /// Check `action` against the state; the caller's fault when refused.
    fn check(&self, action: Action) -> std::result::Result<VmState, ApiError> {
        self.state
            .check(action)
            .map_err(|e: StateError| ApiError::bad_request(e.to_string()))
    }

    fn machine(&self) -> std::result::Result<&Machine, ApiError> {
        self.machine
            .as_ref()
            .ok_or_else(|| ApiError::internal("the VM has no machine"))
    }

    fn api_request(&mut self, req: &ApiRequest) -> ApiResult {
        self.extras.count_request();
        let r = self.dispatch(req);
        if let Err(e) = &r {
            self.extras
                .log(&format!("API request failed: {}", e.message));
        }
        r
    }

    /// Pause (`Action::Pause`) or resume (`Action::Resume`) every vCPU.
    fn pause_or_resume(&mut self, action: Action) -> ApiResult {
        let next = self.check(action)?;
        if self.control.asleep() {
            return Err(ApiError::bad_request(
                "the guest is suspended to RAM (ACPI S3): it wakes on its RTC alarm or the power button",
            ));
        }
        let m = self.machine()?;
        let done = if action == Action::Pause {
            m.pause()
        } else {
            m.resume()
        };
        done.map_err(to_api_error)?;
        self.state = next;
        self.extras.log(&format!("VM {}", self.state));
        Ok(ApiReply::Empty)
    }

    fn instance_start(&mut self) -> ApiResult {
        self.check(Action::Start)?;
        let cfg = match &self.boot {
            Boot::Pending(pre) => pre.to_config().map_err(to_api_error)?,
            Boot::Ready(cfg) => (**cfg).clone(),
        };
        self.start(cfg).map_err(to_api_error)?;
        Ok(ApiReply::Empty)
    }
}

/// A VMM error as an API answer: the caller's fault (400) or the host's (500).
fn to_api_error(e: Error) -> ApiError {
    if e.is_user_error() {
        ApiError::bad_request(e.to_string())
    } else {
        ApiError::internal(e.to_string())
    }
}
