//! `kvmbox`: run virtual machines on KVM or on kvmbox's software CPU engine.

use clap::{Parser, Subcommand};
use kvmbox_cpu::Accel;
use kvmbox_vmm::{FileConfig, Overrides, VmConfig, EXIT_USAGE};
use std::path::PathBuf;
use std::process::ExitCode;

mod disk;
mod jail;
mod vm;

#[derive(Parser)]
#[command(
    name = "kvmbox",
    version,
    about = "Run virtual machines on KVM or kvmbox's software CPU engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel in a new VM with its serial console on this terminal (Ctrl-A x quits).
    Run(Box<RunArgs>),
    /// Check whether this host can run VMs, and which accelerator `auto` picks.
    Doctor {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Create, inspect, convert and resize disk images (raw, qcow2; convert also reads VDI, VMDK, VHD, VHDX).
    #[command(subcommand)]
    Disk(disk::DiskCommand),
    /// Work with snapshot files.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Named VMs kept in $KVMBOX_HOME: create, list, start, console, stop, save, delete ...
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Run `kvmbox run ARGS` jailed: a chroot with only the VM's files, new mount and PID namespaces, rlimits, an unprivileged user without capabilities (as root).
    Jail(Box<jail::JailArgs>),
    /// Internal: removes a VM's cgroup once its kvmbox has ended (started by `kvmbox run`).
    #[command(name = "__cgroup-watch", hide = true)]
    CgroupWatch { group: String },
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Apply a Diff snapshot's memory file onto its base memory file, in place (Firecracker's `snapshot-editor edit-memory rebase`); then restore with the Diff's state file and the base memory file.
    Merge {
        /// The base memory file (a Full snapshot's, or one diffs were already merged into); it is changed.
        #[arg(value_name = "BASE_MEM")]
        base: PathBuf,
        /// The Diff snapshot's memory file.
        #[arg(value_name = "DIFF_MEM")]
        diff: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// TOML file with the same settings (kernel, initrd, cmdline, cpus, memory, accel, on_reboot, pvh, disks, nets, rng, vsock, virtio, modules, testdev, track_dirty_pages, cpu_max, cpu_weight, memory_limit, cpu_affinity, cgroup_parent); flags override it, --disk/--net add to it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Kernel: bzImage, ELF vmlinux (PVH or 64-bit entry), a freestanding ELF, or a multiboot kernel.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 reboot=k panic=-1"].
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Number of vCPUs [default: 1].
    #[arg(long, value_name = "N")]
    cpus: Option<u32>,
    /// Guest memory: a number with K, M, G or T; plain numbers are MiB [default: 512M].
    #[arg(long, value_name = "SIZE")]
    memory: Option<String>,
    /// CPU backend: auto, kvm or emu [default: auto].
    #[arg(long, value_name = "ACCEL")]
    accel: Option<String>,
    /// What a guest reset does: exit (status 4) or restart [default: exit].
    #[arg(long, value_name = "ACTION")]
    on_reboot: Option<String>,
    /// Boot an ELF kernel through its 64-bit entry even when it has a PVH entry.
    #[arg(long)]
    no_pvh: bool,
    /// A virtio-blk disk: PATH[,format=raw|qcow2][,ro][,serial=ID][,lock=off]. Repeatable.
    #[arg(long, value_name = "SPEC")]
    disk: Vec<String>,
    /// A virtio-net interface: tap=NAME[,mac=MAC] (a TAP device) or
    /// user[,hostfwd=PROTO:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT]...[,mac=MAC] (NAT through
    /// passt, no privileges). Repeatable.
    #[arg(long, value_name = "SPEC")]
    net: Vec<String>,
    /// A virtio-rng device fed by the host's getrandom.
    #[arg(long)]
    rng: bool,
    /// A virtio-vsock device: cid=N,uds=PATH (guest CID N >= 3; host programs connect to the Unix socket PATH and write "CONNECT <port>\n", guest connections to host port P reach PATH_P).
    #[arg(long, value_name = "SPEC")]
    vsock: Option<String>,
    /// A multiboot module (after --initrd, which is the first): PATH[,CMDLINE]. Repeatable.
    #[arg(long, value_name = "SPEC")]
    module: Vec<String>,
    /// QEMU's pc-testdev ports, as kvm-unit-tests use them.
    #[arg(long)]
    testdev: bool,
    /// How virtio devices attach: pci (stock kernels) or mmio (virtio_mmio.device= on the command line) [default: pci].
    #[arg(long, value_name = "TRANSPORT")]
    virtio: Option<String>,
    /// The CPU the guest sees: host (everything the backend offers) or portable (the engine's model less what this host's KVM lacks: snapshots move between kvm and emu) [default: host].
    #[arg(long, value_name = "MODEL")]
    cpu_model: Option<String>,
    /// Restore the VM saved in this snapshot state file (with --restore-mem) instead of booting a kernel; it runs on the saved backend unless --accel names the other one.
    #[arg(long, value_name = "STATE", requires = "restore_mem")]
    restore: Option<PathBuf>,
    /// The snapshot's guest-memory file (with --restore).
    #[arg(long, value_name = "MEM", requires = "restore")]
    restore_mem: Option<PathBuf>,
    /// With --restore: leave the restored VM paused (the API's PATCH /vm Resumed runs it).
    #[arg(long, requires = "restore")]
    restore_paused: bool,
    /// Log the pages the guest and its devices write, so the API can take Diff snapshots (Firecracker's track_dirty_pages).
    #[arg(long)]
    track_dirty_pages: bool,
    /// Serve the Firecracker-compatible REST API on this Unix socket (it must not exist). Without a kernel, wait to be configured through it.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Run every thread without its seccomp filter (they are on by default; see SECURITY.md).
    #[arg(long)]
    no_seccomp: bool,
    /// CPU quota of the whole VM: at most this many host CPUs' worth of time (0.5: half a CPU; as docker's --cpus), through its cgroup (v2 cpu.max, v1 cpu.cfs_quota_us).
    #[arg(long, value_name = "CPUS")]
    cpu_max: Option<String>,
    /// CPU weight against other groups, 1-10000 [default: 100] (v2 cpu.weight; v1 cpu.shares = N*1024/100).
    #[arg(long, value_name = "N")]
    cpu_weight: Option<u32>,
    /// Memory limit of the whole kvmbox process, swap included (guest memory + kvmbox's own; at least guest memory + 16 MiB); SIZE as --memory.
    #[arg(long, value_name = "SIZE")]
    memory_limit: Option<String>,
    /// Pin vCPU threads to host CPUs: a list for every vCPU (0-1,3) and/or VCPU@[LIST] per vCPU (0@[0-1],1@[2]).
    #[arg(long, value_name = "SPEC")]
    cpu_affinity: Option<String>,
    /// Make the VM's cgroup under this one (a path from the hierarchy's root) [default: kvmbox/ under kvmbox's own cgroup].
    #[arg(long, value_name = "PATH")]
    cgroup_parent: Option<PathBuf>,
    /// (internal) kvmbox jail placed this process in a cgroup with the limits given: make none.
    #[arg(long, hide = true)]
    cgroup_by_jail: bool,
}

impl RunArgs {
    /// The flags that override the config file (what `VmConfig::build` merges).
    fn overrides(&self) -> Overrides {
        Overrides {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            cpus: self.cpus,
            memory: self.memory.clone(),
            accel: self.accel.clone(),
            on_reboot: self.on_reboot.clone(),
            no_pvh: self.no_pvh,
            disks: self.disk.clone(),
            nets: self.net.clone(),
            rng: self.rng,
            vsock: self.vsock.clone(),
            virtio: self.virtio.clone(),
            modules: self.module.clone(),
            testdev: self.testdev,
            cpu_model: self.cpu_model.clone(),
            track_dirty_pages: self.track_dirty_pages,
            cpu_max: self.cpu_max.clone(),
            cpu_weight: self.cpu_weight,
            memory_limit: self.memory_limit.clone(),
            cpu_affinity: self.cpu_affinity.clone(),
            cgroup_parent: self.cgroup_parent.clone(),
        }
    }
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("kvmbox: error: {msg}");
    ExitCode::from(EXIT_USAGE as u8)
}

/// The first flag that describes a VM to boot, which `--restore` does not take.
fn restore_conflict(config: bool, o: &Overrides) -> Option<&'static str> {
    [
        (config, "--config"),
        (o.kernel.is_some(), "--kernel"),
        (o.initrd.is_some(), "--initrd"),
        (o.cmdline.is_some(), "--cmdline"),
        (o.cpus.is_some(), "--cpus"),
        (o.memory.is_some(), "--memory"),
        (o.on_reboot.is_some(), "--on-reboot"),
        (o.no_pvh, "--no-pvh"),
        (!o.disks.is_empty(), "--disk"),
        (!o.nets.is_empty(), "--net"),
        (o.rng, "--rng"),
        (o.virtio.is_some(), "--virtio"),
        (o.cpu_model.is_some(), "--cpu-model"),
    ]
    .into_iter()
    .find(|(given, _)| *given)
    .map(|(_, flag)| flag)
}

fn run(args: RunArgs) -> ExitCode {
    if args.cgroup_by_jail {
        kvmbox_vmm::limits::set_placed_by_jail();
    }
    if !args.no_seccomp {
        if let Err(e) = kvmbox_seccomp::enable() {
            return fail(e);
        }
    }
    let file = match args.config.as_deref().map(FileConfig::load).transpose() {
        Ok(f) => f,
        Err(e) => return fail(e),
    };
    let overrides = args.overrides();
    if let (Some(state), Some(mem)) = (&args.restore, &args.restore_mem) {
        if let Some(flag) = restore_conflict(file.is_some(), &overrides) {
            return fail(format!(
                "--restore builds the VM the snapshot saved: {flag} cannot be given with it"
            ));
        }
        let limits = match kvmbox_vmm::Limits::from_flags(&overrides) {
            Ok(l) => l,
            Err(e) => return fail(e),
        };
        let accel = match overrides
            .accel
            .as_deref()
            .map(str::parse::<Accel>)
            .transpose()
        {
            Ok(a) => a,
            Err(e) => return fail(e),
        };
        let ran = kvmbox_vmm::run_restored(
            state,
            mem,
            accel,
            args.track_dirty_pages,
            args.api_sock.as_deref(),
            &limits,
            !args.restore_paused,
        );
        return match ran {
            Ok(ended) => ended.exit_process(),
            Err(e) => fail(e),
        };
    }
    let ran = match &args.api_sock {
        Some(path) => kvmbox_vmm::run_with_api(file, overrides, path),
        None => match VmConfig::build(file, overrides) {
            Ok(cfg) => kvmbox_vmm::run(&cfg),
            Err(e) => return fail(e),
        },
    };
    match ran {
        Ok(ended) => ended.exit_process(),
        Err(e) => fail(e),
    }
}

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("\r\nkvmbox: internal error (a bug in kvmbox, please report it): {msg}{at}");
    }));
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                // Help and version go to stdout with status 0 (2 for a bare `kvmbox`).
                let _ = e.print();
                return ExitCode::from(
                    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                        EXIT_USAGE as u8
                    } else {
                        0
                    },
                );
            }
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            return fail(first.trim_start_matches("error: "));
        }
    };
    match cli.command {
        Command::Run(args) => run(*args),
        Command::Disk(cmd) => disk::run(cmd),
        Command::Snapshot(SnapshotCommand::Merge { base, diff }) => {
            match kvmbox_snapshot::merge_memory(&base, &diff) {
                Ok(n) => {
                    println!(
                        "merged {n} bytes of {} into {}",
                        diff.display(),
                        base.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Command::Vm(cmd) => vm::run(cmd),
        Command::Jail(args) => jail::run(*args),
        Command::CgroupWatch { group } => {
            ExitCode::from(u8::try_from(kvmbox_vmm::limits::watch(&group)).unwrap_or(1))
        }
        Command::Doctor { json } => {
            let report = kvmbox_doctor::run_checks();
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.render_text());
            }
            ExitCode::from(if report.can_run_vms() { 0 } else { 1 })
        }
    }
}
