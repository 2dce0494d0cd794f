//! `kvmbox jail`: run `kvmbox run ...` inside a jail (`kvmbox-jailer`). This module finds, from
//! the run arguments parsed by `kvmbox run`'s own parser, every host file the VM needs (passt
//! too, for a user network), and the cgroup limits the jail sets for it. `kvmbox vm start`
//! runs it as root (kvmbox-store's keeper).

use crate::RunArgs;
use clap::Parser;
use kvmbox_cpu::Accel;
use kvmbox_jailer::{CgroupLimits, Device, Jail, Needed, Rlimit, Spec};
use kvmbox_vmm::{AccelChoice, FileConfig, VmConfig};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args)]
pub(crate) struct JailArgs {
    /// The jail's name: 1-64 ASCII letters, digits and '-'. The jail is CHROOT_BASE/kvmbox/ID/root.
    #[arg(long, value_name = "ID")]
    id: String,
    /// The user the VM runs as (a number, not 0).
    #[arg(long, value_name = "UID")]
    uid: u32,
    /// The group the VM runs as (a number, not 0).
    #[arg(long, value_name = "GID")]
    gid: u32,
    /// Where jails are made.
    #[arg(long, value_name = "DIR", default_value = kvmbox_jailer::DEFAULT_CHROOT_BASE)]
    chroot_base: PathBuf,
    /// Run the VM in this network namespace (a file such as /var/run/netns/NAME).
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// A resource limit, soft and hard: fsize=BYTES, no-file=N, as=BYTES or memlock=BYTES. Repeatable.
    #[arg(long, value_name = "NAME=VALUE")]
    resource_limit: Vec<String>,
    /// Set a cgroup control file for the VM's own group, as Firecracker's jailer: cpu.shares=100, cpu.max=50000, memory.max=268435456 ... (cgroup v2 or v1, whichever has the controller). Repeatable.
    #[arg(long, value_name = "KEY=VALUE")]
    cgroup: Vec<String>,
    /// A host directory the VM writes files in (such as snapshots taken through the API): bind-mounted at its path in the jail and lent to the jail's user while it runs. Repeatable.
    #[arg(long, value_name = "DIR")]
    share: Vec<PathBuf>,
    /// Write the VM's host PID to this file as soon as it is forked.
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,
    /// Detach: print the VM's host PID and exit 0 once it runs; a daemon waits for it and removes the jail.
    #[arg(long)]
    daemonize: bool,
    /// `kvmbox run` arguments, after `--`.
    #[arg(last = true, required = true, value_name = "RUN ARGS")]
    run: Vec<OsString>,
}

/// `kvmbox run`'s parser alone, for the arguments after `--`.
#[derive(Parser)]
#[command(name = "kvmbox run", no_binary_name = true)]
struct RunOnly {
    #[command(flatten)]
    args: RunArgs,
}

fn usage(msg: impl std::fmt::Display) -> ExitCode {
    crate::fail(format!("jail: {msg}"))
}

pub(crate) fn run(j: JailArgs) -> ExitCode {
    let run = match RunOnly::try_parse_from(&j.run) {
        Ok(r) => r.args,
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            return usage(format!(
                "the run arguments: {}",
                first.trim_start_matches("error: ")
            ));
        }
    };
    let rlimits = match j
        .resource_limit
        .iter()
        .map(|s| s.parse::<Rlimit>())
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(r) => r,
        Err(e) => return usage(e),
    };
    let mut cgroup = Vec::new();
    for c in &j.cgroup {
        match c.split_once('=') {
            Some((k, v)) if !k.is_empty() => cgroup.push((k.to_string(), v.to_string())),
            _ => {
                return usage(format!(
                    "--cgroup {c:?}: expected KEY=VALUE, such as cpu.shares=100"
                ))
            }
        }
    }
    let mut needs = match vm_needs(&run) {
        Ok(n) => n,
        Err(e) => return usage(e),
    };
    for d in &j.share {
        if !d.is_dir() {
            return usage(format!("--share {}: not a directory", d.display()));
        }
        needs.file("shared directory", d, true);
    }
    let mut args = vec![OsString::from("run")];
    args.extend(j.run.iter().cloned());
    if needs.limits.any() {
        // The jail's cgroup holds them; the jailed kvmbox could not make one.
        args.push("--cgroup-by-jail".into());
    }
    let mut env = match &needs.passt {
        Some(p) => vec![(OsString::from("KVMBOX_PASST"), p.clone().into_os_string())],
        None => Vec::new(),
    };
    // TAP descriptors the caller attached for the VM (`vm start` as root): inherited through
    // the jail, named to the jailed kvmbox as they were to this one.
    let tap_fds = kvmbox_virtio::net::TAP_FDS_ENV;
    if let Some(v) = std::env::var_os(tap_fds) {
        env.push((tap_fds.into(), v));
    }
    let spec = Spec {
        id: j.id,
        uid: j.uid,
        gid: j.gid,
        chroot_base: j.chroot_base,
        netns: j.netns,
        rlimits,
        cgroup,
        limits: needs.limits,
        files: needs.files,
        writable_dirs: needs.writable_dirs,
        host_links: needs.host_links,
        devices: needs.devices,
        args,
        env,
        proc: needs.passt.is_some(),
        pid_file: j.pid_file,
        daemonize: j.daemonize,
    };
    let status = Jail::prepare(spec).and_then(Jail::run);
    match status {
        Ok(s) => ExitCode::from(u8::try_from(s).unwrap_or(1)),
        Err(e @ kvmbox_jailer::Error::Usage(_)) => usage(e),
        Err(e) => {
            eprintln!("kvmbox: error: jail: {e}");
            ExitCode::from(1)
        }
    }
}

/// What a VM needs from the host.
#[derive(Default)]
struct Needs {
    files: Vec<Needed>,
    writable_dirs: Vec<PathBuf>,
    host_links: Vec<PathBuf>,
    devices: Vec<Device>,
    /// The VM's cgroup limits, which the jail's cgroup holds.
    limits: CgroupLimits,
    /// passt's path, in the jail as on the host, when a user network needs it.
    passt: Option<PathBuf>,
}

impl Needs {
    fn file(&mut self, what: &str, path: &Path, writable: bool) {
        self.files.push(Needed {
            what: what.into(),
            path: path.to_path_buf(),
            writable,
        });
    }
}

/// Every host file, device and socket directory the VM that `run` describes uses.
fn vm_needs(run: &RunArgs) -> Result<Needs, String> {
    let mut n = Needs::default();
    if let (Some(state), Some(mem)) = (&run.restore, &run.restore_mem) {
        restore_needs(&mut n, run, state, mem)?;
        return Ok(n);
    }
    let file = match &run.config {
        Some(c) => {
            n.file("config file", c, false);
            Some(FileConfig::load(c).map_err(|e| e.to_string())?)
        }
        None => None,
    };
    let mut overrides = run.overrides();
    let has_kernel =
        overrides.kernel.is_some() || file.as_ref().is_some_and(FileConfig::has_kernel);
    if !has_kernel {
        if run.api_sock.is_none() {
            return Err(kvmbox_vmm::ConfigError::NoKernel.to_string());
        }
        // Configured through the API later: the files it names are looked up in the jail.
        // Check and collect the rest with the one merge `kvmbox run` uses; this kernel is not
        // placed (any regular file passes the merge's check: this executable).
        let exe = std::env::current_exe().map_err(|e| format!("finding kvmbox: {e}"))?;
        overrides.kernel = Some(exe);
    }
    let cfg = VmConfig::build(file, overrides).map_err(|e| e.to_string())?;
    n.limits(&cfg.limits);
    if has_kernel {
        n.file("kernel", &cfg.kernel, false);
    }
    if let Some(i) = &cfg.initrd {
        n.file("initrd", i, false);
    }
    for m in &cfg.modules {
        n.file("multiboot module", &m.path, false);
    }
    for d in &cfg.disks {
        n.disk(&d.path, d.read_only)?;
    }
    for net in &cfg.nets {
        n.net(net.starts_a_helper())?;
    }
    n.devices(cfg.accel != AccelChoice::Fixed(Accel::Emu));
    n.api_sock(run);
    Ok(n)
}

/// What `--restore STATE --restore-mem MEM` needs: both files, and what the state file says the
/// VM was built from (its disks, its kernel and initrd for a restart, its networks, its backend).
fn restore_needs(n: &mut Needs, run: &RunArgs, state: &Path, mem: &Path) -> Result<(), String> {
    n.file("snapshot state file", state, false);
    n.file("snapshot memory file", mem, false);
    let saved = kvmbox_vmm::snapshot::read_machine_state(state).map_err(|e| e.to_string())?;
    let c = saved.config;
    let o = run.overrides();
    n.limits(&kvmbox_vmm::Limits::from_flags(&o).map_err(|e| e.to_string())?);
    for d in &c.disks {
        n.disk(&d.path, d.read_only)?;
    }
    // Needed again only for a restart; placed when still there.
    if c.kernel.exists() {
        n.file("kernel", &c.kernel, false);
    }
    if let Some(i) = c.initrd.as_ref().filter(|i| i.exists()) {
        n.file("initrd", i, false);
    }
    for net in &c.nets {
        n.net(net.spec.starts_with("user"))?;
    }
    let accel = o.accel.as_deref().unwrap_or(c.accel.as_str());
    n.devices(accel != "emu");
    n.api_sock(run);
    Ok(())
}

impl Needs {
    /// A disk and its backing chain (as `kvmbox disk info` walks it); only the top is written.
    fn disk(&mut self, path: &Path, read_only: bool) -> Result<(), String> {
        let chain =
            kvmbox_block::image::info(path).map_err(|e| format!("disk {}: {e}", path.display()))?;
        for (i, layer) in chain.iter().enumerate() {
            let what = if i == 0 { "disk" } else { "backing file" };
            self.file(what, &layer.path, i == 0 && !read_only);
        }
        Ok(())
    }

    /// `kvmbox run`'s cgroup limits: the jail's cgroup holds them (the jailed kvmbox cannot
    /// make a group).
    fn limits(&mut self, l: &kvmbox_vmm::Limits) {
        self.limits = CgroupLimits {
            cpu_max: l.cpu_max,
            cpu_weight: l.cpu_weight,
            memory_limit: l.memory_limit,
            parent: l.cgroup_parent.clone(),
        };
    }

    /// A network interface: TAP needs /dev/net/tun; a user network (`--net user`) needs
    /// passt, which is placed in the jail and runs there as the jail's user (it makes its own
    /// sandbox inside: a user namespace and an empty root).
    fn net(&mut self, user: bool) -> Result<(), String> {
        if user {
            if self.passt.is_none() {
                let p = kvmbox_store::net::find_passt()
                    .and_then(|p| {
                        std::fs::canonicalize(&p).map_err(|e| format!("{}: {e}", p.display()))
                    })
                    .map_err(|why| format!("--net user needs passt: {why}"))?;
                self.file(kvmbox_jailer::HELPER_PROGRAM, &p, false);
                // Debian's passt runs its AVX2 build, next to it, where the CPU has AVX2.
                let mut avx2 = p.clone().into_os_string();
                avx2.push(".avx2");
                if Path::new(&avx2).is_file() {
                    self.file(kvmbox_jailer::HELPER_PROGRAM, Path::new(&avx2), false);
                }
                // Its DNS forwarder reads the host's resolvers (a symlink, as systemd-resolved
                // makes it, would dangle in the jail: then passt does without).
                let resolv = Path::new("/etc/resolv.conf");
                if std::fs::symlink_metadata(resolv).is_ok_and(|m| m.is_file()) {
                    self.file("resolver configuration", resolv, false);
                }
                self.passt = Some(p);
            }
            return Ok(());
        }
        if !self.devices.contains(&Device::Tun) {
            self.devices.push(Device::Tun);
        }
        Ok(())
    }

    /// /dev/kvm (when the VM may use KVM and the host has it), /dev/urandom, /dev/null.
    fn devices(&mut self, kvm: bool) {
        if kvm && Path::new("/dev/kvm").exists() {
            self.devices.push(Device::Kvm);
        }
        self.devices.extend([Device::Urandom, Device::Null]);
    }

    /// `--api-sock PATH`: its directory in the jail belongs to the user; PATH links to it.
    fn api_sock(&mut self, run: &RunArgs) {
        let Some(sock) = &run.api_sock else {
            return;
        };
        let dir = sock
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        self.writable_dirs.push(dir.to_path_buf());
        self.host_links.push(sock.clone());
    }
}
