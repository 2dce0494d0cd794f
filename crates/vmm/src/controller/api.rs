//! The control loop's answers to API requests: pre-boot configuration in Firecracker's terms,
//! mapped onto kvmbox's own configuration (the same parsing and validation as the flags).

use super::{to_api_error, Boot, Controller};
use crate::config::{parse_disk_spec, FileConfig, Overrides, VmConfig};
use crate::snapshot::SnapshotKind;
use crate::state::Action;
use crate::vm::Error;
use kvmbox_api::types::*;
use kvmbox_api::{ApiError, ApiReply, ApiRequest, ApiResult};
use kvmbox_ratelimit::RateLimiterConfig;
use kvmbox_virtio::net::NetBackendConfig;
use std::io::Write;
use std::path::{Path, PathBuf};

type ApiRes<T> = std::result::Result<T, ApiError>;

/// Whether flags or file name a kernel (then the VM boots from them).
pub(super) fn has_kernel(file: Option<&FileConfig>, o: &Overrides) -> bool {
    o.kernel.is_some() || file.is_some_and(FileConfig::has_kernel)
}

/// A VM being configured through the API, over the flags' and file's settings.
#[derive(Clone)]
pub(super) struct PreBoot {
    file: Option<FileConfig>,
    flags: Overrides,
    boot_source: Option<BootSource>,
    machine: MachineConfig,
    drives: Vec<Drive>,
    nets: Vec<NetworkInterface>,
    entropy: Option<Entropy>,
    vsock: Option<Vsock>,
}

/// Stands in for the kernel while none is set, so the rest of the configuration can be
/// checked (and reported) through the one validation path.
const NO_KERNEL: &str = "";

fn refuse(field: &str, why: &str) -> ApiError {
    ApiError::bad_request(format!("{field}: {why}"))
}

fn readable(field: &str, path: &str) -> ApiRes<()> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| refuse(field, &format!("cannot open '{path}': {e}")))
}

impl PreBoot {
    pub(super) fn new(file: Option<FileConfig>, flags: Overrides) -> Result<Self, Error> {
        let p = Self {
            file,
            flags,
            boot_source: None,
            machine: MachineConfig::default(),
            drives: Vec::new(),
            nets: Vec::new(),
            entropy: None,
            vsock: None,
        };
        p.effective()?;
        Ok(p)
    }

    /// The settings as kvmbox flags: API values over the flags'.
    fn overrides(&self) -> Overrides {
        let mut o = self.flags.clone();
        if let Some(b) = &self.boot_source {
            o.kernel = Some(PathBuf::from(&b.kernel_image_path));
            if let Some(i) = &b.initrd_path {
                o.initrd = Some(PathBuf::from(i));
            }
            if let Some(a) = &b.boot_args {
                o.cmdline = Some(a.clone());
            }
        }
        if let Some(root) = self.drives.iter().find(|d| d.is_root_device) {
            // As Firecracker: the root drive is the first disk and the kernel is told so.
            let rw = if root.is_read_only == Some(true) {
                "ro"
            } else {
                "rw"
            };
            let arg = match &root.partuuid {
                Some(u) => format!("root=PARTUUID={u} {rw}"),
                None => format!("root=/dev/vda {rw}"),
            };
            let base = o
                .cmdline
                .clone()
                .unwrap_or_else(|| crate::config::DEFAULT_CMDLINE.to_string());
            o.cmdline = Some(format!("{base} {arg}"));
        }
        if let Some(n) = self.machine.vcpu_count {
            o.cpus = Some(n);
        }
        if let Some(m) = self.machine.mem_size_mib {
            o.memory = Some(format!("{m}M"));
        }
        if let Some(a) = &self.machine.accel {
            o.accel = Some(a.clone());
        }
        if let Some(t) = self.machine.track_dirty_pages {
            o.track_dirty_pages = t;
        }
        // The limits: 0 lifts what the flags or file set.
        if let Some(c) = self.machine.cpu_max {
            o.cpu_max = (c != 0.0).then(|| c.to_string());
        }
        if let Some(w) = self.machine.cpu_weight {
            o.cpu_weight = Some(w);
        }
        if let Some(m) = self.machine.memory_limit_mib {
            o.memory_limit = (m != 0).then(|| format!("{m}M"));
        }
        if let Some(a) = &self.machine.cpu_affinity {
            o.cpu_affinity = Some(a.clone());
        }
        let roots = self.drives.iter().filter(|d| d.is_root_device);
        let others = self.drives.iter().filter(|d| !d.is_root_device);
        let api_disks: Vec<String> = roots.chain(others).map(drive_spec).collect();
        // The root drive must be /dev/vda: API drives go before the flags' disks.
        o.disks = api_disks.into_iter().chain(o.disks).collect();
        o.nets.extend(self.nets.iter().map(net_spec));
        o.rng |= self.entropy.is_some();
        if let Some(v) = &self.vsock {
            o.vsock = Some(format!("cid={},uds={}", v.guest_cid, v.uds_path));
        }
        o
    }

    /// The configuration as it stands (with a placeholder kernel if none is set yet).
    fn effective(&self) -> Result<VmConfig, Error> {
        let mut o = self.overrides();
        if !has_kernel(self.file.as_ref(), &o) {
            o.kernel = Some(PathBuf::from(NO_KERNEL));
        }
        Ok(VmConfig::build(self.file.clone(), o)?)
    }

    /// The backend the flags, file or `PUT /machine-config` fixed (`None` for auto).
    pub(super) fn fixed_accel(&self) -> Result<Option<kvmbox_cpu::Accel>, Error> {
        Ok(match self.effective()?.accel {
            crate::config::AccelChoice::Fixed(a) => Some(a),
            crate::config::AccelChoice::Auto => None,
        })
    }

    /// The resource limits the flags, file and `PUT /machine-config` give (for a snapshot
    /// load: checked against the saved VM there).
    pub(super) fn limits(&self) -> Result<crate::Limits, Error> {
        let file = self.file.clone().unwrap_or_default();
        Ok(crate::config::limits_from(&self.overrides(), &file)?)
    }

    /// The configuration to boot.
    pub(super) fn to_config(&self) -> Result<VmConfig, Error> {
        Ok(VmConfig::build(self.file.clone(), self.overrides())?)
    }
}

/// A Firecracker drive (and kvmbox's `format`, `serial`, `lock`) as a `--disk` spec. Fields
/// are checked before this.
fn drive_spec(d: &Drive) -> String {
    let mut s = d.path_on_host.clone().unwrap_or_default();
    if d.is_read_only == Some(true) {
        s.push_str(",ro");
    }
    if let Some(f) = &d.format {
        s.push_str(&format!(",format={f}"));
    }
    if let Some(id) = &d.serial {
        s.push_str(&format!(",serial={id}"));
    }
    if d.lock == Some(false) {
        s.push_str(",lock=off");
    }
    if let Ok(Some(rl)) = limiter_field("rate_limiter", &d.rate_limiter) {
        s.push_str(&rl.to_options(""));
    }
    s
}

/// A Firecracker `rate_limiter` object (`field` names it in errors), checked.
fn limiter_field(field: &str, v: &Option<serde_json::Value>) -> ApiRes<Option<RateLimiterConfig>> {
    let Some(v) = v else { return Ok(None) };
    let rl: RateLimiterConfig =
        serde_json::from_value(v.clone()).map_err(|e| refuse(field, &e.to_string()))?;
    rl.validate().map_err(|e| refuse(field, &e))?;
    Ok(Some(rl))
}

/// A limiter as the API reports it (`None` when it limits nothing).
fn limiter_value(rl: &RateLimiterConfig) -> Option<serde_json::Value> {
    (!rl.is_unlimited()).then(|| serde_json::to_value(rl).unwrap_or_default())
}

/// A Firecracker network interface as a `--net` spec (the same parsing then checks it).
fn net_spec(n: &NetworkInterface) -> String {
    let mut parts = Vec::new();
    if let Some(u) = &n.user_net {
        parts.push("user".to_string());
        parts.extend(u.hostfwd.iter().map(|f| format!("hostfwd={f}")));
    }
    if !n.host_dev_name.is_empty() {
        parts.push(format!("tap={}", n.host_dev_name));
    }
    if let Some(mac) = &n.guest_mac {
        parts.push(format!("mac={mac}"));
    }
    let mut s = parts.join(",");
    for (field, prefix, v) in [
        ("rx_rate_limiter", "rx_", &n.rx_rate_limiter),
        ("tx_rate_limiter", "tx_", &n.tx_rate_limiter),
    ] {
        if let Ok(Some(rl)) = limiter_field(field, v) {
            s.push_str(&rl.to_options(prefix));
        }
    }
    s
}

fn check_drive(d: &Drive) -> ApiRes<()> {
    limiter_field("rate_limiter", &d.rate_limiter)?;
    if d.socket.is_some() {
        return Err(refuse("socket", "kvmbox has no vhost-user-block"));
    }
    if let Some(e) = d.io_engine.as_deref().filter(|&e| e != "Sync") {
        return Err(refuse(
            "io_engine",
            &format!("'{e}' is not supported: kvmbox does synchronous I/O (\"Sync\")"),
        ));
    }
    if let Some(c) = d
        .cache_type
        .as_deref()
        .filter(|&c| c != "Unsafe" && c != "Writeback")
    {
        return Err(refuse(
            "cache_type",
            &format!("'{c}': expected Unsafe or Writeback"),
        ));
    }
    if d.partuuid.is_some() && !d.is_root_device {
        return Err(refuse("partuuid", "only for the root device"));
    }
    let path = d.path_on_host.as_deref().ok_or_else(|| {
        refuse(
            "path_on_host",
            "missing (a virtio-blk drive needs an image)",
        )
    })?;
    if path.contains(',') {
        return Err(refuse("path_on_host", "kvmbox cannot use a path with ','"));
    }
    readable("path_on_host", path)?;
    // The kvmbox extensions, by --disk's own checks, so that the error names the field.
    if let Some(f) = d.format.as_deref() {
        f.parse::<kvmbox_block::Format>()
            .map_err(|e| refuse("format", &e))?;
    }
    if let Some(id) = d.serial.as_deref() {
        kvmbox_block::check_serial(id).map_err(|e| refuse("serial", &e))?;
    }
    parse_disk_spec(&drive_spec(d)).map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(())
}

fn check_net(n: &NetworkInterface) -> ApiRes<()> {
    limiter_field("rx_rate_limiter", &n.rx_rate_limiter)?;
    limiter_field("tx_rate_limiter", &n.tx_rate_limiter)?;
    if n.mtu.is_some() {
        return Err(refuse(
            "mtu",
            "kvmbox's virtio-net does not advertise an MTU",
        ));
    }
    if n.host_dev_name.contains(',') || n.guest_mac.as_deref().is_some_and(|m| m.contains(',')) {
        return Err(refuse("host_dev_name", "kvmbox cannot use a name with ','"));
    }
    if n.host_dev_name.is_empty() && n.user_net.is_none() {
        return Err(refuse(
            "host_dev_name",
            "give host_dev_name (a TAP device) or user_net (the user network)",
        ));
    }
    if let Some(f) = n
        .user_net
        .iter()
        .flat_map(|u| &u.hostfwd)
        .find(|f| f.contains(','))
    {
        return Err(refuse(
            "user_net.hostfwd",
            &format!("'{f}' has a ','; give one rule per entry"),
        ));
    }
    Ok(())
}

fn check_machine(m: &MachineConfig) -> ApiRes<()> {
    if let Some(n) = m.vcpu_count.filter(|n| !(1..=32).contains(n)) {
        return Err(refuse("vcpu_count", &format!("{n} is not in 1..=32")));
    }
    if m.mem_size_mib == Some(0) {
        return Err(refuse("mem_size_mib", "must be at least 1"));
    }
    if m.smt == Some(true) {
        return Err(refuse("smt", "kvmbox does not offer SMT (set false)"));
    }
    if let Some(t) = m.cpu_template.as_deref().filter(|&t| t != "None") {
        return Err(refuse(
            "cpu_template",
            &format!("'{t}' is not supported (only \"None\")"),
        ));
    }
    if let Some(h) = m.huge_pages.as_deref().filter(|&h| h != "None") {
        return Err(refuse(
            "huge_pages",
            &format!("'{h}' is not supported (only \"None\")"),
        ));
    }
    Ok(())
}

fn accel_name(a: kvmbox_cpu::Accel) -> &'static str {
    match a {
        kvmbox_cpu::Accel::Kvm => "kvm",
        kvmbox_cpu::Accel::Emu => "emu",
    }
}

/// The logger, the metrics sink and the request counter.
#[derive(Default)]
pub(super) struct Extras {
    logger: Option<(std::fs::File, Logger)>,
    metrics: Option<(std::fs::File, Metrics)>,
    requests: u64,
}

const LOG_LEVELS: [&str; 6] = ["off", "error", "warning", "info", "debug", "trace"];

fn open_append(field: &str, path: &str) -> ApiRes<std::fs::File> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| refuse(field, &format!("cannot open '{path}': {e}")))
}

impl Extras {
    pub(super) fn count_request(&mut self) {
        self.requests += 1;
    }

    /// Write one Info line to the logger, if it is configured at Info or above.
    pub(super) fn log(&mut self, msg: &str) {
        let Some((file, cfg)) = &mut self.logger else {
            return;
        };
        let level = cfg.level.as_deref().unwrap_or("info").to_ascii_lowercase();
        let rank = LOG_LEVELS.iter().position(|&l| l == level).unwrap_or(3);
        if rank < 3 {
            return;
        }
        let prefix = if cfg.show_level == Some(true) {
            ":INFO"
        } else {
            ""
        };
        let _ = writeln!(file, "[kvmbox{prefix}] {msg}");
    }

    fn set_logger(&mut self, l: &Logger) -> ApiRes<()> {
        if l.module.is_some() {
            return Err(refuse("module", "kvmbox's log has no modules to filter"));
        }
        if l.show_log_origin == Some(true) {
            return Err(refuse(
                "show_log_origin",
                "kvmbox's log lines have no origin",
            ));
        }
        if let Some(level) = &l.level {
            if !LOG_LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
                return Err(refuse(
                    "level",
                    &format!("'{level}': expected Error, Warning, Info, Debug, Trace or Off"),
                ));
            }
        }
        let path = l
            .log_path
            .as_deref()
            .ok_or_else(|| refuse("log_path", "missing"))?;
        self.logger = Some((open_append("log_path", path)?, l.clone()));
        Ok(())
    }

    fn flush_metrics(&mut self, state: &str) -> ApiRes<()> {
        let requests = self.requests;
        let (file, _) = self.metrics.as_mut().ok_or_else(|| {
            ApiError::bad_request("FlushMetrics: no metrics sink (PUT /metrics first)")
        })?;
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let line = serde_json::json!({
            "utc_timestamp_ms": ms,
            "api_server": {"requests": requests},
            "vmm": {"state": state},
        });
        writeln!(file, "{line}").map_err(|e| ApiError::internal(format!("writing metrics: {e}")))
    }
}

impl Controller {
    /// The configuration to report: the running one, else what the API has set so far.
    fn report_config(&self) -> ApiRes<(VmConfig, Option<&PreBoot>)> {
        match (&self.running_cfg, &self.boot) {
            (Some(c), Boot::Pending(p)) => Ok((c.clone(), Some(p))),
            (Some(c), Boot::Ready(_)) => Ok((c.clone(), None)),
            (None, Boot::Pending(p)) => Ok((p.effective().map_err(to_api_error)?, Some(p))),
            (None, Boot::Ready(c)) => Ok(((**c).clone(), None)),
        }
    }

    fn machine_config(&self) -> ApiRes<MachineConfig> {
        let (cfg, _) = self.report_config()?;
        let accel = match (&self.machine, cfg.accel) {
            (Some(m), _) => accel_name(m.accel).into(),
            (None, crate::AccelChoice::Fixed(a)) => accel_name(a).into(),
            (None, crate::AccelChoice::Auto) => "auto".into(),
        };
        Ok(MachineConfig {
            vcpu_count: Some(cfg.cpus),
            mem_size_mib: Some(cfg.memory >> 20),
            smt: Some(false),
            track_dirty_pages: Some(match &self.machine {
                Some(m) => m.vm.dirty_log_active(),
                None => cfg.track_dirty_pages,
            }),
            cpu_template: None,
            huge_pages: Some("None".into()),
            accel: Some(accel),
            cpu_max: cfg.limits.cpu_max.map(|c| c.cpus()),
            cpu_weight: cfg.limits.cpu_weight,
            memory_limit_mib: cfg.limits.memory_limit.map(|b| b >> 20),
            cpu_affinity: (!cfg.limits.affinity.is_empty())
                .then(|| cfg.limits.affinity.to_string()),
        })
    }

    /// The position among the VM's disks of the drive `id`: API drives first (the root one
    /// leading), then the flags' disks as `disk0`, `disk1`, ... (as `GET /vm/config` names them).
    fn disk_index(&self, id: &str) -> ApiRes<usize> {
        let (cfg, pre) = self.report_config()?;
        let api: Vec<&Drive> = pre.map(|p| p.drives.iter().collect()).unwrap_or_default();
        let roots = api.iter().filter(|d| d.is_root_device);
        let others = api.iter().filter(|d| !d.is_root_device);
        roots
            .chain(others)
            .position(|d| d.drive_id == id)
            .or_else(|| {
                let i: usize = id.strip_prefix("disk")?.parse().ok()?;
                (api.len() + i < cfg.disks.len()).then_some(api.len() + i)
            })
            .ok_or_else(|| refuse("drive_id", &format!("no drive '{id}'")))
    }

    /// The position among the VM's network interfaces of `id`: the flags' first as `net0`,
    /// `net1`, ..., then the API's.
    fn net_index(&self, id: &str) -> ApiRes<usize> {
        let (cfg, pre) = self.report_config()?;
        let api: Vec<&NetworkInterface> = pre.map(|p| p.nets.iter().collect()).unwrap_or_default();
        let flags = cfg.nets.len().saturating_sub(api.len());
        api.iter()
            .position(|n| n.iface_id == id)
            .map(|i| flags + i)
            .or_else(|| {
                let i: usize = id.strip_prefix("net")?.parse().ok()?;
                (i < flags).then_some(i)
            })
            .ok_or_else(|| refuse("iface_id", &format!("no interface '{id}'")))
    }

    /// Apply a PATCH to a running (or paused) VM's limiter that `pick` finds, and to the
    /// configuration a reboot rebuilds it from.
    fn update_limiter(
        &mut self,
        upd: RateLimiterConfig,
        pick: impl for<'a> FnOnce(
            &'a mut VmConfig,
            &crate::vm::DeviceLimiters,
        )
            -> Option<(&'a mut RateLimiterConfig, kvmbox_virtio::SharedLimiter)>,
    ) -> ApiRes<()> {
        if self.state == crate::VmState::Stopped {
            return Err(ApiError::bad_request(
                "cannot change a rate limiter: the VM is stopped",
            ));
        }
        let limiters = self.machine()?.virtio.limiters.clone();
        let cfg = self
            .running_cfg
            .as_mut()
            .ok_or_else(|| ApiError::internal("the running VM has no configuration"))?;
        let (slot, live) = pick(cfg, &limiters)
            .ok_or_else(|| ApiError::internal("the device has no rate limiter"))?;
        *slot = slot.patched(&upd);
        live.update(&upd);
        Ok(())
    }

    fn full_config(&self) -> ApiRes<FullVmConfiguration> {
        let (cfg, pre) = self.report_config()?;
        // The limiters in force (a live PATCH changes the running configuration).
        let mut api_drives = pre.map(|p| p.drives.clone()).unwrap_or_default();
        for d in &mut api_drives {
            if let Some(c) = self
                .disk_index(&d.drive_id)
                .ok()
                .and_then(|i| cfg.disks.get(i))
            {
                d.rate_limiter = limiter_value(&c.rate_limiter);
            }
        }
        let flag_disks = cfg
            .disks
            .iter()
            .skip(api_drives.len())
            .enumerate()
            .map(|(i, d)| Drive {
                drive_id: format!("disk{i}"),
                is_root_device: false,
                path_on_host: Some(d.path.display().to_string()),
                is_read_only: Some(d.read_only),
                format: d.format.map(|f| f.to_string()),
                serial: d.serial.clone(),
                lock: Some(d.lock),
                rate_limiter: limiter_value(&d.rate_limiter),
                ..Default::default()
            });
        let mut api_nets = pre.map(|p| p.nets.clone()).unwrap_or_default();
        for n in &mut api_nets {
            if let Some(c) = self
                .net_index(&n.iface_id)
                .ok()
                .and_then(|i| cfg.nets.get(i))
            {
                n.rx_rate_limiter = limiter_value(&c.rx_limiter);
                n.tx_rate_limiter = limiter_value(&c.tx_limiter);
            }
        }
        let flag_nets = cfg
            .nets
            .iter()
            .take(cfg.nets.len().saturating_sub(api_nets.len()))
            .enumerate()
            .map(|(i, n)| NetworkInterface {
                iface_id: format!("net{i}"),
                host_dev_name: match &n.backend {
                    NetBackendConfig::Tap(name) => name.clone(),
                    NetBackendConfig::User(_) => String::new(),
                },
                user_net: match &n.backend {
                    NetBackendConfig::Tap(_) => None,
                    NetBackendConfig::User(u) => Some(UserNet {
                        hostfwd: u.hostfwd.iter().map(|f| f.to_string()).collect(),
                    }),
                },
                guest_mac: n.mac.map(|m| {
                    m.iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":")
                }),
                rx_rate_limiter: limiter_value(&n.rx_limiter),
                tx_rate_limiter: limiter_value(&n.tx_limiter),
                ..Default::default()
            });
        let kernel = cfg.kernel.display().to_string();
        Ok(FullVmConfiguration {
            boot_source: (!kernel.is_empty()).then(|| BootSource {
                kernel_image_path: kernel,
                initrd_path: cfg.initrd.as_ref().map(|p| p.display().to_string()),
                boot_args: Some(cfg.cmdline.clone()),
            }),
            machine_config: self.machine_config()?,
            drives: api_drives.into_iter().chain(flag_disks).collect(),
            network_interfaces: flag_nets.chain(api_nets).collect(),
            entropy: cfg.rng.then(Entropy::default),
            vsock: cfg.vsock.as_ref().map(|v| Vsock {
                guest_cid: v.guest_cid.into(),
                uds_path: v.uds_path.display().to_string(),
                vsock_id: None,
            }),
            logger: self.extras.logger.as_ref().map(|(_, l)| l.clone()),
            metrics: self.extras.metrics.as_ref().map(|(_, m)| m.clone()),
        })
    }

    /// `PATCH /machine-config` once the VM has started: only the cgroup's limits change, by
    /// the flags' checks, in the group the VM was started in.
    fn change_limits(&mut self, m: &MachineConfig) -> ApiResult {
        let fixed = [
            ("vcpu_count", m.vcpu_count.is_some()),
            ("mem_size_mib", m.mem_size_mib.is_some()),
            ("smt", m.smt.is_some()),
            ("track_dirty_pages", m.track_dirty_pages.is_some()),
            ("cpu_template", m.cpu_template.is_some()),
            ("huge_pages", m.huge_pages.is_some()),
            ("accel", m.accel.is_some()),
            ("cpu_affinity", m.cpu_affinity.is_some()),
        ];
        if let Some((field, _)) = fixed.iter().find(|(_, given)| *given) {
            return Err(refuse(
                field,
                "cannot change once the VM has started (cpu_max, cpu_weight and memory_limit_mib can)",
            ));
        }
        let Some(cg) = &self.cgroup else {
            return Err(ApiError::bad_request(
                "the VM runs without a cgroup: give it a CPU quota, CPU weight or memory limit before it starts (--cpu-max, --cpu-weight, --memory-limit, or this route's cpu_max, cpu_weight, memory_limit_mib) to change them while it runs",
            ));
        };
        let Some(cfg) = &self.running_cfg else {
            return Err(ApiError::bad_request("the VM has no machine"));
        };
        fn bad(field: &'static str) -> impl Fn(crate::ConfigError) -> ApiError {
            move |e| refuse(field, &e.to_string())
        }
        let cpu_max = m
            .cpu_max
            .map(|c| {
                (c != 0.0)
                    .then(|| crate::limits::check_cpu_max(c))
                    .transpose()
            })
            .transpose()
            .map_err(bad("cpu_max"))?;
        let cpu_weight = m
            .cpu_weight
            .map(crate::limits::check_cpu_weight)
            .transpose()
            .map_err(bad("cpu_weight"))?;
        let memory_limit = match m.memory_limit_mib {
            None => None,
            Some(0) => Some(None),
            Some(mib) => {
                let b = mib
                    .checked_mul(1 << 20)
                    .ok_or_else(|| refuse("memory_limit_mib", "too large"))?;
                crate::limits::check_memory_limit(b, cfg.memory)
                    .map_err(bad("memory_limit_mib"))?;
                Some(Some(b))
            }
        };
        cg.change(cpu_max, cpu_weight, memory_limit)
            .map_err(ApiError::bad_request)?;
        if let Some(cfg) = &mut self.running_cfg {
            if let Some(c) = cpu_max {
                cfg.limits.cpu_max = c;
            }
            if cpu_weight.is_some() {
                cfg.limits.cpu_weight = cpu_weight;
            }
            if let Some(b) = memory_limit {
                cfg.limits.memory_limit = b;
            }
        }
        self.extras.log("resource limits changed");
        Ok(ApiReply::Empty)
    }

    /// Apply a pre-boot change: checked against the state, then validated as a whole through
    /// the flags' path; refused changes leave the configuration as it was.
    fn configure(&mut self, change: impl FnOnce(&mut PreBoot) -> ApiRes<()>) -> ApiResult {
        self.check(Action::Configure)?;
        let Boot::Pending(pre) = &mut self.boot else {
            return Err(ApiError::bad_request(
                "cannot change the configuration: the VM was configured from the command line",
            ));
        };
        let mut next = (**pre).clone();
        change(&mut next)?;
        next.effective().map_err(to_api_error)?;
        **pre = next;
        Ok(ApiReply::Empty)
    }

    pub(super) fn dispatch(&mut self, req: &ApiRequest) -> ApiResult {
        use ApiRequest as R;
        let json = |v: serde_json::Result<serde_json::Value>| {
            v.map(ApiReply::Json)
                .map_err(|e| ApiError::internal(format!("encoding the answer: {e}")))
        };
        match req {
            R::DescribeInstance => json(serde_json::to_value(InstanceInfo {
                app_name: "kvmbox".into(),
                id: "anonymous-instance".into(),
                state: self.state.to_string(),
                vmm_version: env!("CARGO_PKG_VERSION").into(),
            })),
            R::GetVersion => json(serde_json::to_value(Version {
                firecracker_version: env!("CARGO_PKG_VERSION").into(),
            })),
            R::GetVmConfig => json(serde_json::to_value(self.full_config()?)),
            R::GetMachineConfig => json(serde_json::to_value(self.machine_config()?)),
            R::PutBootSource(b) => {
                let b = b.clone();
                self.configure(move |p| {
                    readable("kernel_image_path", &b.kernel_image_path)?;
                    if let Some(i) = &b.initrd_path {
                        readable("initrd_path", i)?;
                    }
                    p.boot_source = Some(b);
                    Ok(())
                })
            }
            R::PatchMachineConfig(m) if self.state != crate::VmState::NotStarted => {
                self.change_limits(m)
            }
            R::PutMachineConfig(m) | R::PatchMachineConfig(m) => {
                let put = matches!(req, R::PutMachineConfig(_));
                let m = m.clone();
                self.configure(move |p| {
                    check_machine(&m)?;
                    if put {
                        p.machine = m;
                    } else {
                        let cur = &mut p.machine;
                        cur.vcpu_count = m.vcpu_count.or(cur.vcpu_count);
                        cur.mem_size_mib = m.mem_size_mib.or(cur.mem_size_mib);
                        cur.accel = m.accel.or(cur.accel.take());
                        cur.track_dirty_pages = m.track_dirty_pages.or(cur.track_dirty_pages);
                        cur.cpu_max = m.cpu_max.or(cur.cpu_max);
                        cur.cpu_weight = m.cpu_weight.or(cur.cpu_weight);
                        cur.memory_limit_mib = m.memory_limit_mib.or(cur.memory_limit_mib);
                        cur.cpu_affinity = m.cpu_affinity.or(cur.cpu_affinity.take());
                    }
                    Ok(())
                })
            }
            R::PutDrive(d) => {
                let d = d.clone();
                self.configure(move |p| {
                    check_drive(&d)?;
                    if d.is_root_device
                        && p.drives
                            .iter()
                            .any(|o| o.is_root_device && o.drive_id != d.drive_id)
                    {
                        return Err(refuse("is_root_device", "another drive is the root device"));
                    }
                    match p.drives.iter_mut().find(|o| o.drive_id == d.drive_id) {
                        Some(o) => *o = d,
                        None => p.drives.push(d),
                    }
                    Ok(())
                })
            }
            R::PatchDrive(d) => {
                let upd = limiter_field("rate_limiter", &d.rate_limiter)?;
                if self.state == crate::VmState::NotStarted {
                    let d = d.clone();
                    return self.configure(move |p| {
                        let cur = p
                            .drives
                            .iter_mut()
                            .find(|o| o.drive_id == d.drive_id)
                            .ok_or_else(|| {
                                refuse("drive_id", &format!("no drive '{}'", d.drive_id))
                            })?;
                        let mut next = cur.clone();
                        if let Some(path) = d.path_on_host {
                            next.path_on_host = Some(path);
                        }
                        if let Some(upd) = upd {
                            let old = limiter_field("rate_limiter", &next.rate_limiter)?
                                .unwrap_or_default();
                            next.rate_limiter = limiter_value(&old.patched(&upd));
                        }
                        check_drive(&next)?;
                        *cur = next;
                        Ok(())
                    });
                }
                if d.path_on_host.is_some() {
                    return Err(refuse(
                        "path_on_host",
                        "kvmbox cannot change the image of a running VM's drive",
                    ));
                }
                let i = self.disk_index(&d.drive_id)?;
                if let Some(upd) = upd {
                    self.update_limiter(upd, |cfg, l| {
                        let d = cfg.disks.get_mut(i)?;
                        Some((&mut d.rate_limiter, l.disks.get(i)?.clone()))
                    })?;
                }
                Ok(ApiReply::Empty)
            }
            R::PutNetworkInterface(n) => {
                let n = n.clone();
                self.configure(move |p| {
                    check_net(&n)?;
                    match p.nets.iter_mut().find(|o| o.iface_id == n.iface_id) {
                        Some(o) => *o = n,
                        None => p.nets.push(n),
                    }
                    Ok(())
                })
            }
            R::PatchNetworkInterface(n) => {
                let rx = limiter_field("rx_rate_limiter", &n.rx_rate_limiter)?;
                let tx = limiter_field("tx_rate_limiter", &n.tx_rate_limiter)?;
                if self.state == crate::VmState::NotStarted {
                    let n = n.clone();
                    return self.configure(move |p| {
                        let cur = p
                            .nets
                            .iter_mut()
                            .find(|o| o.iface_id == n.iface_id)
                            .ok_or_else(|| {
                                refuse("iface_id", &format!("no interface '{}'", n.iface_id))
                            })?;
                        for (field, slot, upd) in [
                            ("rx_rate_limiter", &mut cur.rx_rate_limiter, rx),
                            ("tx_rate_limiter", &mut cur.tx_rate_limiter, tx),
                        ] {
                            if let Some(upd) = upd {
                                let old = limiter_field(field, slot)?.unwrap_or_default();
                                *slot = limiter_value(&old.patched(&upd));
                            }
                        }
                        Ok(())
                    });
                }
                let i = self.net_index(&n.iface_id)?;
                if let Some(upd) = rx {
                    self.update_limiter(upd, |cfg, l| {
                        Some((
                            &mut cfg.nets.get_mut(i)?.rx_limiter,
                            l.nets.get(i)?.0.clone(),
                        ))
                    })?;
                }
                if let Some(upd) = tx {
                    self.update_limiter(upd, |cfg, l| {
                        Some((
                            &mut cfg.nets.get_mut(i)?.tx_limiter,
                            l.nets.get(i)?.1.clone(),
                        ))
                    })?;
                }
                Ok(ApiReply::Empty)
            }
            R::PutEntropy(e) => {
                let e = e.clone();
                self.configure(move |p| {
                    if e.rate_limiter.is_some() {
                        return Err(refuse("rate_limiter", "kvmbox has no entropy rate limiter"));
                    }
                    p.entropy = Some(e);
                    Ok(())
                })
            }
            R::PutVsock(v) => {
                let v = v.clone();
                self.configure(move |p| {
                    kvmbox_virtio::vsock::VsockConfig::new(v.guest_cid, PathBuf::from(&v.uds_path))
                        .map_err(|e| refuse("vsock", &e.to_string()))?;
                    p.vsock = Some(v);
                    Ok(())
                })
            }
            R::PutLogger(l) => {
                self.check(Action::Configure)?;
                self.extras.set_logger(l)?;
                Ok(ApiReply::Empty)
            }
            R::PutMetrics(m) => {
                self.check(Action::Configure)?;
                let f = open_append("metrics_path", &m.metrics_path)?;
                self.extras.metrics = Some((f, m.clone()));
                Ok(ApiReply::Empty)
            }
            R::Action(ActionType::InstanceStart) => self.instance_start(),
            R::Action(ActionType::FlushMetrics) => {
                let state = self.state.to_string();
                self.extras.flush_metrics(&state)?;
                Ok(ApiReply::Empty)
            }
            R::Action(ActionType::SendCtrlAltDel) => {
                self.check(Action::GuestInput)?;
                self.machine()?.send_ctrl_alt_del().map_err(to_api_error)?;
                Ok(ApiReply::Empty)
            }
            R::Action(ActionType::PowerButton) => {
                self.check(Action::GuestInput)?;
                self.machine()?.press_power_button().map_err(to_api_error)?;
                Ok(ApiReply::Empty)
            }
            R::PatchVm(VmStateRequest::Paused) => self.pause_or_resume(Action::Pause),
            R::PatchVm(VmStateRequest::Resumed) => self.pause_or_resume(Action::Resume),
            R::CreateSnapshot(s) => {
                self.check(Action::Snapshot)?;
                if let Some(t) = s
                    .snapshot_type
                    .as_deref()
                    .filter(|&t| t != "Full" && t != "Diff")
                {
                    return Err(refuse(
                        "snapshot_type",
                        &format!("'{t}': expected Full or Diff"),
                    ));
                }
                if let Some(n) = s
                    .disk_snapshot
                    .as_deref()
                    .filter(|n| n.is_empty() || n.len() > 255)
                {
                    return Err(refuse(
                        "disk_snapshot",
                        &format!("'{n}': a snapshot name must be 1 to 255 bytes"),
                    ));
                }
                let kind = match s.snapshot_type.as_deref() {
                    Some("Diff") => SnapshotKind::Diff,
                    _ => SnapshotKind::Full,
                };
                let m = self.machine()?;
                let cfg = self
                    .running_cfg
                    .as_ref()
                    .ok_or_else(|| ApiError::internal("the VM has no configuration"))?;
                crate::snapshot::create(
                    m,
                    cfg,
                    Path::new(&s.snapshot_path),
                    Path::new(&s.mem_file_path),
                    kind,
                    s.disk_snapshot.as_deref(),
                )
                .map_err(to_api_error)?;
                self.extras
                    .log(&format!("snapshot written to {}", s.snapshot_path));
                Ok(ApiReply::Empty)
            }
            R::DeleteSnapshot(s) => {
                self.check(Action::DeleteSnapshot)?;
                let n = &s.disk_snapshot;
                if n.is_empty() || n.len() > 255 {
                    return Err(refuse(
                        "disk_snapshot",
                        &format!("'{n}': a snapshot name must be 1 to 255 bytes"),
                    ));
                }
                let m = self.machine()?;
                let cfg = self
                    .running_cfg
                    .as_ref()
                    .ok_or_else(|| ApiError::internal("the VM has no configuration"))?;
                let deleted =
                    crate::snapshot::delete_disk_snapshot(m, cfg, n).map_err(to_api_error)?;
                self.extras.log(&format!(
                    "disk snapshot '{n}' deleted on {} disk(s)",
                    deleted.len()
                ));
                Ok(ApiReply::Json(serde_json::json!({ "deleted_on": deleted })))
            }
            R::LoadSnapshot(s) => {
                self.check(Action::LoadSnapshot)?;
                let mem = match (&s.mem_file_path, &s.mem_backend) {
                    (Some(_), Some(_)) => {
                        return Err(ApiError::bad_request(
                            "PUT /snapshot/load: give mem_backend or mem_file_path, not both",
                        ))
                    }
                    (None, None) => {
                        return Err(ApiError::bad_request(
                            "PUT /snapshot/load: missing mem_backend (or mem_file_path)",
                        ))
                    }
                    (Some(p), None) => p.clone(),
                    (None, Some(b)) if b.backend_type == "File" => b.backend_path.clone(),
                    (None, Some(b)) => {
                        return Err(refuse(
                            "mem_backend.backend_type",
                            &format!(
                                "'{}': kvmbox loads guest memory from a File",
                                b.backend_type
                            ),
                        ))
                    }
                };
                let track = s.track_dirty_pages.or(s.enable_diff_snapshots) == Some(true);
                let (accel, limits) = match &self.boot {
                    Boot::Pending(pre) => (
                        pre.fixed_accel().map_err(to_api_error)?,
                        pre.limits().map_err(to_api_error)?,
                    ),
                    Boot::Ready(_) => (None, crate::Limits::default()),
                };
                self.restore(
                    Path::new(&s.snapshot_path),
                    Path::new(&mem),
                    accel,
                    track,
                    &limits,
                    s.resume_vm == Some(true),
                )
                .map_err(to_api_error)?;
                Ok(ApiReply::Empty)
            }
        }
    }
}
