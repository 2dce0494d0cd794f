//! `kvmbox vm`: named VMs in the store (kvmbox-store), each run by its own keeper and VM process
//! and driven through the VM's control API, as any API client drives it.
//!
//! Exit statuses: 0 done (also when there was nothing to do: starting a running VM, stopping a
//! stopped one), 1 the operation failed (the VM did not start, did not power off in time, the
//! host failed), 2 bad input (usage, unknown VM, duplicate name, bad size, malformed settings),
//! 3 busy (another kvmbox command works on the VM, or another client has its console),
//! 4 the VM's state does not allow the command (e.g. pause a stopped VM, delete a running one),
//! 5 not enough free disk space for a clone or snapshot (checked before anything is written).

use kvmbox_store::{api, console, keeper, CreateOptions, Error, State, Status, Store, Vm};
use serde_json::json;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// Longest `vm start` waits for the VM process to report the guest running. The VM process's
/// API answers within milliseconds of its start and reports "Running" once the machine is
/// built or restored (a 512 MiB restore maps the memory file: well under a second).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a VM process takes to end after SIGTERM before it gets SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(30);

#[derive(clap::Subcommand)]
pub enum VmCommand {
    /// Create a VM: a folder in $KVMBOX_HOME with its settings (vm.toml) and new disks.
    Create(Box<CreateArgs>),
    /// List the VMs: name, state, vCPUs, memory, uptime.
    List {
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Show a VM's settings, state, disks, networks, pid and sockets.
    Show {
        /// The VM.
        name: String,
        /// Print a JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Change a stopped VM's settings (what is not given stays).
    Modify(Box<ModifyArgs>),
    /// Start a VM in the background (resuming its saved state if it has one); returns once the guest runs.
    Start {
        /// The VM.
        name: String,
        /// Attach to its console once it runs (as `vm console`).
        #[arg(long)]
        console: bool,
        /// As root, run the VM process unjailed (by default it runs in a jail: see `kvmbox jail`).
        #[arg(long)]
        no_jail: bool,
    },
    /// Press the ACPI power button and wait for the guest to power off (--force: power off now).
    Stop {
        /// The VM.
        name: String,
        /// Seconds to wait for the guest to power off.
        #[arg(long, value_name = "S", default_value_t = 120)]
        timeout: u64,
        /// Power off now (SIGTERM to the VM process), without asking the guest.
        #[arg(long)]
        force: bool,
    },
    /// Pause every vCPU.
    Pause {
        /// The VM.
        name: String,
    },
    /// Resume a paused VM.
    Resume {
        /// The VM.
        name: String,
    },
    /// Attach this terminal to the VM's serial console (Ctrl-A d detaches; the VM keeps running).
    Console {
        /// The VM.
        name: String,
        /// Take the console over from the client attached now.
        #[arg(long)]
        force: bool,
    },
    /// Print the console output of the VM's current (or last) run.
    Log {
        /// The VM.
        name: String,
        /// Keep printing new output until the VM stops.
        #[arg(long)]
        follow: bool,
    },
    /// Save the running VM's state to its folder and stop it; the next start resumes it there.
    Save {
        /// The VM.
        name: String,
    },
    /// Drop a VM's saved state (its next start boots afresh).
    Discard {
        /// The VM.
        name: String,
    },
    /// Snapshots of a VM, as a tree: take, list, restore, delete (stopped, saved, or live: running or paused).
    Snapshot {
        /// The VM.
        name: String,
        #[command(subcommand)]
        action: SnapshotAction,
    },
    /// Clone a stopped VM: the settings and a copy of every disk (new MACs, no saved state).
    Clone {
        /// The VM to clone (stopped or saved).
        name: String,
        /// The new VM's name.
        new: String,
        /// Share the disks instead of copying them: both VMs get qcow2 overlays on a frozen, read-only base.
        #[arg(long)]
        linked: bool,
        /// Start from the disks' state at this snapshot of the VM (not the present one).
        #[arg(long, value_name = "SNAP")]
        snapshot: Option<String>,
    },
    /// Delete a VM: its folder (settings, disks it created, saved state, log).
    Delete {
        /// The VM.
        name: String,
        /// Power a running VM off first.
        #[arg(long)]
        force: bool,
        /// Keep the disks in its folder: move them to $KVMBOX_HOME/kept-disks/NAME/ (overlays flattened).
        #[arg(long)]
        keep_disks: bool,
    },
    /// (internal) The keeper process of a running VM; `vm start` runs it.
    #[command(name = "__keeper", hide = true)]
    Keeper {
        name: String,
        #[arg(long)]
        restore: bool,
        #[arg(long, requires = "restore")]
        paused: bool,
        #[arg(long)]
        jail: bool,
    },
}

#[derive(clap::Subcommand)]
pub enum SnapshotAction {
    /// Take a snapshot: the disks, plus memory and devices of a running or paused VM (live), or the saved state of a saved one.
    Take {
        /// The snapshot's name (the rules of VM names).
        snap: String,
        /// What it is.
        #[arg(long, value_name = "TEXT")]
        description: Option<String>,
    },
    /// Show the snapshot tree (`*` marks the current snapshot).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Bring the disks (and saved state) back to a snapshot; the present state is lost. A running or paused VM is powered off, restored and started from the snapshot's memory (paused if it was paused); with a disks-only snapshot it stays stopped.
    Restore {
        /// The snapshot.
        snap: String,
    },
    /// Delete a snapshot (its children take its parent; no data the others use is lost); a running or paused VM stays so.
    Delete {
        /// The snapshot.
        snap: String,
    },
}

#[derive(clap::Args)]
pub struct ModifyArgs {
    /// The VM.
    name: String,
    /// vCPUs.
    #[arg(long, value_name = "N")]
    cpus: Option<u32>,
    /// Guest memory: a number with K, M, G or T; plain numbers are MiB.
    #[arg(long, value_name = "SIZE")]
    memory: Option<String>,
    /// Kernel.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// CPU backend: auto, kvm or emu.
    #[arg(long, value_name = "ACCEL")]
    accel: Option<String>,
    /// A virtio-rng device: on or off.
    #[arg(long, value_name = "on|off")]
    rng: Option<String>,
    /// Add a new qcow2 disk of this size in the VM's folder. Repeatable.
    #[arg(long, value_name = "SIZE")]
    add_disk_size: Vec<String>,
    /// Attach an existing image, as create's --disk: PATH[,format=raw|qcow2][,ro][,serial=ID][,lock=off]. Repeatable.
    #[arg(long, value_name = "SPEC")]
    disk: Vec<String>,
    /// Detach a disk: its number in `vm show`'s order (from 0) or its path; the file stays. Repeatable.
    #[arg(long, value_name = "N|PATH")]
    remove_disk: Vec<String>,
    /// Replace the networks, as create's --net (`none`: no network). Repeatable.
    #[arg(long, value_name = "SPEC")]
    net: Vec<String>,
    #[command(flatten)]
    limits: LimitArgs,
}

/// The resource limits of `kvmbox run` (its --cpu-max, --cpu-weight, --memory-limit,
/// --cpu-affinity), kept in the VM's settings.
#[derive(clap::Args)]
pub struct LimitArgs {
    /// CPU quota in host CPUs, as kvmbox run's (vm modify: none removes it).
    #[arg(long, value_name = "CPUS")]
    cpu_max: Option<String>,
    /// CPU weight 1-10000, as kvmbox run's (vm modify: none removes it).
    #[arg(long, value_name = "N")]
    cpu_weight: Option<String>,
    /// Memory limit of the VM's process, as kvmbox run's (vm modify: none removes it).
    #[arg(long, value_name = "SIZE")]
    memory_limit: Option<String>,
    /// vCPU pinning, as kvmbox run's (vm modify: none removes it).
    #[arg(long, value_name = "SPEC")]
    cpu_affinity: Option<String>,
}

impl From<LimitArgs> for kvmbox_store::LimitOptions {
    fn from(a: LimitArgs) -> Self {
        kvmbox_store::LimitOptions {
            cpu_max: a.cpu_max,
            cpu_weight: a.cpu_weight,
            memory_limit: a.memory_limit,
            cpu_affinity: a.cpu_affinity,
        }
    }
}

#[derive(clap::Args)]
pub struct CreateArgs {
    /// The VM's name: letters, digits, '.', '_', '-' (starting with a letter or digit), at most 64.
    name: String,
    /// vCPUs [default: 1].
    #[arg(long, value_name = "N")]
    cpus: Option<u32>,
    /// Guest memory: a number with K, M, G or T; plain numbers are MiB [default: 512M].
    #[arg(long, value_name = "SIZE")]
    memory: Option<String>,
    /// Kernel [default: the default guest, Debian's cloud kernel with the busybox initramfs].
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line [default: kvmbox run's; the default guest's with no --kernel].
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// An existing image, as kvmbox run's --disk: PATH[,format=raw|qcow2][,ro][,serial=ID][,lock=off]. Repeatable.
    #[arg(long, value_name = "SPEC")]
    disk: Vec<String>,
    /// A new qcow2 disk of this size in the VM's folder (disk<N>.qcow2). Repeatable.
    #[arg(long, value_name = "SIZE")]
    disk_size: Vec<String>,
    /// A network interface, as kvmbox run's --net (tap=NAME or user[,hostfwd=RULE]...). Repeatable. [default: user, NAT through passt; `none`: no network]
    #[arg(long, value_name = "SPEC")]
    net: Vec<String>,
    /// A virtio-rng device (always on for the default guest).
    #[arg(long)]
    rng: bool,
    /// CPU backend: auto, kvm or emu [default: auto].
    #[arg(long, value_name = "ACCEL")]
    accel: Option<String>,
    #[command(flatten)]
    limits: LimitArgs,
}

/// The exit status of an error kind (the table in the module docs and the README).
fn exit_status(e: &Error) -> u8 {
    match e {
        Error::Failed(_) => 1,
        Error::Usage(_) | Error::NotFound(_) | Error::Exists(_) => 2,
        Error::Busy(_) => 3,
        Error::State(_) => 4,
        Error::NoSpace(_) => 5,
    }
}

/// Run one `kvmbox vm` command.
pub fn run(cmd: VmCommand) -> ExitCode {
    match dispatch(cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvmbox: error: {e}");
            ExitCode::from(exit_status(&e))
        }
    }
}

type Result<T> = std::result::Result<T, Error>;

fn dispatch(cmd: VmCommand) -> Result<()> {
    let store = Store::from_env()?;
    match cmd {
        VmCommand::Create(a) => create(&store, *a),
        VmCommand::List { json } => list(&store, json),
        VmCommand::Show { name, json } => show(&store.vm(&name)?, json),
        VmCommand::Start {
            name,
            console,
            no_jail,
        } => start(&store.vm(&name)?, console, no_jail),
        VmCommand::Stop {
            name,
            timeout,
            force,
        } => stop(&store.vm(&name)?, Duration::from_secs(timeout), force),
        VmCommand::Pause { name } => pause_or_resume(&store.vm(&name)?, true),
        VmCommand::Resume { name } => pause_or_resume(&store.vm(&name)?, false),
        VmCommand::Console { name, force } => attach(&store.vm(&name)?, force),
        VmCommand::Log { name, follow } => log(&store.vm(&name)?, follow),
        VmCommand::Save { name } => save(&store.vm(&name)?),
        VmCommand::Discard { name } => discard(&store.vm(&name)?),
        VmCommand::Delete {
            name,
            force,
            keep_disks,
        } => delete(&store, &store.vm(&name)?, force, keep_disks),
        VmCommand::Modify(a) => modify(&store, *a),
        VmCommand::Snapshot { name, action } => snapshot(&store.vm(&name)?, action),
        VmCommand::Clone {
            name,
            new,
            linked,
            snapshot,
        } => clone(&store, &store.vm(&name)?, &new, linked, snapshot.as_deref()),
        VmCommand::Keeper {
            name,
            restore,
            paused,
            jail,
        } => {
            let exe = std::env::current_exe()
                .map_err(|e| Error::Failed(format!("finding the kvmbox binary: {e}")))?;
            keeper::keep(&store.vm(&name)?, &exe, restore, paused, jail)
        }
    }
}

fn create(store: &Store, a: CreateArgs) -> Result<()> {
    let opts = CreateOptions {
        kernel: a.kernel,
        initrd: a.initrd,
        cmdline: a.cmdline,
        cpus: a.cpus,
        memory: a.memory,
        accel: a.accel,
        disks: a.disk,
        disk_sizes: a.disk_size,
        nets: a.net,
        rng: a.rng,
        limits: a.limits.into(),
    };
    let vm = store.create(&a.name, &opts)?;
    println!("VM '{}' created in {}", vm.name(), vm.dir().display());
    Ok(())
}

/// Seconds since the VM process started.
fn uptime(s: &Status) -> Option<u64> {
    s.started_at
        .map(|t| kvmbox_store::now_secs().saturating_sub(t))
}

fn list(store: &Store, json: bool) -> Result<()> {
    let mut rows = Vec::new();
    for vm in store.list()? {
        let status = vm.status();
        let cfg = vm.config();
        rows.push(json!({
            "name": vm.name(),
            "state": status.state,
            "cpus": cfg.as_ref().ok().map(|c| c.cpus),
            "memory_mib": cfg.as_ref().ok().map(|c| c.memory >> 20),
            "pid": status.pid,
            "uptime_s": uptime(&status),
            "error": cfg.as_ref().err().map(ToString::to_string),
        }));
    }
    if json {
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    println!(
        "{:<24} {:<9} {:>4} {:>9} {:>8}",
        "NAME", "STATE", "CPUS", "MEMORY", "UPTIME"
    );
    for r in &rows {
        let num = |k: &str| r[k].as_u64().map_or("-".into(), |v| v.to_string());
        println!(
            "{:<24} {:<9} {:>4} {:>9} {:>8}",
            r["name"].as_str().unwrap_or_default(),
            r["state"].as_str().unwrap_or_default(),
            num("cpus"),
            r["memory_mib"]
                .as_u64()
                .map_or("-".into(), |m| format!("{m} MiB")),
            r["uptime_s"]
                .as_u64()
                .map_or("-".into(), |s| format!("{s} s")),
        );
        if let Some(e) = r["error"].as_str() {
            println!("    settings error: {e}");
        }
    }
    Ok(())
}

fn show(vm: &Vm, json: bool) -> Result<()> {
    let cfg = vm.config()?;
    let status = vm.status();
    let running = status.pid.is_some();
    let accel = match cfg.accel {
        kvmbox_vmm::AccelChoice::Auto => "auto".to_string(),
        kvmbox_vmm::AccelChoice::Fixed(kvmbox_cpu::Accel::Kvm) => "kvm".to_string(),
        kvmbox_vmm::AccelChoice::Fixed(kvmbox_cpu::Accel::Emu) => "emu".to_string(),
    };
    // Each disk's format and backing chain, as the image says (None when it cannot be read).
    let layers: Vec<Option<Vec<kvmbox_block::image::LayerInfo>>> = cfg
        .disks
        .iter()
        .map(|d| kvmbox_block::image::info(&d.path).ok())
        .collect();
    let disks: Vec<_> = cfg
        .disks
        .iter()
        .zip(&layers)
        .map(|(d, l)| {
            json!({
                "path": d.path,
                "format": l.as_ref().and_then(|l| l.first()).map(|l| l.format.clone()),
                "read_only": d.read_only,
                "backing_chain": l.as_ref().map(|l| l.iter().skip(1).map(|b| b.path.clone()).collect::<Vec<_>>()),
            })
        })
        .collect();
    let networks = vm.networks()?;
    let jail = running.then(|| vm.jail_info()).flatten();
    let v = json!({
        "name": vm.name(),
        "state": status.state,
        "folder": vm.dir(),
        "settings_file": vm.settings_path(),
        "kernel": cfg.kernel,
        "initrd": cfg.initrd,
        "cmdline": cfg.cmdline,
        "cpus": cfg.cpus,
        "memory_mib": cfg.memory >> 20,
        "accel": accel,
        "rng": cfg.rng,
        "disks": disks,
        "nets": vm.net_specs(),
        "networks": networks,
        "limits": json!({
            "cpu_max": cfg.limits.cpu_max.map(|c| c.cpus()),
            "cpu_weight": cfg.limits.cpu_weight,
            "memory_limit_mib": cfg.limits.memory_limit.map(|b| b >> 20),
            "cpu_affinity": (!cfg.limits.affinity.is_empty()).then(|| cfg.limits.affinity.to_string()),
        }),
        "pid": status.pid,
        "uptime_s": uptime(&status),
        "api_socket": running.then(|| vm.api_sock()),
        "console_socket": running.then(|| vm.console_sock()),
        "console_log": vm.console_log(),
        "jailed": jail.is_some(),
        "jail": jail.as_ref().map(|j| json!({
            "id": j.id,
            "uid": j.uid,
            "gid": j.gid,
            "root": j.root,
        })),
        "saved_state": vm.has_saved_state(),
        "last_run": status.last_run.as_ref().map(|l| json!({
            "ended_at": l.ended_at,
            "exit_status": l.exit_status,
            "signal": l.signal,
            "description": l.describe(),
        })),
    });
    if json {
        println!("{v}");
        return Ok(());
    }
    println!("name:      {}", vm.name());
    println!("state:     {}", status.state);
    println!("folder:    {}", vm.dir().display());
    println!("kernel:    {}", cfg.kernel.display());
    if let Some(i) = &cfg.initrd {
        println!("initrd:    {}", i.display());
    }
    println!("cmdline:   {}", cfg.cmdline);
    println!("cpus:      {}", cfg.cpus);
    println!("memory:    {} MiB", cfg.memory >> 20);
    println!("accel:     {accel}");
    println!("rng:       {}", if cfg.rng { "yes" } else { "no" });
    for (d, l) in cfg.disks.iter().zip(&layers) {
        let ro = if d.read_only { " (read-only)" } else { "" };
        let fmt = l
            .as_ref()
            .and_then(|l| l.first())
            .map_or("unreadable".to_string(), |l| l.format.clone());
        println!("disk:      {} ({fmt}){ro}", d.path.display());
        for b in l.iter().flatten().skip(1) {
            println!("  backing: {}", b.path.display());
        }
    }
    for n in &networks {
        println!("net:       {}", n.describe());
    }
    if networks.is_empty() {
        println!("net:       none");
    }
    // Only the limits that are set; the flags' names say what they are.
    let flags = cfg.limits.to_flags();
    if !flags.is_empty() {
        println!("limits:    {}", flags.join(" "));
    }
    if let Some(pid) = status.pid {
        println!("pid:       {pid}");
        println!("uptime:    {} s", uptime(&status).unwrap_or(0));
        println!("api:       {}", vm.api_sock().display());
        println!("console:   {}", vm.console_sock().display());
        match &jail {
            Some(j) => println!(
                "jail:      uid {} gid {}, root {}",
                j.uid,
                j.gid,
                j.root.display()
            ),
            None => println!("jail:      none (runs unjailed)"),
        }
    }
    println!("log:       {}", vm.console_log().display());
    if vm.has_saved_state() {
        println!("saved:     yes (the next start resumes it; `vm discard` drops it)");
    }
    if let Some(l) = &status.last_run {
        println!("last run:  {}", l.describe());
    }
    Ok(())
}

fn is_up(state: State) -> bool {
    matches!(state, State::Running | State::Paused | State::Starting)
}

fn start(vm: &Vm, attach_console: bool, no_jail: bool) -> Result<()> {
    let name = vm.name();
    let jail = kvmbox_store::jail::wanted(no_jail)?;
    {
        let _lock = vm.lock(&format!("kvmbox vm start {name}"))?;
        let state = vm.status().state;
        if is_up(state) {
            println!("VM '{name}' is already {state}");
        } else {
            let how = if launch(vm, false, jail)? {
                "resumed from its saved state"
            } else {
                "started"
            };
            let now = vm.status();
            match (is_up(now.state), now.last_run) {
                (false, Some(last)) => {
                    println!(
                        "VM '{name}' {how} and has stopped already: {}",
                        last.describe()
                    )
                }
                _ => println!("VM '{name}' {how} (pid {})", vm.vm_pid().unwrap_or(0)),
            }
            if let Some(j) = vm.jail_info() {
                println!(
                    "VM '{name}' runs jailed as uid {} in {}",
                    j.uid,
                    j.root.display()
                );
            }
        }
    }
    if attach_console {
        return attach(vm, false);
    }
    Ok(())
}

/// Start the keeper (which starts the VM process, in a jail with `jail`) and wait for the
/// guest to run (to be there, paused, with `paused`, which a saved state's resume takes).
/// Whether it resumed a saved state (else it booted).
fn launch(vm: &Vm, paused: bool, jail: bool) -> Result<bool> {
    let name = vm.name();
    vm.clean_stale_runtime()?;
    vm.clean_stale_jail()?;
    keeper::check_socket_paths(vm)?;
    let restore = vm.has_saved_state();
    if !restore {
        // The same check the VM process makes, before anything starts: a hand-edited mistake
        // is reported here, with its line.
        vm.config()?;
    }
    vm.check_net_helpers()?;
    let log_path = vm.console_log();
    let _ = std::fs::rename(&log_path, log_path.with_extension("log.1"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Error::Failed(format!("opening {}: {e}", log_path.display())))?;
    let exe = std::env::current_exe()
        .map_err(|e| Error::Failed(format!("finding the kvmbox binary: {e}")))?;
    let mut cmd = Command::new(exe);
    cmd.args(["vm", "__keeper", name]);
    if restore {
        cmd.arg("--restore");
        if paused {
            cmd.arg("--paused");
        }
    }
    if jail {
        cmd.arg("--jail");
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    // SAFETY: between fork and exec the closure only calls setsid, which is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            // Its own session: no terminal's hangup or Ctrl-C reaches the VM.
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let spawned = std::time::SystemTime::now();
    let mut keeper = cmd
        .spawn()
        .map_err(|e| Error::Failed(format!("starting VM '{name}': {e}")))?;
    let t0 = Instant::now();
    loop {
        if let Ok(Some(_)) = keeper.try_wait() {
            // A short guest may run to its end before the API is first asked: the keeper
            // recorded how it ended.
            if vm.last_run_since(spawned).is_some_and(|l| l.ran()) {
                break;
            }
            return Err(Error::Failed(format!(
                "VM '{name}' did not start:\n{}",
                log_tail(vm, 15)
            )));
        }
        // The jail writes the VM's pid before it runs it: both are there once it answers.
        if let Ok("Running" | "Paused") = api::instance_state(&vm.api_sock()).as_deref() {
            break;
        }
        if t0.elapsed() > START_TIMEOUT {
            return Err(Error::Failed(format!(
                "VM '{name}' did not report running within {} s (it may still be starting: kvmbox vm show {name})",
                START_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if restore {
        // The guest runs on: its disks move away from the saved state, which must not be
        // resumed twice. (The running VM maps its memory file privately; unlinking is safe.)
        let (state, _) = vm.saved_state();
        if let Some(dir) = state.parent() {
            std::fs::remove_dir_all(dir)
                .map_err(|e| Error::Failed(format!("removing {}: {e}", dir.display())))?;
        }
    }
    Ok(restore)
}

/// The last `n` lines of the console log.
fn log_tail(vm: &Vm, n: usize) -> String {
    let text = std::fs::read(vm.console_log()).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Wait until the VM's keeper has ended; false after `timeout`.
fn wait_gone(vm: &Vm, timeout: Duration) -> bool {
    let t0 = Instant::now();
    while vm.keeper_alive() {
        if t0.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// End the VM process now: SIGTERM (kvmbox's orderly stop), SIGKILL if that does not end it.
fn terminate(vm: &Vm) -> Result<()> {
    let name = vm.name();
    let Some(pid) = vm.vm_pid().and_then(|p| i32::try_from(p).ok()) else {
        return Err(Error::Failed(format!(
            "VM '{name}': no VM process pid in {}",
            vm.vm_pid_path().display()
        )));
    };
    for sig in [libc::SIGTERM, libc::SIGKILL] {
        // SAFETY: kill only sends a signal, to the VM process the keeper recorded (the keeper is
        // alive, so the pid is its child's, not reused).
        unsafe { libc::kill(pid, sig) };
        if wait_gone(vm, TERM_GRACE) {
            return Ok(());
        }
    }
    Err(Error::Failed(format!(
        "VM '{name}' did not end after SIGKILL"
    )))
}

fn running_or(vm: &Vm, what: &str) -> Result<State> {
    let state = vm.status().state;
    if !is_up(state) {
        return Err(Error::State(format!(
            "VM '{}' is {state}: cannot {what} it",
            vm.name()
        )));
    }
    Ok(state)
}

fn stop(vm: &Vm, timeout: Duration, force: bool) -> Result<()> {
    let name = vm.name();
    let _lock = vm.lock(&format!("kvmbox vm stop {name}"))?;
    let state = vm.status().state;
    if !is_up(state) {
        println!("VM '{name}' is not running ({state})");
        return Ok(());
    }
    if force {
        terminate(vm)?;
        println!("VM '{name}' powered off (forced)");
        return Ok(());
    }
    api::call(
        name,
        &vm.api_sock(),
        "PUT",
        "/actions",
        Some(r#"{"action_type":"PowerButton"}"#),
    )?;
    if !wait_gone(vm, timeout) {
        return Err(Error::Failed(format!(
            "VM '{name}' did not power off within {} s of the ACPI power button; it is still running (kvmbox vm stop --force {name} powers it off now)",
            timeout.as_secs()
        )));
    }
    let how = vm
        .status()
        .last_run
        .map_or("ended".into(), |l| l.describe());
    println!("VM '{name}' stopped: {how}");
    Ok(())
}

fn pause_or_resume(vm: &Vm, pause: bool) -> Result<()> {
    let name = vm.name();
    let verb = if pause { "pause" } else { "resume" };
    let _lock = vm.lock(&format!("kvmbox vm {verb} {name}"))?;
    let state = running_or(vm, verb)?;
    let (want, body) = if pause {
        (State::Paused, r#"{"state":"Paused"}"#)
    } else {
        (State::Running, r#"{"state":"Resumed"}"#)
    };
    if state == want {
        println!("VM '{name}' is already {state}");
        return Ok(());
    }
    api::call(name, &vm.api_sock(), "PATCH", "/vm", Some(body))?;
    println!("VM '{name}' {want}");
    Ok(())
}

fn attach(vm: &Vm, force: bool) -> Result<()> {
    let name = vm.name();
    running_or(vm, "attach to the console of")?;
    let stream = console::connect(name, &vm.console_sock(), force)?;
    eprintln!("kvmbox: attached to VM '{name}' (Ctrl-A d detaches)");
    if console::attach(stream)? {
        eprintln!("\r\nkvmbox: detached from VM '{name}'; it keeps running");
    } else {
        eprintln!(
            "\r\nkvmbox: VM '{name}' console closed (the VM ended, or another client took it over)"
        );
    }
    Ok(())
}

fn log(vm: &Vm, follow: bool) -> Result<()> {
    use std::io::{Read, Seek, Write};
    let path = vm.console_log();
    let mut file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !follow => return Ok(()),
        Err(e) => return Err(Error::Failed(format!("{}: {e}", path.display()))),
    };
    let mut out = std::io::stdout();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| Error::Failed(format!("{}: {e}", path.display())))?;
        if n > 0 {
            if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                return Ok(());
            }
            continue;
        }
        if !follow || !vm.keeper_alive() {
            return Ok(());
        }
        // A new run rotates the log: follow the new file.
        let pos = file.stream_position().unwrap_or(0);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() < pos) {
            if let Ok(f) = std::fs::File::open(&path) {
                file = f;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn save(vm: &Vm) -> Result<()> {
    let name = vm.name();
    let _lock = vm.lock(&format!("kvmbox vm save {name}"))?;
    let state = running_or(vm, "save")?;
    let api_sock = vm.api_sock();
    if state == State::Running {
        api::call(
            name,
            &api_sock,
            "PATCH",
            "/vm",
            Some(r#"{"state":"Paused"}"#),
        )?;
    }
    let (state_file, mem_file) = vm.saved_state();
    let tmp = |p: &PathBuf| p.with_extension("partial");
    let dir = state_file.parent().unwrap_or(vm.dir()).to_path_buf();
    let made = std::fs::create_dir_all(&dir)
        .map_err(|e| Error::Failed(format!("creating {}: {e}", dir.display())))
        .and_then(|()| {
            // A jailed VM writes them in its share folder; they are moved here after.
            let body = json!({
                "snapshot_path": vm.api_output_path(&tmp(&state_file)),
                "mem_file_path": vm.api_output_path(&tmp(&mem_file)),
                "snapshot_type": "Full",
            });
            api::call(
                name,
                &api_sock,
                "PUT",
                "/snapshot/create",
                Some(&body.to_string()),
            )?;
            vm.take_api_output(&tmp(&state_file))?;
            vm.take_api_output(&tmp(&mem_file))
        });
    if let Err(e) = made {
        let _ = std::fs::remove_dir_all(&dir);
        for p in [&state_file, &mem_file] {
            let out = vm.api_output_path(&tmp(p));
            if out != tmp(p) {
                let _ = std::fs::remove_file(out);
            }
        }
        if state == State::Running {
            let _ = api::call(
                name,
                &api_sock,
                "PATCH",
                "/vm",
                Some(r#"{"state":"Resumed"}"#),
            );
        }
        return Err(e);
    }
    // The guest stays paused until its process ends, so its disks stay as the state saw them.
    terminate(vm)?;
    for p in [&state_file, &mem_file] {
        std::fs::rename(tmp(p), p)
            .map_err(|e| Error::Failed(format!("keeping {}: {e}", p.display())))?;
    }
    println!("VM '{name}' saved; `kvmbox vm start {name}` resumes it");
    Ok(())
}

fn discard(vm: &Vm) -> Result<()> {
    let name = vm.name();
    let _lock = vm.lock(&format!("kvmbox vm discard {name}"))?;
    let state = vm.status().state;
    if is_up(state) {
        return Err(Error::State(format!(
            "VM '{name}' is {state}: its saved state, if any, is in use"
        )));
    }
    let (state_file, _) = vm.saved_state();
    let dir = state_file.parent().unwrap_or(vm.dir());
    if !dir.exists() {
        println!("VM '{name}' has no saved state");
        return Ok(());
    }
    std::fs::remove_dir_all(dir)
        .map_err(|e| Error::Failed(format!("removing {}: {e}", dir.display())))?;
    println!("VM '{name}': saved state discarded");
    Ok(())
}

fn modify(store: &Store, a: ModifyArgs) -> Result<()> {
    let vm = store.vm(&a.name)?;
    let name = vm.name();
    let _lock = vm.lock(&format!("kvmbox vm modify {name}"))?;
    let state = vm.status().state;
    if is_up(state) {
        // Only the limits a running VM's cgroup can take: the first other option given.
        let fixed = [
            ("--cpus", a.cpus.is_some()),
            ("--memory", a.memory.is_some()),
            ("--kernel", a.kernel.is_some()),
            ("--initrd", a.initrd.is_some()),
            ("--cmdline", a.cmdline.is_some()),
            ("--accel", a.accel.is_some()),
            ("--rng", a.rng.is_some()),
            ("--add-disk-size", !a.add_disk_size.is_empty()),
            ("--disk", !a.disk.is_empty()),
            ("--remove-disk", !a.remove_disk.is_empty()),
            ("--net", !a.net.is_empty()),
            ("--cpu-affinity", a.limits.cpu_affinity.is_some()),
        ]
        .into_iter()
        .find_map(|(flag, given)| given.then_some(flag));
        let limits: kvmbox_store::LimitOptions = a.limits.into();
        if let (None, State::Running | State::Paused, true) = (fixed, state, limits.any_live()) {
            vm.modify_limits_live(&limits)?;
            println!(
                "VM '{name}' modified: its limits changed while it is {state}, and in its settings"
            );
            return Ok(());
        }
        let what = fixed.unwrap_or("its settings");
        return Err(Error::State(format!(
            "VM '{name}' is {state}: {what} cannot change while it runs (only --cpu-max, --cpu-weight and --memory-limit can, on a running or paused VM); stop it first"
        )));
    }
    if vm.has_saved_state() {
        return Err(Error::State(format!(
            "VM '{name}' has a saved state, which needs the settings it was saved with: start and stop it, or `kvmbox vm discard {name}`, first"
        )));
    }
    let rng = match a.rng.as_deref() {
        None => None,
        Some("on") => Some(true),
        Some("off") => Some(false),
        Some(o) => {
            return Err(Error::Usage(format!(
                "invalid --rng '{o}': expected on or off"
            )))
        }
    };
    let done = vm.modify(&kvmbox_store::ModifyOptions {
        cpus: a.cpus,
        memory: a.memory,
        kernel: a.kernel,
        initrd: a.initrd,
        cmdline: a.cmdline,
        accel: a.accel,
        rng,
        add_disk_sizes: a.add_disk_size,
        disks: a.disk,
        remove_disks: a.remove_disk,
        nets: (!a.net.is_empty()).then_some(a.net),
        limits: a.limits.into(),
    })?;
    for f in &done.removed {
        let note = if f.starts_with(vm.dir()) {
            format!(
                " (in the VM's folder: `kvmbox vm delete {name}` deletes it with the folder; move it elsewhere to keep it)"
            )
        } else {
            String::new()
        };
        println!("detached disk: {}; the file stays{note}", f.display());
    }
    println!("VM '{name}' modified");
    Ok(())
}

fn snapshot(vm: &Vm, action: SnapshotAction) -> Result<()> {
    let name = vm.name();
    if let SnapshotAction::List { json } = action {
        let tree = vm.snapshot_tree()?;
        if json {
            println!("{}", serde_json::to_string(&tree).unwrap_or_default());
        } else if tree.snapshots.is_empty() {
            println!("VM '{name}' has no snapshots");
        } else {
            print!("{}", tree.render());
        }
        return Ok(());
    }
    let _lock = vm.lock(&format!("kvmbox vm snapshot {name}"))?;
    let state = vm.status().state;
    let t0 = Instant::now();
    if let State::Running | State::Paused = state {
        let running = state == State::Running;
        match &action {
            SnapshotAction::Take { snap, description } => {
                vm.snapshot_take_live(snap, description.as_deref().unwrap_or(""), running)?;
                println!(
                    "VM '{name}': live snapshot '{snap}' taken, memory, devices and disks ({:.3} s); the VM is {state}",
                    t0.elapsed().as_secs_f64()
                );
            }
            SnapshotAction::Delete { snap } => {
                vm.snapshot_delete_live(snap, running)?;
                println!(
                    "VM '{name}': snapshot '{snap}' deleted, live, from its disks and its folder ({:.3} s); the VM is {state}",
                    t0.elapsed().as_secs_f64()
                );
            }
            SnapshotAction::Restore { snap } => restore_live(vm, snap, running, t0)?,
            SnapshotAction::List { .. } => unreachable!("answered above"),
        }
        return Ok(());
    }
    if is_up(state) {
        return Err(Error::State(format!(
            "VM '{name}' is {state}: wait until it runs (or stop it), then try again"
        )));
    }
    let done = match action {
        SnapshotAction::Take { snap, description } => {
            vm.snapshot_take(&snap, description.as_deref().unwrap_or(""))?;
            format!("snapshot '{snap}' taken")
        }
        SnapshotAction::Restore { snap } => {
            vm.snapshot_restore(&snap)?;
            format!("restored to snapshot '{snap}'")
        }
        SnapshotAction::Delete { snap } => {
            vm.snapshot_delete(&snap)?;
            format!("snapshot '{snap}' deleted")
        }
        SnapshotAction::List { .. } => unreachable!("answered above"),
    };
    println!("VM '{name}': {done} ({:.3} s)", t0.elapsed().as_secs_f64());
    Ok(())
}

/// `snapshot restore SNAP` of a running (`running`) or paused VM, as QEMU's `loadvm`: after
/// the checks `restore` makes (nothing changes when one fails), the VM is powered off (forced:
/// its present state is lost, as a restore loses it), restored as a stopped VM is, and, when
/// SNAP holds memory and devices, started again from them: running, or paused if it was
/// paused. A disks-only snapshot leaves the VM powered off with its disks restored, as
/// VirtualBox does.
fn restore_live(vm: &Vm, snap: &str, running: bool, t0: Instant) -> Result<()> {
    let name = vm.name();
    let info = vm.snapshot_restore_check(snap)?;
    // It starts again as it ran: jailed or not.
    let jail = vm.jail_info().is_some();
    terminate(vm)?;
    vm.snapshot_restore(snap).map_err(|e| {
        Error::Failed(format!(
            "VM '{name}' was powered off to restore snapshot '{snap}', and the restore failed; the VM is stopped: {e}"
        ))
    })?;
    if !info.with_state {
        println!(
            "VM '{name}': restored to snapshot '{snap}', which holds disks only: the VM was powered off (forced) and its disks brought back; it is stopped (`kvmbox vm start {name}` boots it) ({:.3} s)",
            t0.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    launch(vm, !running, jail).map_err(|e| {
        Error::Failed(format!(
            "VM '{name}' was restored to snapshot '{snap}' but did not start again (it is stopped with the snapshot's saved state: `kvmbox vm start {name}` resumes it): {e}"
        ))
    })?;
    println!(
        "VM '{name}': restored to snapshot '{snap}', live: powered off (forced), then its disks, memory and devices brought back and the VM started from them (pid {}; {:.3} s); the VM is {}",
        vm.vm_pid().unwrap_or(0),
        t0.elapsed().as_secs_f64(),
        if running { State::Running } else { State::Paused }
    );
    Ok(())
}

fn clone(store: &Store, vm: &Vm, new: &str, linked: bool, snap: Option<&str>) -> Result<()> {
    let name = vm.name();
    let _lock = vm.lock(&format!("kvmbox vm clone {name} {new}"))?;
    let state = vm.status().state;
    if is_up(state) {
        return Err(Error::State(format!(
            "VM '{name}' is {state}: stop it (or save it) before cloning it"
        )));
    }
    let t0 = Instant::now();
    let clone = store.clone_vm(vm, new, linked, snap)?;
    println!(
        "VM '{new}' created in {} as a {} clone of '{name}'{} ({:.3} s)",
        clone.dir().display(),
        if linked { "linked" } else { "full" },
        snap.map_or(String::new(), |s| format!(" at snapshot '{s}'")),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn delete(store: &Store, vm: &Vm, force: bool, keep_disks: bool) -> Result<()> {
    let name = vm.name();
    let _lock = vm.lock(&format!("kvmbox vm delete {name}"))?;
    let clones = store.linked_clones_of(vm)?;
    if !clones.is_empty() {
        return Err(Error::State(format!(
            "VM '{name}' holds the disks of its linked clone(s) '{}': delete them first",
            clones.join("', '")
        )));
    }
    let state = vm.status().state;
    if is_up(state) {
        if !force {
            return Err(Error::State(format!(
                "VM '{name}' is {state}: stop it first, or delete --force powers it off"
            )));
        }
        terminate(vm)?;
    }
    vm.clean_stale_runtime()?;
    vm.clean_stale_jail()?;
    let source = vm.linked_source();
    let kept = if keep_disks {
        store.keep_disks(vm)?
    } else {
        Vec::new()
    };
    // Out of the store's names first (one rename), then the files.
    let gone = vm
        .dir()
        .with_file_name(format!(".deleted-{name}-{}", std::process::id()));
    std::fs::rename(vm.dir(), &gone)
        .and_then(|()| std::fs::remove_dir_all(&gone))
        .map_err(|e| Error::Failed(format!("deleting {}: {e}", vm.dir().display())))?;
    println!("VM '{name}' deleted");
    for k in kept {
        println!("kept disk: {}", k.display());
    }
    if let Some(source) = source {
        // The VM is gone whatever happens here; a base left behind is only disk space.
        match store.drop_unused_bases(&source) {
            Ok(removed) => {
                for b in removed {
                    println!("removed base no clone uses any more: {}", b.display());
                }
            }
            Err(e) => eprintln!(
                "kvmbox: warning: VM '{name}' deleted, but its source '{source}' keeps its unused clone bases: {e}"
            ),
        }
    }
    Ok(())
}
