//! A VM's settings file, `vm.toml`: the TOML format of `kvmbox run --config`, read by the same
//! parser ([`kvmbox_vmm::FileConfig`]), so a VM folder's settings can be run by hand with
//! `kvmbox run --config vm.toml` and a hand-edited mistake is reported with its line. Paths in
//! the file are relative to the VM's folder (the disks `vm create` makes live there).

use crate::{io_err, Error, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What `vm create` was asked for; `None`/empty means the default.
#[derive(Debug, Default, Clone)]
pub struct CreateOptions {
    /// The kernel; the default guest's when `None`.
    pub kernel: Option<PathBuf>,
    /// The initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: Option<String>,
    /// vCPUs.
    pub cpus: Option<u32>,
    /// Guest memory (`512M`, `2G`, plain MiB).
    pub memory: Option<String>,
    /// `auto`, `kvm` or `emu`.
    pub accel: Option<String>,
    /// Existing images, as `--disk` specs.
    pub disks: Vec<String>,
    /// New qcow2 images to create in the VM's folder, by size.
    pub disk_sizes: Vec<String>,
    /// Network interfaces, as `--net` specs; none given means one user-mode NAT interface
    /// (`user`, as VirtualBox's default NAT adapter), and `none` alone means no network.
    pub nets: Vec<String>,
    /// A virtio-rng device.
    pub rng: bool,
    /// Resource limits.
    pub limits: LimitOptions,
}

/// The resource limits `vm create` and `vm modify` set (`kvmbox run`'s flags and
/// `--config` keys of the same names); `None` leaves a setting as it is, and for `vm modify`
/// the value `none` removes it.
#[derive(Debug, Default, Clone)]
pub struct LimitOptions {
    /// `--cpu-max`: host CPUs.
    pub cpu_max: Option<String>,
    /// `--cpu-weight`: 1-10000.
    pub cpu_weight: Option<String>,
    /// `--memory-limit`: a size.
    pub memory_limit: Option<String>,
    /// `--cpu-affinity`: a host CPU list and/or `VCPU@[LIST]` entries.
    pub cpu_affinity: Option<String>,
}

impl LimitOptions {
    /// Write the limits given into a settings table, each checked as its flag is (the whole
    /// file is checked after); `none` removes a key when `removable`.
    fn apply(&self, t: &mut toml::Table, removable: bool) -> Result<()> {
        let usage = |e: kvmbox_vmm::ConfigError| Error::Usage(e.to_string());
        let keys = [
            ("cpu_max", &self.cpu_max),
            ("cpu_weight", &self.cpu_weight),
            ("memory_limit", &self.memory_limit),
            ("cpu_affinity", &self.cpu_affinity),
        ];
        for (key, value) in keys {
            let Some(v) = value else { continue };
            if removable && v == "none" {
                t.remove(key);
                continue;
            }
            let value: toml::Value = match key {
                "cpu_max" => kvmbox_vmm::limits::parse_cpu_max(v)
                    .map_err(usage)?
                    .cpus()
                    .into(),
                "cpu_weight" => {
                    let w: u32 = v.parse().map_err(|_| {
                        Error::Usage(format!("invalid --cpu-weight '{v}': expected 1 to 10000"))
                    })?;
                    i64::from(kvmbox_vmm::limits::check_cpu_weight(w).map_err(usage)?).into()
                }
                "memory_limit" => {
                    kvmbox_vmm::config::parse_size(v).map_err(usage)?;
                    v.clone().into()
                }
                _ => {
                    kvmbox_vmm::Affinity::parse(v).map_err(usage)?;
                    v.clone().into()
                }
            };
            t.insert(key.into(), value);
        }
        Ok(())
    }
}

impl LimitOptions {
    /// Whether any limit a running VM can change (`--cpu-max`, `--cpu-weight`,
    /// `--memory-limit`) is given.
    pub fn any_live(&self) -> bool {
        self.cpu_max.is_some() || self.cpu_weight.is_some() || self.memory_limit.is_some()
    }

    /// The `PATCH /machine-config` body that gives a running VM's cgroup these limits: `none`
    /// lifts `cpu_max` and `memory_limit_mib` (0) and puts `cpu_weight` back to the kernel's
    /// default, 100. A running VM's memory limit changes in whole MiB.
    fn live_patch(&self) -> Result<String> {
        let usage = |e: kvmbox_vmm::ConfigError| Error::Usage(e.to_string());
        let mut body = serde_json::Map::new();
        if let Some(v) = &self.cpu_max {
            let cpus = match v.as_str() {
                "none" => 0.0,
                v => kvmbox_vmm::limits::parse_cpu_max(v).map_err(usage)?.cpus(),
            };
            body.insert("cpu_max".into(), cpus.into());
        }
        if let Some(v) = &self.cpu_weight {
            let w = match v.as_str() {
                "none" => 100,
                v => v.parse().map_err(|_| {
                    Error::Usage(format!("invalid --cpu-weight '{v}': expected 1 to 10000"))
                })?,
            };
            kvmbox_vmm::limits::check_cpu_weight(w).map_err(usage)?;
            body.insert("cpu_weight".into(), w.into());
        }
        if let Some(v) = &self.memory_limit {
            let mib = match v.as_str() {
                "none" => 0,
                v => {
                    let b = kvmbox_vmm::config::parse_size(v).map_err(usage)?;
                    if b % (1 << 20) != 0 {
                        return Err(Error::Usage(format!(
                            "--memory-limit {v}: a running VM's memory limit changes in whole MiB"
                        )));
                    }
                    b >> 20
                }
            };
            body.insert("memory_limit_mib".into(), mib.into());
        }
        Ok(serde_json::Value::Object(body).to_string())
    }
}

/// The networks `--net` specs ask for: [`DEFAULT_NET`] when none is given, nothing for `none`
/// alone; `none` beside another spec is an error.
pub fn net_specs(given: &[String]) -> Result<Vec<String>> {
    match given {
        [] => Ok(vec![DEFAULT_NET.to_string()]),
        [only] if only == "none" => Ok(Vec::new()),
        _ if given.iter().any(|n| n == "none") => Err(Error::Usage(
            "--net none means no network: give it alone, not beside other --net options".into(),
        )),
        _ => Ok(given.to_vec()),
    }
}

/// The network a VM gets when `vm create` is given no `--net`: user-mode NAT through passt.
pub const DEFAULT_NET: &str = "user";

/// The default guest: what `scripts/run-default.sh` boots (Debian's cloud kernel and the busybox
/// initramfs, prepared by `guest/linux/fetch-kernel.sh` and `build-initramfs.sh` under
/// `$KVMBOX_CACHE`, default `~/.cache/kvmbox`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultGuest {
    /// The kernel.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
}

/// The default guest's command line (as `scripts/run-default.sh`).
pub const DEFAULT_GUEST_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 cryptomgr.notests quiet";

impl DefaultGuest {
    /// The newest prepared default guest, if any.
    pub fn find() -> Option<Self> {
        let cache = match std::env::var_os("KVMBOX_CACHE").filter(|v| !v.is_empty()) {
            Some(c) => PathBuf::from(c),
            None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/kvmbox"),
        };
        let mut kits: Vec<PathBuf> = std::fs::read_dir(cache.join("initramfs"))
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        kits.sort();
        kits.iter().rev().find_map(|kit| {
            let info = std::fs::read_to_string(kit.join("INFO")).ok()?;
            let kernel = PathBuf::from(info.lines().find_map(|l| l.strip_prefix("vmlinuz="))?);
            let initrd = ["initramfs.cpio.gz", "initramfs.cpio.lz4"]
                .iter()
                .map(|f| kit.join(f))
                .find(|p| p.is_file())?;
            kernel.is_file().then_some(Self { kernel, initrd })
        })
    }
}

/// The keys `vm create` writes, in the order a person reads them.
#[derive(Serialize)]
struct SettingsFile {
    kernel: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    initrd: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cmdline: Option<String>,
    cpus: u32,
    memory: String,
    accel: String,
    rng: bool,
    disks: Vec<String>,
    nets: Vec<String>,
}

/// An absolute form of a path given relative to the current directory.
fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).map_err(|e| io_err(format_args!("resolving {}", p.display()), e))
}

/// The settings entry of an existing image given as a `--disk` spec (`kvmbox run`'s parser):
/// the image must exist, its path is made absolute and the options are kept as given.
/// `new_disk` names the flag that makes a new disk instead, for the message.
fn disk_entry(spec: &str, new_disk: &str) -> Result<String> {
    let parsed =
        kvmbox_vmm::config::parse_disk_spec(spec).map_err(|e| Error::Usage(e.to_string()))?;
    if !parsed.path.exists() {
        return Err(Error::Usage(format!(
            "--disk {spec}: {} does not exist ({new_disk} creates a new disk)",
            parsed.path.display()
        )));
    }
    // The path is everything before the first comma; keep the options as given.
    let path_len = spec.find(',').unwrap_or(spec.len());
    Ok(format!(
        "{}{}",
        absolute(&parsed.path)?.display(),
        &spec[path_len..]
    ))
}

/// Write the settings file and create the new disks of a VM in `dir` (empty, new), then load the
/// file back through the `kvmbox run --config` parser, so what was written is known to start.
pub(crate) fn write_new(dir: &Path, o: &CreateOptions) -> Result<()> {
    let usage = |e: kvmbox_vmm::ConfigError| Error::Usage(e.to_string());
    let memory = o.memory.clone().unwrap_or_else(|| "512M".into());
    kvmbox_vmm::config::parse_size(&memory).map_err(usage)?;
    let cpus = o.cpus.unwrap_or(1);
    if cpus == 0 {
        return Err(Error::Usage("invalid --cpus 0: must be at least 1".into()));
    }
    let accel = o.accel.clone().unwrap_or_else(|| "auto".into());
    if !matches!(accel.as_str(), "auto" | "kvm" | "emu") {
        return Err(Error::Usage(format!(
            "invalid --accel '{accel}': expected auto, kvm or emu"
        )));
    }
    let (kernel, initrd, cmdline) = match &o.kernel {
        Some(k) => (
            absolute(k)?,
            o.initrd.as_deref().map(absolute).transpose()?,
            o.cmdline.clone(),
        ),
        None => {
            let g = DefaultGuest::find().ok_or_else(|| {
                Error::Usage(
                    "no --kernel given and the default guest is not prepared: run `bash guest/linux/fetch-kernel.sh && bash guest/linux/build-initramfs.sh` in kvmbox's source tree (or scripts/run-default.sh once), or pass --kernel".into(),
                )
            })?;
            let initrd = o.initrd.as_deref().map(absolute).transpose()?;
            (
                g.kernel,
                Some(initrd.unwrap_or(g.initrd)),
                Some(
                    o.cmdline
                        .clone()
                        .unwrap_or_else(|| DEFAULT_GUEST_CMDLINE.into()),
                ),
            )
        }
    };
    let mut disks = Vec::new();
    for spec in &o.disks {
        disks.push(disk_entry(spec, "--disk-size SIZE")?);
    }
    let mut sizes = Vec::new();
    for s in &o.disk_sizes {
        sizes.push(kvmbox_vmm::config::parse_size(s).map_err(usage)?);
    }
    for size in sizes {
        let file = format!("disk{}.qcow2", disks.len());
        kvmbox_block::image::create(&dir.join(&file), size, kvmbox_block::Format::Qcow2, None)
            .map_err(|e| Error::Usage(format!("--disk-size: {e}")))?;
        disks.push(file);
    }
    let file = SettingsFile {
        kernel,
        initrd,
        cmdline,
        cpus,
        memory,
        accel,
        rng: o.rng || o.kernel.is_none(),
        disks,
        nets: net_specs(&o.nets)?,
    };
    let mut limits = toml::Table::new();
    o.limits.apply(&mut limits, false)?;
    // The limits after the rest (plain keys: the file has no [table] for them to fall into).
    let body = toml::to_string(&file)
        .and_then(|b| Ok(b + &toml::to_string(&limits)?))
        .map_err(|e| Error::Failed(format!("writing the settings: {e}")))?;
    let text = format!(
        "# kvmbox VM settings: the format of `kvmbox run --config`. Relative paths are relative\n\
         # to this folder. Edit while the VM is stopped; `kvmbox vm show` checks the file.\n{body}"
    );
    let path = dir.join("vm.toml");
    std::fs::write(&path, text)
        .map_err(|e| io_err(format_args!("writing {}", path.display()), e))?;
    let loaded = kvmbox_vmm::FileConfig::load(&path).map_err(usage)?;
    kvmbox_vmm::VmConfig::build(Some(loaded), kvmbox_vmm::Overrides::default()).map_err(usage)?;
    Ok(())
}

/// What `vm modify` changes; `None`/empty leaves a setting as it is.
#[derive(Debug, Default, Clone)]
pub struct ModifyOptions {
    /// vCPUs.
    pub cpus: Option<u32>,
    /// Guest memory.
    pub memory: Option<String>,
    /// The kernel.
    pub kernel: Option<PathBuf>,
    /// The initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: Option<String>,
    /// `auto`, `kvm` or `emu`.
    pub accel: Option<String>,
    /// A virtio-rng device on or off.
    pub rng: Option<bool>,
    /// New qcow2 disks to add, by size.
    pub add_disk_sizes: Vec<String>,
    /// Existing images to attach, as `--disk` specs (as `vm create --disk`).
    pub disks: Vec<String>,
    /// Disks to detach: an index in the settings' order (`vm show`'s, from 0) or a path. The
    /// files stay where they are.
    pub remove_disks: Vec<String>,
    /// Resource limits (`none` removes one).
    pub limits: LimitOptions,
    /// The networks, replacing the present ones (`--net` specs; `none` alone: no network).
    pub nets: Option<Vec<String>>,
}

impl crate::Vm {
    /// Change the settings of this stopped VM (the caller holds its lock): the file is edited
    /// key by key (other keys stay as they are), checked by the `kvmbox run --config` parser,
    /// and replaces the old one in one rename.
    pub fn modify(&self, o: &ModifyOptions) -> Result<Modified> {
        let usage = |e: kvmbox_vmm::ConfigError| Error::Usage(e.to_string());
        let path = self.settings_path();
        let text = std::fs::read_to_string(&path)
            .map_err(|e| io_err(format_args!("reading {}", path.display()), e))?;
        let mut t: toml::Table = text
            .parse()
            .map_err(|e| Error::Usage(format!("{}: {e}", path.display())))?;
        if let Some(c) = o.cpus {
            if c == 0 {
                return Err(Error::Usage("invalid --cpus 0: must be at least 1".into()));
            }
            t.insert("cpus".into(), i64::from(c).into());
        }
        if let Some(m) = &o.memory {
            kvmbox_vmm::config::parse_size(m).map_err(usage)?;
            t.insert("memory".into(), m.clone().into());
        }
        for (key, p) in [("kernel", &o.kernel), ("initrd", &o.initrd)] {
            if let Some(p) = p {
                t.insert(key.into(), absolute(p)?.display().to_string().into());
            }
        }
        if let Some(c) = &o.cmdline {
            t.insert("cmdline".into(), c.clone().into());
        }
        if let Some(a) = &o.accel {
            t.insert("accel".into(), a.clone().into());
        }
        if let Some(r) = o.rng {
            t.insert("rng".into(), r.into());
        }
        o.limits.apply(&mut t, true)?;
        if let Some(n) = &o.nets {
            if n.is_empty() {
                return Err(Error::Usage("--net needs a SPEC (or none)".into()));
            }
            t.insert("nets".into(), net_specs(n)?.into());
        }
        let mut disks: Vec<String> = t
            .get("disks")
            .and_then(|v| v.clone().try_into().ok())
            .unwrap_or_default();
        let removed = self.remove_disks(&mut disks, &o.remove_disks)?;
        for spec in &o.disks {
            let entry = disk_entry(spec, "--add-disk-size SIZE")?;
            let path = same_file(&self.disk_file(&entry)?);
            if disks
                .iter()
                .any(|d| self.disk_file(d).map(|f| same_file(&f)).ok().as_ref() == Some(&path))
            {
                return Err(Error::Usage(format!(
                    "--disk {spec}: {} is a disk of VM '{}' already",
                    path.display(),
                    self.name()
                )));
            }
            disks.push(entry);
        }
        let mut sizes = Vec::new();
        for s in &o.add_disk_sizes {
            sizes.push(kvmbox_vmm::config::parse_size(s).map_err(usage)?);
        }
        let mut made = Vec::new();
        for size in sizes {
            let file = (disks.len()..)
                .map(|i| format!("disk{i}.qcow2"))
                .find(|f| !self.dir().join(f).exists())
                .unwrap_or_default();
            let disk = self.dir().join(&file);
            kvmbox_block::image::create(&disk, size, kvmbox_block::Format::Qcow2, None)
                .map_err(|e| Error::Usage(format!("--disk-size: {e}")))?;
            made.push(disk);
            disks.push(file);
        }
        t.insert("disks".into(), disks.into());
        let body =
            toml::to_string(&t).map_err(|e| Error::Failed(format!("writing the settings: {e}")))?;
        let tmp = self.dir().join("vm.toml.new");
        let checked = std::fs::write(
            &tmp,
            format!("# kvmbox VM settings: the format of `kvmbox run --config`.\n{body}"),
        )
        .map_err(|e| io_err(format_args!("writing {}", tmp.display()), e))
        .and_then(|()| kvmbox_vmm::FileConfig::load(&tmp).map_err(usage))
        .and_then(|f| {
            kvmbox_vmm::VmConfig::build(Some(f), kvmbox_vmm::Overrides::default()).map_err(usage)
        })
        .and_then(|_| {
            std::fs::rename(&tmp, &path)
                .map_err(|e| io_err(format_args!("replacing {}", path.display()), e))
        });
        if checked.is_err() {
            let _ = std::fs::remove_file(&tmp);
            for d in made {
                let _ = std::fs::remove_file(d);
            }
        }
        checked.map(|()| Modified { removed })
    }

    /// The image file of a settings `disks` entry (relative paths are relative to the folder).
    fn disk_file(&self, entry: &str) -> Result<PathBuf> {
        let p = kvmbox_vmm::config::parse_disk_spec(entry)
            .map_err(|e| Error::Usage(format!("{}: {e}", self.settings_path().display())))?
            .path;
        Ok(if p.is_absolute() {
            p
        } else {
            self.dir().join(p)
        })
    }

    /// Take the `--remove-disk` disks (indexes into `disks` as it is now, or paths) out of
    /// `disks`; their files, which stay, are returned. A disk holding internal snapshots of
    /// this VM's snapshot tree is refused ([`Error::State`]).
    fn remove_disks(&self, disks: &mut Vec<String>, which: &[String]) -> Result<Vec<PathBuf>> {
        let name = self.name();
        let mut idx = Vec::new();
        for r in which {
            let i = match r.parse::<usize>() {
                Ok(n) if n < disks.len() => n,
                Ok(n) => {
                    return Err(Error::Usage(format!(
                        "--remove-disk {n}: VM '{name}' has {} disk(s), numbered from 0 in `kvmbox vm show {name}`'s order",
                        disks.len()
                    )))
                }
                Err(_) => {
                    let want = [absolute(Path::new(r))?, self.dir().join(r)].map(|p| same_file(&p));
                    disks
                        .iter()
                        .position(|d| {
                            self.disk_file(d)
                                .map(|f| want.contains(&same_file(&f)))
                                .unwrap_or(false)
                        })
                        .ok_or_else(|| {
                            Error::Usage(format!(
                                "--remove-disk {r}: not a disk of VM '{name}' (`kvmbox vm show {name}` lists them)"
                            ))
                        })?
                }
            };
            if !idx.contains(&i) {
                idx.push(i);
            }
        }
        let tree = self.snapshot_tree()?;
        let mut removed = Vec::new();
        for &i in &idx {
            let file = self.disk_file(&disks[i])?;
            if !tree.snapshots.is_empty() {
                let layers = kvmbox_block::image::info(&file)
                    .map_err(|e| Error::Failed(format!("disk {}: {e}", file.display())))?;
                if layers.first().map(|l| l.format.as_str()) == Some("qcow2") {
                    let on_disk = kvmbox_block::snapshot::list(&file)
                        .map_err(|e| Error::Failed(format!("disk {}: {e}", file.display())))?;
                    let held: Vec<&str> = tree
                        .snapshots
                        .iter()
                        .filter(|s| {
                            on_disk
                                .iter()
                                .any(|d| d.name == crate::snapshots::disk_name(&s.name))
                        })
                        .map(|s| s.name.as_str())
                        .collect();
                    if let Some(first) = held.first() {
                        return Err(Error::State(format!(
                            "VM '{name}': disk {} holds its snapshot(s) {} (internal snapshots vm-SNAP), which could not be restored without it: delete them first (kvmbox vm snapshot {name} delete {first})",
                            file.display(),
                            held.join(", ")
                        )));
                    }
                }
            }
            removed.push(file);
        }
        idx.sort_unstable();
        for &i in idx.iter().rev() {
            disks.remove(i);
        }
        Ok(removed)
    }
}

impl crate::Vm {
    /// Change the CPU quota, CPU weight and memory limit of this running (or paused) VM (the
    /// caller holds its lock): the settings file first (checked as [`Self::modify`] checks
    /// it), then the VM's cgroup through its API (`PATCH /machine-config`). When the API
    /// refuses (a VM started without limits has no cgroup), the file is put back as it was.
    pub fn modify_limits_live(&self, limits: &LimitOptions) -> Result<()> {
        if limits.cpu_affinity.is_some() {
            return Err(Error::State(format!(
                "VM '{}' is running: --cpu-affinity cannot change while it runs",
                self.name()
            )));
        }
        let body = limits.live_patch()?;
        let jail = self.jail_info();
        let path = self.settings_path();
        let old = std::fs::read(&path)
            .map_err(|e| io_err(format_args!("reading {}", path.display()), e))?;
        self.modify(&ModifyOptions {
            limits: limits.clone(),
            ..Default::default()
        })?;
        let name = self.name();
        let changed = match &jail {
            // Root sets the jail's group; the jailed VM process has no say.
            Some(j) => self.set_jail_limits(j, limits),
            None => crate::api::call(
                name,
                &self.api_sock(),
                "PATCH",
                "/machine-config",
                Some(&body),
            )
            .map(drop),
        };
        let Err(e) = changed else {
            return Ok(());
        };
        let tmp = self.dir().join("vm.toml.new");
        let put_back = std::fs::write(&tmp, &old)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| io_err(format_args!("putting back {}", path.display()), e));
        if let Err(p) = put_back {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::Failed(format!("{e}; and {p}")));
        }
        Err(match e {
            Error::State(m) if m.contains("without a cgroup") => Error::State(format!(
                "VM '{name}' was started without a CPU quota, CPU weight or memory limit, so it has no cgroup whose limits could change while it runs: stop it, give the limits with `kvmbox vm modify {name}`, and start it ({m}); {} is unchanged",
                path.display()
            )),
            Error::State(m) => Error::State(format!("{m}; {} is unchanged", path.display())),
            Error::Failed(m) => Error::Failed(format!("{m}; {} is unchanged", path.display())),
            other => other,
        })
    }
}

/// What [`crate::Vm::modify`] did beyond the settings file.
#[derive(Debug, Default)]
pub struct Modified {
    /// The image files of the disks detached (`--remove-disk`): they stay where they are.
    pub removed: Vec<PathBuf>,
}

/// A path for comparing files: the canonical one when it exists.
fn same_file(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kvmbox-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn written_settings_load_through_the_run_config_parser() {
        let d = tmp("settings");
        let kernel = d.join("k");
        std::fs::write(&kernel, b"kernel").unwrap();
        let o = CreateOptions {
            kernel: Some(kernel.clone()),
            cpus: Some(2),
            memory: Some("256M".into()),
            accel: Some("emu".into()),
            disk_sizes: vec!["1M".into()],
            ..Default::default()
        };
        let vm = d.join("vm");
        std::fs::create_dir(&vm).unwrap();
        write_new(&vm, &o).unwrap();
        let cfg = kvmbox_vmm::VmConfig::build(
            Some(kvmbox_vmm::FileConfig::load(&vm.join("vm.toml")).unwrap()),
            kvmbox_vmm::Overrides::default(),
        )
        .unwrap();
        assert_eq!(cfg.cpus, 2);
        assert_eq!(cfg.memory, 256 << 20);
        assert_eq!(cfg.kernel, kernel);
        assert_eq!(cfg.disks[0].path, vm.join("disk0.qcow2"));
        assert!(vm.join("disk0.qcow2").is_file());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn resource_limits_are_written_and_read_back() {
        let d = tmp("limits");
        let kernel = d.join("k");
        std::fs::write(&kernel, b"kernel").unwrap();
        let limits = LimitOptions {
            cpu_max: Some("0.5".into()),
            cpu_weight: Some("300".into()),
            memory_limit: Some("300M".into()),
            cpu_affinity: Some("0".into()),
        };
        let o = CreateOptions {
            kernel: Some(kernel.clone()),
            memory: Some("256M".into()),
            limits,
            ..Default::default()
        };
        let vm = d.join("vm");
        std::fs::create_dir(&vm).unwrap();
        write_new(&vm, &o).unwrap();
        let text = std::fs::read_to_string(vm.join("vm.toml")).unwrap();
        assert!(text.contains("cpu_max = 0.5\n"), "{text}");
        let cfg = kvmbox_vmm::VmConfig::build(
            Some(kvmbox_vmm::FileConfig::load(&vm.join("vm.toml")).unwrap()),
            kvmbox_vmm::Overrides::default(),
        )
        .unwrap();
        assert_eq!(cfg.limits.cpu_max.unwrap().quota_us, 50_000);
        assert_eq!(cfg.limits.cpu_weight, Some(300));
        assert_eq!(cfg.limits.memory_limit, Some(300 << 20));
        assert_eq!(cfg.limits.affinity.of(0), Some(&[0][..]));
        // A limit under the guest's memory is refused when the file is read back.
        let o = CreateOptions {
            limits: LimitOptions {
                memory_limit: Some("256M".into()),
                ..Default::default()
            },
            ..o
        };
        std::fs::remove_dir_all(&vm).unwrap();
        std::fs::create_dir(&vm).unwrap();
        let e = write_new(&vm, &o).unwrap_err().to_string();
        assert!(
            e.contains("--memory-limit 256 MiB is below the guest's memory"),
            "{e}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn live_limits_become_the_machine_config_patch() {
        let patch = |cpu_max: &str, cpu_weight: &str, memory_limit: &str| {
            LimitOptions {
                cpu_max: Some(cpu_max.into()),
                cpu_weight: Some(cpu_weight.into()),
                memory_limit: Some(memory_limit.into()),
                cpu_affinity: None,
            }
            .live_patch()
            .map(|b| serde_json::from_str::<serde_json::Value>(&b).unwrap())
        };
        assert_eq!(
            patch("1.5", "200", "1G").unwrap(),
            serde_json::json!({"cpu_max": 1.5, "cpu_weight": 200, "memory_limit_mib": 1024})
        );
        // `none`: the quota and the memory limit lifted, the weight back to the default.
        assert_eq!(
            patch("none", "none", "none").unwrap(),
            serde_json::json!({"cpu_max": 0.0, "cpu_weight": 100, "memory_limit_mib": 0})
        );
        let only_weight = LimitOptions {
            cpu_weight: Some("7".into()),
            ..Default::default()
        };
        assert_eq!(only_weight.live_patch().unwrap(), r#"{"cpu_weight":7}"#);
        for (args, needle) in [
            (("1", "1", "1536K"), "in whole MiB"),
            (("1", "0", "1G"), "--cpu-weight"),
            (("1", "x", "1G"), "invalid --cpu-weight 'x'"),
            (("lots", "1", "1G"), "invalid --cpu-max 'lots'"),
            (("1", "1", "12Q"), "invalid size '12Q'"),
        ] {
            let e = patch(args.0, args.1, args.2).unwrap_err().to_string();
            assert!(e.contains(needle), "{e} lacks {needle}");
        }
    }

    #[test]
    fn bad_values_are_refused_before_anything_is_written() {
        let d = tmp("bad");
        let kernel = d.join("k");
        std::fs::write(&kernel, b"kernel").unwrap();
        for (o, needle) in [
            (
                CreateOptions {
                    memory: Some("12Q".into()),
                    ..Default::default()
                },
                "invalid size '12Q'",
            ),
            (
                CreateOptions {
                    disk_sizes: vec!["lots".into()],
                    ..Default::default()
                },
                "invalid size 'lots'",
            ),
            (
                CreateOptions {
                    cpus: Some(0),
                    ..Default::default()
                },
                "--cpus 0",
            ),
            (
                CreateOptions {
                    accel: Some("fast".into()),
                    ..Default::default()
                },
                "--accel 'fast'",
            ),
            (
                CreateOptions {
                    limits: LimitOptions {
                        cpu_weight: Some("0".into()),
                        ..Default::default()
                    },
                    ..Default::default()
                },
                "--cpu-weight",
            ),
            (
                CreateOptions {
                    limits: LimitOptions {
                        cpu_affinity: Some("0@".into()),
                        ..Default::default()
                    },
                    ..Default::default()
                },
                "invalid --cpu-affinity",
            ),
        ] {
            let o = CreateOptions {
                kernel: Some(kernel.clone()),
                ..o
            };
            let vm = d.join("vm");
            let _ = std::fs::remove_dir_all(&vm);
            std::fs::create_dir(&vm).unwrap();
            let e = write_new(&vm, &o).unwrap_err().to_string();
            assert!(e.contains(needle), "{e} lacks {needle}");
            assert!(!vm.join("vm.toml").exists());
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
}
