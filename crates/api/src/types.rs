//! Request and response bodies, as Firecracker's swagger document defines them. Unknown
//! fields are refused (`deny_unknown_fields`), so a typo is a 400, never silence. Fields
//! Firecracker has and kvmbox cannot honour are parsed (so the VMM can name them in its 400).

use serde::{Deserialize, Serialize};

/// `GET /`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstanceInfo {
    /// Always "kvmbox".
    pub app_name: String,
    /// Instance ID.
    pub id: String,
    /// "Not started", "Running" or "Paused".
    pub state: String,
    /// kvmbox's version.
    pub vmm_version: String,
}

/// `GET /version`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Version {
    /// kvmbox's version, in Firecracker's field.
    pub firecracker_version: String,
}

/// `PUT /boot-source`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Kernel image on the host.
    pub kernel_image_path: String,
    /// Initial ramdisk on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// `PUT|PATCH /machine-config` and `GET /machine-config`. For PUT the swagger requires
/// `vcpu_count` and `mem_size_mib`; PATCH takes any subset (the VMM checks which).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// vCPUs, 1 to 32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_count: Option<u32>,
    /// Guest memory in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_size_mib: Option<u64>,
    /// Simultaneous multithreading (kvmbox: false only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    /// Dirty-page tracking for diff snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// Firecracker CPU template (kvmbox: "None" only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// Huge pages (kvmbox: "None" only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
    /// kvmbox extension: the CPU engine, "auto", "kvm" or "emu". In a GET after start, the
    /// engine the VM runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
    /// kvmbox extension: CPU quota in host CPUs (`--cpu-max`); 0 lifts it. PATCH changes it
    /// while the VM runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_max: Option<f64>,
    /// kvmbox extension: CPU weight 1-10000 (`--cpu-weight`). PATCH changes it while the VM
    /// runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u32>,
    /// kvmbox extension: memory limit of the whole VMM process in MiB (`--memory-limit`); 0
    /// lifts it. PATCH changes it while the VM runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_mib: Option<u64>,
    /// kvmbox extension: vCPU pinning, `--cpu-affinity`'s syntax (before the start only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_affinity: Option<String>,
}

/// A rate limiter (kvmbox has none: its presence is refused). Kept as raw JSON.
pub type RateLimiter = serde_json::Value;

/// `PUT /drives/{drive_id}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// The drive's name (must match the path).
    pub drive_id: String,
    /// Whether this is the root device.
    pub is_root_device: bool,
    /// Image on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// Read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    /// Root partition UUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// "Unsafe" or "Writeback".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    /// "Sync" or "Async".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    /// Rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    /// vhost-user-block socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    /// kvmbox extension: the image format, "raw" or "qcow2" (`--disk`'s `format=`); absent,
    /// detected from the header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// kvmbox extension: the virtio-blk serial, 1 to 20 bytes (`--disk`'s `serial=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// kvmbox extension: take the QEMU-compatible image lock (absent: true); false is
    /// `--disk`'s `lock=off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<bool>,
}

/// `PATCH /drives/{drive_id}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// The drive's name (must match the path).
    pub drive_id: String,
    /// New image on the host.
    #[serde(default)]
    pub path_on_host: Option<String>,
    /// Rate limiter.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// The interface's name (must match the path).
    pub iface_id: String,
    /// The host TAP device (empty or absent with `user_net`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host_dev_name: String,
    /// kvmbox extension: the user network (NAT through passt, no privileges) instead of a
    /// TAP device, as `--net user`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_net: Option<UserNet>,
    /// The guest's MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// MTU to advertise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Receive rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Transmit rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// kvmbox extension of [`NetworkInterface`]: the user network.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UserNet {
    /// Port forwarding rules in QEMU's syntax, `PROTO:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT`
    /// (as `--net user,hostfwd=`).
    #[serde(default)]
    pub hostfwd: Vec<String>,
}

/// `PATCH /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    /// The interface's name (must match the path).
    pub iface_id: String,
    /// Receive rate limiter.
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Transmit rate limiter.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PUT /entropy`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Entropy {
    /// Rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /vsock` (Firecracker's body): a virtio-vsock device whose host side is the Unix
/// socket `uds_path` (`CONNECT <port>\n` there reaches a guest listener; a guest connection
/// to host port P reaches `uds_path_P`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// The guest's context id (3 to 2^32 - 2).
    pub guest_cid: u64,
    /// The host's Unix socket (it must not exist yet).
    pub uds_path: String,
    /// Firecracker's deprecated device name: accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// `PUT /actions`: the action.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum ActionType {
    /// Boot the configured VM.
    InstanceStart,
    /// Press Ctrl-Alt-Del on the i8042 keyboard.
    SendCtrlAltDel,
    /// Write the metrics now.
    FlushMetrics,
    /// kvmbox extension: press the ACPI power button.
    PowerButton,
}

/// `PUT /actions`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    /// The action.
    pub action_type: ActionType,
}

/// `PATCH /vm`: the state asked for.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum VmStateRequest {
    /// Stop every vCPU.
    Paused,
    /// Run every vCPU again.
    Resumed,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmPatch {
    /// The state asked for.
    pub state: VmStateRequest,
}

/// `PUT /snapshot/create`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    /// Where the VM state goes.
    pub snapshot_path: String,
    /// Where guest memory goes.
    pub mem_file_path: String,
    /// "Full" (default) or "Diff".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<String>,
    /// kvmbox extension: also take a qcow2 internal snapshot of this name on every writable
    /// disk, by the VM process on its open images (a live snapshot of memory, devices and
    /// disks together).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_snapshot: Option<String>,
}

/// `PUT /snapshot/delete` (kvmbox extension).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotDelete {
    /// Delete the qcow2 internal snapshot of this name on every writable disk that holds it,
    /// by the VM process on its open images (`disk_snapshot` of `PUT /snapshot/create`).
    pub disk_snapshot: String,
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    /// "File" or "Uffd".
    pub backend_type: String,
    /// The file (or socket).
    pub backend_path: String,
}

/// `PUT /snapshot/load`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoad {
    /// The VM state file.
    pub snapshot_path: String,
    /// The memory file (deprecated form).
    #[serde(default)]
    pub mem_file_path: Option<String>,
    /// The memory backend.
    #[serde(default)]
    pub mem_backend: Option<MemoryBackend>,
    /// Deprecated name of `track_dirty_pages`.
    #[serde(default)]
    pub enable_diff_snapshots: Option<bool>,
    /// Track dirty pages after restore.
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    /// Run the VM once loaded.
    #[serde(default)]
    pub resume_vm: Option<bool>,
    /// Replacement TAP devices.
    #[serde(default)]
    pub network_overrides: Option<serde_json::Value>,
    /// Replacement vsock socket.
    #[serde(default)]
    pub vsock_override: Option<serde_json::Value>,
    /// Advance kvmclock by the wall-clock time since the snapshot.
    #[serde(default)]
    pub clock_realtime: Option<bool>,
}

/// `PUT /logger`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// Where log lines go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// Error, Warning, Info, Debug, Trace or Off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// Prefix each line with its level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Prefix each line with its source location.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only this module's messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `PUT /metrics`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Where JSON metrics lines go.
    pub metrics_path: String,
}

/// `GET /vm/config`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FullVmConfiguration {
    /// The boot source, once set.
    #[serde(rename = "boot-source", skip_serializing_if = "Option::is_none")]
    pub boot_source: Option<BootSource>,
    /// Machine configuration (with kvmbox's `accel`: the engine).
    #[serde(rename = "machine-config")]
    pub machine_config: MachineConfig,
    /// Block devices.
    pub drives: Vec<Drive>,
    /// Network interfaces.
    #[serde(rename = "network-interfaces")]
    pub network_interfaces: Vec<NetworkInterface>,
    /// The entropy device, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entropy: Option<Entropy>,
    /// The vsock device, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
    /// The logger, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logger: Option<Logger>,
    /// The metrics sink, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
}

/// Error body of every 4xx/5xx answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// What went wrong.
    pub fault_message: String,
}
