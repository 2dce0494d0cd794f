//! What a VM is made of: the settings from the command line and from a TOML file.

use crate::limits::Limits;
use kvmbox_cpu::Accel;
use kvmbox_ratelimit::RateLimiterConfig;
use kvmbox_virtio::block::DiskConfig;
use kvmbox_virtio::net::NetConfig;
use kvmbox_virtio::vsock::VsockConfig;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// A configuration error: one line naming what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A size that does not parse.
    #[error("invalid size '{0}': expected a number with an optional K, M, G or T suffix (plain numbers are MiB)")]
    Size(String),
    /// A vCPU count out of range.
    #[error("invalid vCPU count {0}: must be at least 1")]
    Cpus(u32),
    /// The config file cannot be read.
    #[error("config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has unknown keys.
    #[error("config file {path}: {msg}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, first line.
        msg: String,
    },
    /// No kernel given.
    #[error("no kernel given: pass --kernel PATH or set kernel = \"PATH\" in the config file")]
    NoKernel,
    /// A file the user named cannot be used: wrong type (a FIFO, a device) or too large.
    #[error("{what} {path}: {msg}")]
    File {
        /// Which setting names it ("kernel", "initrd", "disk", "config file").
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// More guest memory than this host can back.
    #[error("guest memory of {asked}: more than this host's RAM + swap ({host})")]
    MemoryAboveHost {
        /// The size asked for.
        asked: kvmbox_arch::ByteSize,
        /// RAM + swap.
        host: kvmbox_arch::ByteSize,
    },
    /// Unknown value.
    #[error("{0}")]
    Invalid(String),
}

/// The largest config file kvmbox reads (a config file is a few hundred bytes).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// What kind of file `meta` describes, when it is not one kvmbox reads as an image.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}

/// Refuse a file the user named for `what` unless it is a regular file (or, with `block_ok`, a
/// block device): reading a FIFO blocks forever and `/dev/zero` never ends. A path that does
/// not exist passes here; opening it reports that.
pub fn check_user_file(what: &'static str, path: &Path, block_ok: bool) -> Result<(), ConfigError> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    let t = meta.file_type();
    if t.is_file() || (block_ok && t.is_block_device()) {
        return Ok(());
    }
    let allowed = if block_ok {
        "a regular file or a block device"
    } else {
        "a regular file"
    };
    Err(ConfigError::File {
        what,
        path: path.to_path_buf(),
        msg: format!("is {}, not {allowed}", file_kind(&meta)),
    })
}

/// Guest RAM must fit in this host's RAM + swap (`/proc/meminfo`), whichever engine runs it:
/// KVM refuses such a memory slot and the engine would be killed by the OOM killer on first use.
fn check_memory_fits_host(bytes: u64) -> Result<(), ConfigError> {
    match host_ram_and_swap() {
        Some(host) if bytes > host => Err(ConfigError::MemoryAboveHost {
            asked: kvmbox_arch::ByteSize(bytes),
            host: kvmbox_arch::ByteSize(host),
        }),
        _ => Ok(()),
    }
}

/// MemTotal + SwapTotal from `/proc/meminfo`, in bytes.
fn host_ram_and_swap() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    Some((kib("MemTotal:")? + kib("SwapTotal:").unwrap_or(0)) << 10)
}

/// What to do when the guest resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnReboot {
    /// kvmbox exits with status [`crate::EXIT_REBOOT`].
    #[default]
    Exit,
    /// kvmbox boots the VM again from scratch.
    Restart,
}

impl std::str::FromStr for OnReboot {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "exit" => Ok(OnReboot::Exit),
            "restart" => Ok(OnReboot::Restart),
            o => Err(ConfigError::Invalid(format!(
                "invalid --on-reboot '{o}': expected exit or restart"
            ))),
        }
    }
}

/// How virtio devices reach the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VirtioTransport {
    /// virtio-pci (modern) on PCI bus 0: what stock distribution kernels find.
    #[default]
    Pci,
    /// virtio-mmio, announced with `virtio_mmio.device=` on the kernel command line
    /// (microVM kernels built with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES).
    Mmio,
}

impl std::str::FromStr for VirtioTransport {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "pci" => Ok(VirtioTransport::Pci),
            "mmio" => Ok(VirtioTransport::Mmio),
            o => Err(ConfigError::Invalid(format!(
                "invalid --virtio '{o}': expected pci or mmio"
            ))),
        }
    }
}

/// Which CPU the guest is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuModel {
    /// Everything the backend offers (KVM: the host's CPU; the engine: its own model).
    #[default]
    Host,
    /// The engine's CPU model less what this host's KVM cannot offer, on either backend: a
    /// VM started with it can be snapshotted on one backend and restored on the other.
    Portable,
}

impl std::str::FromStr for CpuModel {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "host" => Ok(CpuModel::Host),
            "portable" => Ok(CpuModel::Portable),
            o => Err(ConfigError::Invalid(format!(
                "invalid --cpu-model '{o}': expected host or portable"
            ))),
        }
    }
}

/// Parse a memory size: `512`, `512M`, `2G`, `1048576K`, `4294967296B`. Plain numbers are MiB,
/// as in QEMU's `-m`.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    kvmbox_ratelimit::parse_scaled(s, 1 << 20)
        .filter(|&v| v > 0)
        .ok_or_else(|| ConfigError::Size(s.to_string()))
}

/// Parse one `--disk` spec (also what `PUT /drives` becomes).
pub fn parse_disk_spec(spec: &str) -> Result<DiskConfig, ConfigError> {
    spec.parse::<DiskConfig>()
        .map_err(|e| ConfigError::Invalid(e.to_string()))
}

/// Sizes in a TOML file: a string with a suffix, or an integer number of MiB.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Mib(u64),
    Text(String),
}

/// The `[vm]`-less TOML file: every key optional, flags override it.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    cpus: Option<u32>,
    memory: Option<SizeValue>,
    accel: Option<String>,
    on_reboot: Option<OnReboot>,
    pvh: Option<bool>,
    #[serde(default)]
    disks: Vec<DiskEntry>,
    #[serde(default)]
    nets: Vec<NetEntry>,
    rng: Option<bool>,
    /// `cid=N,uds=PATH` as `--vsock` (a relative PATH is relative to the file).
    vsock: Option<String>,
    virtio: Option<VirtioTransport>,
    #[serde(default)]
    modules: Vec<String>,
    testdev: Option<bool>,
    cpu_model: Option<CpuModel>,
    track_dirty_pages: Option<bool>,
    /// Resource limits (`--cpu-max` etc.).
    cpu_max: Option<f64>,
    cpu_weight: Option<u32>,
    memory_limit: Option<SizeValue>,
    cpu_affinity: Option<String>,
    cgroup_parent: Option<PathBuf>,
    /// The file's directory: relative paths in the file are relative to it.
    #[serde(skip)]
    dir: PathBuf,
}

/// One of the file's `disks`: a `--disk` spec, or a table with the spec and a Firecracker
/// `rate_limiter` object (`{ spec = "d.img", rate_limiter = { bandwidth = { size = 1048576,
/// refill_time = 1000 } } }`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum DiskEntry {
    Spec(String),
    Table(DiskTable),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskTable {
    spec: String,
    rate_limiter: Option<RateLimiterConfig>,
}

/// One of the file's `nets`: a `--net` spec, or a table with the spec and Firecracker's
/// `rx_rate_limiter`/`tx_rate_limiter` objects.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum NetEntry {
    Spec(String),
    Table(NetTable),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetTable {
    spec: String,
    rx_rate_limiter: Option<RateLimiterConfig>,
    tx_rate_limiter: Option<RateLimiterConfig>,
}

/// `base` with the buckets `obj` gives (a `rate_limiter` object of the file, checked).
fn with_limiter(
    base: RateLimiterConfig,
    obj: Option<RateLimiterConfig>,
    what: &str,
) -> Result<RateLimiterConfig, ConfigError> {
    let Some(obj) = obj else { return Ok(base) };
    obj.validate()
        .map_err(|e| ConfigError::Invalid(format!("{what}: {e}")))?;
    Ok(base.patched(&obj))
}

impl FileConfig {
    /// Whether the file names a kernel.
    pub fn has_kernel(&self) -> bool {
        self.kernel.is_some()
    }

    /// Read and parse a config file: a regular file of at most [`MAX_CONFIG_BYTES`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let read_err = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        // Non-blocking, so that opening a FIFO returns at once and is refused below.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        let file_err = |msg: String| ConfigError::File {
            what: "config file",
            path: path.to_path_buf(),
            msg,
        };
        if !meta.is_file() {
            return Err(file_err(format!(
                "is {}, not a regular file",
                file_kind(&meta)
            )));
        }
        let mut bytes = Vec::new();
        file.take(MAX_CONFIG_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        if bytes.len() as u64 > MAX_CONFIG_BYTES {
            return Err(file_err(format!(
                "larger than {} KiB",
                MAX_CONFIG_BYTES >> 10
            )));
        }
        let text = String::from_utf8(bytes).map_err(|_| file_err("is not UTF-8 text".into()))?;
        let mut cfg: Self = Self::parse(path, &text)?;
        cfg.dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(cfg)
    }

    /// A path from the file, relative to the file's directory.
    fn resolve(&self, p: PathBuf) -> PathBuf {
        self.dir.join(p)
    }

    fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let first = e.message().lines().next().unwrap_or("parse error");
            let at = e
                .span()
                .map(|sp| {
                    let line_no = text[..sp.start.min(text.len())].matches('\n').count() + 1;
                    let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
                    format!(" (line {line_no}: {line})")
                })
                .unwrap_or_default();
            ConfigError::Parse {
                path: path.to_path_buf(),
                msg: format!("{first}{at}"),
            }
        })
    }
}

/// Settings given on the command line; `None` means "not given".
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// --kernel
    pub kernel: Option<PathBuf>,
    /// --initrd
    pub initrd: Option<PathBuf>,
    /// --cmdline
    pub cmdline: Option<String>,
    /// --cpus
    pub cpus: Option<u32>,
    /// --memory
    pub memory: Option<String>,
    /// --accel
    pub accel: Option<String>,
    /// --on-reboot
    pub on_reboot: Option<String>,
    /// --no-pvh
    pub no_pvh: bool,
    /// --disk, each `PATH[,ro][,serial=ID]`
    pub disks: Vec<String>,
    /// --net, each `tap=NAME[,mac=MAC]` or `user[,hostfwd=RULE]...[,mac=MAC]`
    pub nets: Vec<String>,
    /// --rng
    pub rng: bool,
    /// --vsock `cid=N,uds=PATH`
    pub vsock: Option<String>,
    /// --virtio
    pub virtio: Option<String>,
    /// --module, each `PATH[,CMDLINE]`
    pub modules: Vec<String>,
    /// --testdev
    pub testdev: bool,
    /// --cpu-model
    pub cpu_model: Option<String>,
    /// --track-dirty-pages
    pub track_dirty_pages: bool,
    /// --cpu-max (host CPUs)
    pub cpu_max: Option<String>,
    /// --cpu-weight
    pub cpu_weight: Option<u32>,
    /// --memory-limit
    pub memory_limit: Option<String>,
    /// --cpu-affinity
    pub cpu_affinity: Option<String>,
    /// --cgroup-parent
    pub cgroup_parent: Option<PathBuf>,
}

/// Which accelerator was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    /// A specific backend.
    Fixed(Accel),
    /// KVM where guest kernel code runs at hardware speed, the software engine otherwise.
    Auto,
}

/// A complete, validated VM configuration.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Kernel image: bzImage, ELF vmlinux, or a freestanding ELF.
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// CPU backend.
    pub accel: AccelChoice,
    /// Reset behaviour.
    pub on_reboot: OnReboot,
    /// Use an ELF kernel's PVH entry when it has one.
    pub pvh: bool,
    /// virtio-blk disks.
    pub disks: Vec<DiskConfig>,
    /// virtio-net interfaces.
    pub nets: Vec<NetConfig>,
    /// A virtio-rng device.
    pub rng: bool,
    /// A virtio-vsock device.
    pub vsock: Option<VsockConfig>,
    /// Transport for virtio devices.
    pub virtio: VirtioTransport,
    /// Multiboot modules after the initrd.
    pub modules: Vec<kvmbox_arch::multiboot::Module>,
    /// QEMU's pc-testdev ports (kvm-unit-tests).
    pub testdev: bool,
    /// The CPU the guest is shown.
    pub cpu_model: CpuModel,
    /// Log the pages the guest and the devices write, for Diff snapshots (Firecracker's
    /// `track_dirty_pages`).
    pub track_dirty_pages: bool,
    /// CPU quota and weight, memory limit, vCPU pinning.
    pub limits: Limits,
}

/// The command line used when none is given: serial console, reboot through the i8042
/// (which kvmbox turns into its reboot exit), and reboot right away on panic.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";
/// Default guest memory.
pub const DEFAULT_MEMORY: u64 = 512 << 20;

fn parse_accel(s: &str) -> Result<AccelChoice, ConfigError> {
    match s {
        "auto" => Ok(AccelChoice::Auto),
        other => other.parse::<Accel>().map(AccelChoice::Fixed).map_err(|_| {
            ConfigError::Invalid(format!(
                "invalid accelerator '{other}': expected auto, kvm or emu"
            ))
        }),
    }
}

/// The resource limits flags and file give (flags win), each checked on its own;
/// [`Limits::check`] then checks them against the VM.
pub(crate) fn limits_from(o: &Overrides, f: &FileConfig) -> Result<Limits, ConfigError> {
    let limits = Limits {
        cpu_max: match (o.cpu_max.as_deref(), f.cpu_max) {
            (Some(s), _) => Some(crate::limits::parse_cpu_max(s)?),
            (None, Some(c)) => Some(crate::limits::check_cpu_max(c)?),
            (None, None) => None,
        },
        cpu_weight: o
            .cpu_weight
            .or(f.cpu_weight)
            .map(crate::limits::check_cpu_weight)
            .transpose()?,
        memory_limit: match (o.memory_limit.clone(), f.memory_limit.clone()) {
            (Some(s), _) | (None, Some(SizeValue::Text(s))) => Some(parse_size(&s)?),
            (None, Some(SizeValue::Mib(m))) => Some(
                m.checked_mul(1 << 20)
                    .filter(|&v| v > 0)
                    .ok_or_else(|| ConfigError::Size(m.to_string()))?,
            ),
            (None, None) => None,
        },
        cgroup_parent: o.cgroup_parent.clone().or(f.cgroup_parent.clone()),
        affinity: match o.cpu_affinity.as_deref().or(f.cpu_affinity.as_deref()) {
            Some(s) => crate::limits::Affinity::parse(s)?,
            None => Default::default(),
        },
    };
    if limits.cgroup_parent.is_some() && !limits.needs_cgroup() {
        return Err(ConfigError::Invalid(
            "--cgroup-parent needs a limit to set: --cpu-max, --cpu-weight or --memory-limit"
                .into(),
        ));
    }
    Ok(limits)
}

impl Limits {
    /// The limits the resource-limit flags of `o` give (for `--restore`, which takes no file);
    /// [`Limits::check`] checks them against the restored VM.
    pub fn from_flags(o: &Overrides) -> Result<Self, ConfigError> {
        limits_from(o, &FileConfig::default())
    }
}

impl VmConfig {
    /// Merge a config file (if any) with command-line overrides and validate the result.
    pub fn build(file: Option<FileConfig>, o: Overrides) -> Result<Self, ConfigError> {
        let f = file.unwrap_or_default();
        let limits = limits_from(&o, &f)?;
        let kernel = o
            .kernel
            .or_else(|| f.kernel.clone().map(|k| f.resolve(k)))
            .ok_or(ConfigError::NoKernel)?;
        check_user_file("kernel", &kernel, false)?;
        let initrd = o.initrd.or_else(|| f.initrd.clone().map(|i| f.resolve(i)));
        if let Some(i) = &initrd {
            check_user_file("initrd", i, false)?;
        }
        let cpus = o.cpus.or(f.cpus).unwrap_or(1);
        if cpus == 0 {
            return Err(ConfigError::Cpus(cpus));
        }
        let memory = match (o.memory, f.memory.clone()) {
            (Some(s), _) | (None, Some(SizeValue::Text(s))) => parse_size(&s)?,
            (None, Some(SizeValue::Mib(m))) => m
                .checked_mul(1 << 20)
                .filter(|&v| v > 0)
                .ok_or_else(|| ConfigError::Size(m.to_string()))?,
            (None, None) => DEFAULT_MEMORY,
        };
        check_memory_fits_host(memory)?;
        let accel = match o.accel.or(f.accel.clone()) {
            Some(s) => parse_accel(&s)?,
            None => AccelChoice::Auto,
        };
        let on_reboot = match o.on_reboot {
            Some(s) => s.parse()?,
            None => f.on_reboot.unwrap_or_default(),
        };
        // Flags add to the file's devices (as repeated flags add to each other).
        let parse_disk = |d: &String| parse_disk_spec(d);
        let mut disks = Vec::new();
        for d in &f.disks {
            let mut disk = match d {
                DiskEntry::Spec(spec) => parse_disk(spec)?,
                DiskEntry::Table(t) => {
                    let mut disk = parse_disk(&t.spec)?;
                    disk.rate_limiter = with_limiter(
                        disk.rate_limiter,
                        t.rate_limiter,
                        &format!("disk '{}': rate_limiter", t.spec),
                    )?;
                    disk
                }
            };
            disk.path = f.resolve(disk.path);
            disks.push(disk);
        }
        for d in &o.disks {
            disks.push(parse_disk(d)?);
        }
        for d in &disks {
            check_user_file("disk", &d.path, true)?;
        }
        let parse_net = |n: &str| {
            n.parse::<NetConfig>()
                .map_err(|e| ConfigError::Invalid(e.to_string()))
        };
        let mut nets = Vec::new();
        for n in &f.nets {
            nets.push(match n {
                NetEntry::Spec(spec) => parse_net(spec)?,
                NetEntry::Table(t) => {
                    let mut net = parse_net(&t.spec)?;
                    let what = |d: &str| format!("net '{}': {d}_rate_limiter", t.spec);
                    net.rx_limiter = with_limiter(net.rx_limiter, t.rx_rate_limiter, &what("rx"))?;
                    net.tx_limiter = with_limiter(net.tx_limiter, t.tx_rate_limiter, &what("tx"))?;
                    net
                }
            });
        }
        for n in &o.nets {
            nets.push(parse_net(n)?);
        }
        let parse_vsock = |v: &str| {
            v.parse::<VsockConfig>()
                .map_err(|e| ConfigError::Invalid(e.to_string()))
        };
        let vsock = match (&o.vsock, &f.vsock) {
            (Some(v), _) => Some(parse_vsock(v)?),
            (None, Some(v)) => {
                let mut v = parse_vsock(v)?;
                v.uds_path = f.resolve(v.uds_path);
                Some(
                    VsockConfig::new(v.guest_cid.into(), v.uds_path)
                        .map_err(|e| ConfigError::Invalid(format!("vsock in the file: {e}")))?,
                )
            }
            (None, None) => None,
        };
        let virtio = match o.virtio {
            Some(s) => s.parse()?,
            None => f.virtio.unwrap_or_default(),
        };
        // The file's module paths are relative to the file, as its other paths.
        let parse = |m: &String| m.parse::<kvmbox_arch::multiboot::Module>();
        let mut modules = Vec::new();
        for m in &f.modules {
            let mut m = parse(m).map_err(ConfigError::Invalid)?;
            m.path = f.resolve(m.path);
            modules.push(m);
        }
        for m in &o.modules {
            modules.push(parse(m).map_err(ConfigError::Invalid)?);
        }
        let cpu_model = match o.cpu_model {
            Some(s) => s.parse()?,
            None => f.cpu_model.unwrap_or_default(),
        };
        limits.check(cpus, memory)?;
        Ok(VmConfig {
            limits,
            modules,
            testdev: o.testdev || f.testdev.unwrap_or(false),
            cpu_model,
            track_dirty_pages: o.track_dirty_pages || f.track_dirty_pages.unwrap_or(false),
            disks,
            nets,
            rng: o.rng || f.rng.unwrap_or(false),
            vsock,
            virtio,
            kernel,
            initrd,
            cmdline: o
                .cmdline
                .or(f.cmdline)
                .unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
            cpus,
            memory,
            accel,
            on_reboot,
            pvh: !o.no_pvh && f.pvh.unwrap_or(true),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512 << 20);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("8g").unwrap(), 8 << 30);
        assert_eq!(parse_size("64k").unwrap(), 64 << 10);
        assert_eq!(parse_size("4096B").unwrap(), 4096);
        for bad in ["", "M", "12Q", "-5M", "0", "1.5G", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn flags_override_file() {
        let f: FileConfig =
            toml::from_str("kernel = \"/k\"\ncpus = 4\nmemory = \"1G\"\naccel = \"kvm\"\n")
                .unwrap();
        let o = Overrides {
            cpus: Some(2),
            ..Default::default()
        };
        let c = VmConfig::build(Some(f), o).unwrap();
        assert_eq!(c.cpus, 2);
        assert_eq!(c.memory, 1 << 30);
        assert_eq!(c.accel, AccelChoice::Fixed(Accel::Kvm));
        assert_eq!(c.kernel, PathBuf::from("/k"));
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
    }

    #[test]
    fn memory_as_integer_mib() {
        let f: FileConfig = toml::from_str("kernel = \"/k\"\nmemory = 256\n").unwrap();
        assert_eq!(
            VmConfig::build(Some(f), Overrides::default())
                .unwrap()
                .memory,
            256 << 20
        );
    }

    #[test]
    fn resource_limits_from_file_and_flags() {
        let f: FileConfig = toml::from_str(
            "kernel = \"/k\"\nmemory = 128\ncpu_max = 1\ncpu_weight = 50\nmemory_limit = 200\ncpu_affinity = \"0\"\ncgroup_parent = \"vms\"\n",
        )
        .unwrap();
        let c = VmConfig::build(Some(f.clone()), Overrides::default()).unwrap();
        assert_eq!(c.limits.cpu_max.unwrap().quota_us, 100_000);
        assert_eq!(c.limits.cpu_weight, Some(50));
        assert_eq!(c.limits.memory_limit, Some(200 << 20));
        assert_eq!(c.limits.affinity.of(0), Some(&[0][..]));
        assert_eq!(c.limits.cgroup_parent, Some(PathBuf::from("vms")));
        // Flags win.
        let o = Overrides {
            cpu_max: Some("0.5".into()),
            memory_limit: Some("1G".into()),
            ..Default::default()
        };
        let c = VmConfig::build(Some(f), o).unwrap();
        assert_eq!(c.limits.cpu_max.unwrap().quota_us, 50_000);
        assert_eq!(c.limits.memory_limit, Some(1 << 30));
        // Nothing asked: no limits, no group.
        let o = Overrides {
            kernel: Some("/k".into()),
            ..Default::default()
        };
        assert!(!VmConfig::build(None, o).unwrap().limits.needs_cgroup());
    }

    #[test]
    fn unknown_key_is_rejected() {
        let e = toml::from_str::<FileConfig>("kernel = \"/k\"\nmemroy = 5\n").unwrap_err();
        assert!(
            e.message().contains("unknown field `memroy`"),
            "{}",
            e.message()
        );
    }

    #[test]
    fn zero_cpus_and_missing_kernel() {
        let o = Overrides {
            kernel: Some("/k".into()),
            cpus: Some(0),
            ..Default::default()
        };
        assert!(matches!(
            VmConfig::build(None, o),
            Err(ConfigError::Cpus(0))
        ));
        assert!(matches!(
            VmConfig::build(None, Overrides::default()),
            Err(ConfigError::NoKernel)
        ));
    }

    #[test]
    fn vsock_from_file_and_flag() {
        let dir = std::env::temp_dir().join(format!("kvmbox-cfg-vsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.toml");
        std::fs::write(&path, "kernel = \"/k\"\nvsock = \"cid=5,uds=v.sock\"\n").unwrap();
        let f = FileConfig::load(&path).unwrap();
        let c = VmConfig::build(Some(f.clone()), Overrides::default()).unwrap();
        let v = c.vsock.unwrap();
        assert_eq!(v.guest_cid, 5);
        assert_eq!(v.uds_path, dir.join("v.sock"), "relative to the file");
        let o = Overrides {
            vsock: Some("cid=7,uds=/run/x.sock".into()),
            ..Default::default()
        };
        let v = VmConfig::build(Some(f), o).unwrap().vsock.unwrap();
        assert_eq!((v.guest_cid, v.uds_path), (7, PathBuf::from("/run/x.sock")));
        let o = Overrides {
            kernel: Some("/k".into()),
            vsock: Some("cid=1,uds=/x".into()),
            ..Default::default()
        };
        let e = VmConfig::build(None, o).unwrap_err().to_string();
        assert!(
            e.contains("--vsock 'cid=1,uds=/x': vsock guest CID 1 must be 3"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn file_disks_and_nets_take_firecrackers_rate_limiter_objects() {
        let dir = std::env::temp_dir().join(format!("kvmbox-cfg-rl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("d.img"), [0u8; 512]).unwrap();
        let path = dir.join("vm.toml");
        let load = |text: &str| {
            std::fs::write(&path, text).unwrap();
            let f = FileConfig::load(&path)?;
            VmConfig::build(Some(f), Overrides::default())
        };
        let c = load(
            "kernel = \"/k\"\n\
             [[disks]]\nspec = \"d.img,iops=100\"\n\
             rate_limiter = { bandwidth = { size = 1048576, one_time_burst = 4096, refill_time = 100 } }\n\
             [[nets]]\nspec = \"tap=t0,rx_bw=1M\"\n\
             tx_rate_limiter = { ops = { size = 10, refill_time = 1000 } }\n",
        )
        .unwrap();
        let rl = c.disks[0].rate_limiter;
        assert_eq!(
            rl.bandwidth,
            Some(kvmbox_ratelimit::BucketConfig {
                size: 1 << 20,
                one_time_burst: 4096,
                refill_time: 100
            })
        );
        assert_eq!(rl.ops.map(|b| b.size), Some(100));
        assert_eq!(
            c.nets[0].rx_limiter.bandwidth.map(|b| b.size),
            Some(1 << 20)
        );
        assert_eq!(c.nets[0].tx_limiter.ops.map(|b| b.size), Some(10));
        // A zero size in the object removes what the spec gave (Firecracker's rule).
        let c = load(
            "kernel = \"/k\"\n[[disks]]\nspec = \"d.img,iops=100\"\n\
             rate_limiter = { ops = { size = 0, refill_time = 0 } }\n",
        )
        .unwrap();
        assert!(c.disks[0].rate_limiter.is_unlimited());
        let e = load(
            "kernel = \"/k\"\n[[disks]]\nspec = \"d.img\"\n\
             rate_limiter = { ops = { size = 1, refill_time = 9223372036854775807 } }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("rate_limiter: ops.refill_time"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn file_paths_resolve_against_the_file() {
        let dir = std::env::temp_dir().join(format!("kvmbox-cfg-rel-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.toml");
        std::fs::write(
            &path,
            "kernel = \"k.elf\"\ninitrd = \"/abs/initrd\"\ndisks = [\"d/disk.img,ro\"]\n",
        )
        .unwrap();
        let f = FileConfig::load(&path).unwrap();
        let o = Overrides {
            disks: vec!["flag.img".into()],
            ..Default::default()
        };
        let c = VmConfig::build(Some(f), o).unwrap();
        assert_eq!(c.kernel, dir.join("k.elf"));
        assert_eq!(c.initrd, Some(PathBuf::from("/abs/initrd")));
        assert_eq!(c.disks[0].path, dir.join("d/disk.img"));
        assert!(c.disks[0].read_only);
        // Flags stay relative to the current directory.
        assert_eq!(c.disks[1].path, PathBuf::from("flag.img"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn modules_and_testdev() {
        let mut f: FileConfig =
            toml::from_str("kernel = \"/k\"\nmodules = [\"m.img,a b\"]\ntestdev = true\n").unwrap();
        f.dir = PathBuf::from("/cfg");
        let o = Overrides {
            modules: vec!["/abs/n.img".into()],
            ..Default::default()
        };
        let c = VmConfig::build(Some(f), o).unwrap();
        assert!(c.testdev);
        let got: Vec<_> = c
            .modules
            .iter()
            .map(|m| (m.path.clone(), m.cmdline.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (PathBuf::from("/cfg/m.img"), Some("a b".into())),
                (PathBuf::from("/abs/n.img"), None)
            ]
        );
        let o = Overrides {
            kernel: Some("/k".into()),
            modules: vec![",x".into()],
            ..Default::default()
        };
        assert!(VmConfig::build(None, o).is_err());
    }
}
