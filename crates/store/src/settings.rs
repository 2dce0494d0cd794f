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
    /// Network interfaces, as `--net` specs.
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
pub const DEFAULT_GUEST_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";

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
        let parsed = kvmbox_vmm::config::parse_disk_spec(spec).map_err(usage)?;
        if !parsed.path.exists() {
            return Err(Error::Usage(format!(
                "--disk {spec}: {} does not exist (--disk-size SIZE creates a new disk)",
                parsed.path.display()
            )));
        }
        // The path is everything before the first comma; keep the options as given.
        let path_len = spec.find(',').unwrap_or(spec.len());
        disks.push(format!(
            "{}{}",
            absolute(&parsed.path)?.display(),
            &spec[path_len..]
        ));
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
        nets: o.nets.clone(),
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
    /// Resource limits (`none` removes one).
    pub limits: LimitOptions,
}

impl crate::Vm {
    /// Change the settings of this stopped VM (the caller holds its lock): the file is edited
    /// key by key (other keys stay as they are), checked by the `kvmbox run --config` parser,
    /// and replaces the old one in one rename.
    pub fn modify(&self, o: &ModifyOptions) -> Result<()> {
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
        let mut disks: Vec<String> = t
            .get("disks")
            .and_then(|v| v.clone().try_into().ok())
            .unwrap_or_default();
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
        checked
    }
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
