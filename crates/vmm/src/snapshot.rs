//! Snapshots of a whole VM: [`create`] saves a paused [`Machine`] to a state file and a
//! memory file; [`load`] builds the same machine again from them, in a new process, on
//! either backend. The state of each piece lives beside the piece (`persist.rs` files in the
//! cpu, irqchip, devices, pci and virtio crates); this module only walks the machine and
//! checks that a state fits before anything of it is used.

use crate::config::{AccelChoice, CpuModel, OnReboot, VirtioTransport, VmConfig};
use crate::machine::Machine;
use crate::vm::Error;
use kvmbox_cpu::{Accel, VcpuState};
use kvmbox_devices::fw_cfg::FwCfgState;
use kvmbox_devices::legacy::acpi_pm::persist::AcpiPmState;
use kvmbox_devices::legacy::i8042::persist::I8042State;
use kvmbox_devices::legacy::pit::persist::PitState;
use kvmbox_devices::legacy::rtc::persist::RtcState;
use kvmbox_devices::legacy::serial::persist::SerialPortState;
use kvmbox_devices::VmControl;
use kvmbox_irqchip::IrqChipState;
use kvmbox_ratelimit::RateLimiterState;
use kvmbox_snapshot::PageFilter;
use kvmbox_virtio::block::DiskConfig;
use kvmbox_virtio::net::NetConfig;
use kvmbox_virtio::transport::{MmioTransportState, VirtioPciState};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

type Result<T> = std::result::Result<T, Error>;

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn refuse(why: impl Into<String>) -> Error {
    Error::Snapshot(why.into())
}

/// A virtio-blk disk as the snapshot names it: the image is reopened on restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDisk {
    /// The image (absolute where it could be resolved).
    pub path: PathBuf,
    /// Read-only.
    pub read_only: bool,
    /// GET_ID serial.
    pub serial: Option<String>,
    /// The format the user named (`None`: detected from the header at open, as at boot).
    pub format: Option<kvmbox_block::Format>,
    /// QEMU-compatible image locks taken.
    pub lock: bool,
}

/// A virtio-net interface: the TAP is reopened (or a new passt started) on restore, with the
/// MAC the guest saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedNet {
    /// The `--net` option without the MAC (`tap=NAME`, `user,hostfwd=...`). Files from before
    /// the user network hold a bare TAP name here, which reads as `tap=NAME`.
    pub spec: String,
    /// The guest's MAC address.
    pub mac: [u8; 6],
}

/// What the machine was built from: enough to build the same machine again (the kernel and
/// firmware tables are in the memory file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedConfig {
    /// The backend it ran on ("kvm" or "emu").
    pub accel: String,
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Started with `--cpu-model portable`.
    pub portable: bool,
    /// virtio over PCI (true) or MMIO.
    pub virtio_pci: bool,
    /// Disks, in order.
    pub disks: Vec<SavedDisk>,
    /// Network interfaces, in order.
    pub nets: Vec<SavedNet>,
    /// A virtio-rng device.
    pub rng: bool,
    /// `--on-reboot restart`.
    pub restart_on_reboot: bool,
    /// The kernel it booted (to boot again on a reset with `--on-reboot restart`).
    pub kernel: PathBuf,
    /// Its initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Its command line.
    pub cmdline: String,
}

/// The whole machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineState {
    /// How to build it.
    pub config: SavedConfig,
    /// Every vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// The VM-wide guest clock in ns: KVM's kvmclock, or the engine's kvm-clock system time
    /// (the same quantity, so it moves between the backends). Restore continues from it.
    pub clock_ns: Option<u64>,
    /// COM1.
    pub serial: SerialPortState,
    /// The i8042 (keyboard bytes the guest has not read yet).
    pub i8042: I8042State,
    /// The CMOS RTC.
    pub rtc: RtcState,
    /// The ACPI PM block.
    pub acpi_pm: AcpiPmState,
    /// fw_cfg: its items (those of the booted kernel too) and where the guest is reading.
    pub fw_cfg: FwCfgState,
    /// The user-space IOAPIC and PIC (both backends: KVM runs a split irqchip).
    pub irqchip: Option<IrqChipState>,
    /// The user-space PIT (both backends).
    pub pit: Option<PitState>,
    /// virtio-pci devices, in configuration order.
    pub virtio_pci: Vec<VirtioPciState>,
    /// virtio-mmio devices, in configuration order.
    pub virtio_mmio: Vec<MmioTransportState>,
    /// The disks' and network interfaces' rate limiters (format version 3; last, so a
    /// version-2 file reads with none, see [`read_machine_state`]).
    pub limiters: SavedLimiters,
}

/// The devices' rate limiters as they were when the snapshot was taken (a live PATCH
/// included): each one's buckets and what they held, restored as they were (Firecracker
/// saves them the same way). Empty in a state file from before they were saved.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedLimiters {
    /// One per disk, in order.
    pub disks: Vec<RateLimiterState>,
    /// (receive, transmit) per network interface, in order.
    pub nets: Vec<(RateLimiterState, RateLimiterState)>,
}

/// Read and check the machine state in `path`: this format version, or version 2 (before the
/// rate limiters were saved: it restores without them, as it did).
pub fn read_machine_state(path: &Path) -> kvmbox_snapshot::Result<MachineState> {
    kvmbox_snapshot::read_state_upgrading(path, &[2], |_, payload| {
        // `limiters` is the last field: a version-2 payload and no limiters is version 3's.
        payload.extend(postcard_empty_limiters());
    })
}

/// postcard's encoding of [`SavedLimiters::default`]: two empty sequences, each a length 0.
fn postcard_empty_limiters() -> [u8; 2] {
    [0, 0]
}

/// `snapshot_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotKind {
    /// Every page of guest memory.
    Full,
    /// Only the pages written since the last snapshot.
    Diff,
}

fn saved_config(cfg: &VmConfig, m: &Machine) -> SavedConfig {
    let first_net = cfg.disks.len();
    let nets = cfg
        .nets
        .iter()
        .enumerate()
        .map(|(i, n)| SavedNet {
            spec: n.backend_spec(),
            mac: n.mac.unwrap_or_else(|| guest_mac(m, first_net + i)),
        })
        .collect();
    SavedConfig {
        accel: m.vm.name().to_string(),
        cpus: cfg.cpus,
        memory: cfg.memory,
        portable: cfg.cpu_model == CpuModel::Portable,
        virtio_pci: cfg.virtio == VirtioTransport::Pci,
        disks: cfg
            .disks
            .iter()
            .map(|d| SavedDisk {
                path: absolute(&d.path),
                read_only: d.read_only,
                serial: d.serial.clone(),
                format: d.format,
                lock: d.lock,
            })
            .collect(),
        nets,
        rng: cfg.rng,
        restart_on_reboot: cfg.on_reboot == OnReboot::Restart,
        kernel: absolute(&cfg.kernel),
        initrd: cfg.initrd.as_deref().map(absolute),
        cmdline: cfg.cmdline.clone(),
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The MAC address virtio device `index` shows the guest (its config space, bytes 0-5).
fn guest_mac(m: &Machine, index: usize) -> [u8; 6] {
    let mut mac = [0u8; 6];
    if let Some(d) = m.virtio.pci.get(index) {
        lock(d).read_device_config(0, &mut mac);
    } else if let Some(d) = m.virtio.mmio.get(index) {
        lock(d).read_device_config(0, &mut mac);
    }
    mac
}

impl SavedConfig {
    /// The configuration that builds this machine again, on `accel` (the saved backend
    /// unless the caller asks for the other one).
    /// The devices get `limiters`' configuration (their buckets' levels are restored later).
    fn to_vm_config(
        &self,
        accel: Option<Accel>,
        limiters: &SavedLimiters,
    ) -> Result<(VmConfig, Accel)> {
        let saved: Accel = self
            .accel
            .parse()
            .map_err(|e: String| refuse(format!("saved backend: {e}")))?;
        let accel = accel.unwrap_or(saved);
        let cfg = VmConfig {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            cpus: self.cpus,
            memory: self.memory,
            accel: AccelChoice::Fixed(accel),
            on_reboot: if self.restart_on_reboot {
                OnReboot::Restart
            } else {
                OnReboot::Exit
            },
            pvh: true,
            disks: self
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| DiskConfig {
                    path: d.path.clone(),
                    read_only: d.read_only,
                    serial: d.serial.clone(),
                    format: d.format,
                    lock: d.lock,
                    rate_limiter: limiters
                        .disks
                        .get(i)
                        .map(RateLimiterState::config)
                        .unwrap_or_default(),
                })
                .collect(),
            nets: self
                .nets
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let backend = n
                        .spec
                        .parse::<NetConfig>()
                        .or_else(|_| format!("tap={}", n.spec).parse::<NetConfig>())
                        .map_err(|e| refuse(format!("saved network interface: {e}")))?
                        .backend;
                    let (rx, tx) = limiters.nets.get(i).copied().unwrap_or_default();
                    Ok(NetConfig {
                        backend,
                        mac: Some(n.mac),
                        rx_limiter: rx.config(),
                        tx_limiter: tx.config(),
                    })
                })
                .collect::<Result<_>>()?,
            rng: self.rng,
            vsock: None,
            virtio: if self.virtio_pci {
                VirtioTransport::Pci
            } else {
                VirtioTransport::Mmio
            },
            // Multiboot modules and the test device are for conformance kernels, which are not
            // snapshotted: a restored machine has neither.
            modules: Vec::new(),
            testdev: false,
            // Limits are the host's, not the snapshot's: `load` sets those given with it.
            limits: Default::default(),
            cpu_model: if self.portable {
                CpuModel::Portable
            } else {
                CpuModel::Host
            },
            // The loader says (`PUT /snapshot/load`'s `track_dirty_pages`, as in Firecracker).
            track_dirty_pages: false,
        };
        Ok((cfg, accel))
    }
}

/// Stop every virtio device's worker (requests in hand finish), run `f`, start them again.
fn with_devices_quiesced<T>(m: &Machine, f: impl FnOnce() -> Result<T>) -> Result<T> {
    for d in &m.virtio.pci {
        lock(d).quiesce();
    }
    for d in &m.virtio.mmio {
        lock(d).quiesce();
    }
    let r = f();
    let mut resumed = Ok(());
    for d in &m.virtio.pci {
        resumed = resumed.and(lock(d).resume());
    }
    for d in &m.virtio.mmio {
        resumed = resumed.and(lock(d).resume());
    }
    let v = r?;
    resumed?;
    Ok(v)
}

/// Why a Diff snapshot of a VM without dirty-page tracking is refused.
pub const DIFF_NEEDS_TRACKING: &str = "snapshot_type Diff needs dirty-page tracking: set \
     track_dirty_pages in PUT /machine-config before InstanceStart (or in PUT /snapshot/load, \
     or run with --track-dirty-pages)";

/// Save the paused machine `m` (built from `cfg`): guest memory to `mem_path`, then the state
/// to `state_path` (written last and whole, so a crash leaves no state file that names
/// half-written memory). The VM stays paused.
///
/// With dirty-page tracking on, a Full snapshot clears the dirty log and a Diff snapshot
/// writes only the pages written since the last snapshot (or since boot or restore): a
/// sparse file of the memory's size whose data ranges are those pages, written over
/// `mem_path` in place when that is a file of that size (Firecracker's behaviour). Applied on
/// top of its base memory file ([`kvmbox_snapshot::merge_memory`], `kvmbox snapshot merge`),
/// it restores with this state file.
///
/// With `disk_snapshot`, a live snapshot of the disks too (kvmbox's `vm snapshot take` of a
/// running VM): while the devices are quiesced (requests in hand finished, none taken), every
/// writable disk gets the qcow2 internal snapshot of that name, taken by its open backend on
/// its own descriptor ([`kvmbox_block::Qcow2Backend::snapshot_create`]), before the state and
/// memory are written. All or nothing: a writable disk that is not qcow2 is refused before
/// anything is done, and if a disk's snapshot or the files fail, the disk snapshots already
/// taken are deleted again.
pub fn create(
    m: &Machine,
    cfg: &VmConfig,
    state_path: &Path,
    mem_path: &Path,
    kind: SnapshotKind,
    disk_snapshot: Option<&str>,
) -> Result<()> {
    if kind == SnapshotKind::Diff && !m.vm.dirty_log_active() {
        return Err(refuse(DIFF_NEEDS_TRACKING));
    }
    if cfg.vsock.is_some() {
        // Its connections live in host sockets that a snapshot cannot hold.
        return Err(refuse(
            "a VM with a vsock device cannot be snapshotted (yet)",
        ));
    }
    let disk_path = |i: usize| {
        cfg.disks
            .get(i)
            .map(|d| d.path.display().to_string())
            .unwrap_or_else(|| format!("#{i}"))
    };
    // The disks the snapshot covers: the writable ones (read-only disks do not change).
    let writable: Vec<usize> = (0..m.disks.len())
        .filter(|&i| !m.disks[i].caps().read_only)
        .collect();
    if disk_snapshot.is_some() {
        if let Some(&i) = writable
            .iter()
            .find(|&&i| !m.disks[i].holds_internal_snapshots())
        {
            return Err(refuse(format!(
                "disk '{}' is not a qcow2 image: only qcow2 images hold internal snapshots",
                disk_path(i)
            )));
        }
    }
    with_devices_quiesced(m, || {
        let mut taken: Vec<usize> = Vec::new();
        if let Some(name) = disk_snapshot {
            for &i in &writable {
                let d = &m.disks[i];
                if let Err(e) = d.flush().and_then(|()| d.snapshot_create(name)) {
                    for &j in &taken {
                        let _ = m.disks[j].snapshot_delete(name);
                    }
                    return Err(Error::Host(format!(
                        "snapshot '{name}' of disk '{}': {e}",
                        disk_path(i)
                    )));
                }
                taken.push(i);
            }
        }
        let saved = save_state(m, cfg, state_path, mem_path, kind);
        if let (Err(_), Some(name)) = (&saved, disk_snapshot) {
            for &j in &taken {
                let _ = m.disks[j].snapshot_delete(name);
            }
        }
        saved
    })
}

/// Delete the qcow2 internal snapshot `name` on every writable disk of the paused machine `m`
/// (built from `cfg`) that holds it, by each disk's open backend on its own descriptor
/// ([`kvmbox_block::Qcow2Backend::snapshot_delete`]), while the devices are quiesced (kvmbox's
/// `vm snapshot delete` of a running VM). A disk without it is left as it is, so a delete
/// that failed on one disk can be asked again. The disks it was deleted on, by path.
pub fn delete_disk_snapshot(m: &Machine, cfg: &VmConfig, name: &str) -> Result<Vec<String>> {
    let disk_path = |i: usize| {
        cfg.disks
            .get(i)
            .map(|d| d.path.display().to_string())
            .unwrap_or_else(|| format!("#{i}"))
    };
    with_devices_quiesced(m, || {
        let mut deleted = Vec::new();
        for (i, d) in m.disks.iter().enumerate() {
            if d.caps().read_only || !d.holds_internal_snapshots() {
                continue;
            }
            let held = d
                .snapshot_names()
                .map_err(|e| Error::Host(format!("disk '{}': {e}", disk_path(i))))?;
            if !held.iter().any(|n| n == name) {
                continue;
            }
            d.flush()
                .and_then(|()| d.snapshot_delete(name))
                .map_err(|e| {
                    Error::Host(format!(
                        "deleting snapshot '{name}' of disk '{}': {e}",
                        disk_path(i)
                    ))
                })?;
            deleted.push(disk_path(i));
        }
        Ok(deleted)
    })
}

/// The vCPUs' and devices' state to `state_path` and guest memory to `mem_path` (the
/// devices quiesced, see [`create`]).
fn save_state(
    m: &Machine,
    cfg: &VmConfig,
    state_path: &Path,
    mem_path: &Path,
    kind: SnapshotKind,
) -> Result<()> {
    {
        let mut vcpus = Vec::with_capacity(m.vcpus.len());
        for (i, v) in m.vcpus.iter().enumerate() {
            let s = v
                .run_on(|vcpu| vcpu.save_state())
                .map_err(|e| Error::Host(format!("vCPU {i}: {e}")))??;
            vcpus.push(s);
        }
        let state = MachineState {
            config: saved_config(cfg, m),
            vcpus,
            clock_ns: m.vm.clock_ns()?,
            serial: lock(&m.platform.serial).save_state(),
            i8042: lock(&m.platform.i8042).save_state(),
            rtc: lock(&m.platform.rtc).save_state(),
            acpi_pm: lock(&m.platform.acpi_pm).save_state(),
            fw_cfg: lock(&m.fw_cfg).state().clone(),
            irqchip: Some(m.irq_platform.chip.save_state()),
            pit: Some(lock(&m.irq_platform.pit).save_state()),
            virtio_pci: m.virtio.pci.iter().map(|d| lock(d).save_state()).collect(),
            virtio_mmio: m.virtio.mmio.iter().map(|d| lock(d).save_state()).collect(),
            limiters: SavedLimiters {
                disks: m
                    .virtio
                    .limiters
                    .disks
                    .iter()
                    .map(|l| l.save_state())
                    .collect(),
                nets: m
                    .virtio
                    .limiters
                    .nets
                    .iter()
                    .map(|(rx, tx)| (rx.save_state(), tx.save_state()))
                    .collect(),
            },
        };
        // Nothing writes guest memory now (vCPUs paused, devices quiesced): the log taken
        // here is exactly what changed since the last one.
        let log = if m.vm.dirty_log_active() {
            Some(m.vm.take_dirty_log()?)
        } else {
            None
        };
        let written = match (kind, &log) {
            (SnapshotKind::Diff, Some(log)) => {
                let dirty = |a: vm_memory::GuestAddress| log.is_dirty(a.0);
                kvmbox_snapshot::write_memory(&m.mem, mem_path, PageFilter::Only(&dirty))
            }
            _ => kvmbox_snapshot::write_memory(&m.mem, mem_path, PageFilter::Full),
        }
        .and_then(|_| kvmbox_snapshot::write_state(state_path, &state));
        if let (Err(_), Some(log)) = (&written, &log) {
            // Not saved: the next snapshot must still see these pages as changed.
            log.put_back(&m.mem);
        }
        written?;
        Ok(())
    }
}

/// Check everything about `s` that can be checked before building anything.
fn check(s: &MachineState) -> Result<()> {
    let c = &s.config;
    if c.cpus == 0 || s.vcpus.len() != c.cpus as usize {
        return Err(refuse(format!(
            "the state has {} vCPU states for {} vCPUs",
            s.vcpus.len(),
            c.cpus
        )));
    }
    let devices = c.disks.len() + c.nets.len() + usize::from(c.rng);
    let (pci, mmio) = (s.virtio_pci.len(), s.virtio_mmio.len());
    if (c.virtio_pci && (pci, mmio) != (devices, 0))
        || (!c.virtio_pci && (pci, mmio) != (0, devices))
    {
        return Err(refuse(format!(
            "the state has {pci} virtio-pci and {mmio} virtio-mmio devices for {devices} configured"
        )));
    }
    let l = &s.limiters;
    let (disks, nets) = (l.disks.len(), l.nets.len());
    // None at all: a version-2 file, from before the limiters were saved.
    if (disks, nets) != (0, 0) && (disks, nets) != (c.disks.len(), c.nets.len()) {
        return Err(refuse(format!(
            "the state has rate limiters for {disks} disks and {nets} network interfaces, for {} and {} configured",
            c.disks.len(),
            c.nets.len()
        )));
    }
    let named = l
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| (format!("disk {i}"), d))
        .chain(l.nets.iter().enumerate().flat_map(|(i, (rx, tx))| {
            [
                (format!("network interface {i} rx"), rx),
                (format!("network interface {i} tx"), tx),
            ]
        }));
    for (what, st) in named {
        st.config()
            .validate()
            .map_err(|e| refuse(format!("rate limiter of {what}: {e}")))?;
    }
    Ok(())
}

/// Build the machine saved in `state_path` / `mem_path` again, paused, every piece in its
/// saved state, on `accel` (the saved backend when `None`), logging dirty pages from the
/// restore on when `track_dirty_pages`. Everything is checked before the new machine runs a
/// single instruction; on any error the new machine is torn down.
pub fn load(
    state_path: &Path,
    mem_path: &Path,
    accel: Option<Accel>,
    track_dirty_pages: bool,
    limits: &crate::Limits,
    control: &Arc<VmControl>,
) -> Result<(Machine, VmConfig)> {
    let s = read_machine_state(state_path)?;
    check(&s)?;
    let (mut cfg, accel) = s.config.to_vm_config(accel, &s.limiters)?;
    cfg.track_dirty_pages = track_dirty_pages;
    // The limits are the host's, given with the restore, checked against the saved VM.
    limits.check(cfg.cpus, cfg.memory)?;
    cfg.limits = limits.clone();
    let ranges: Vec<(vm_memory::GuestAddress, usize)> =
        kvmbox_arch::layout::ram_regions(cfg.memory)
            .into_iter()
            .map(|(a, l)| (vm_memory::GuestAddress(a), l as usize))
            .collect();
    let mem = kvmbox_snapshot::map_memory(mem_path, &ranges)?;
    let m = Machine::build_from(&cfg, accel, control, true, Some(mem))?;
    match restore_into(&m, &s) {
        Ok(()) => Ok((m, cfg)),
        Err(e) => {
            m.stop();
            Err(e)
        }
    }
}

fn restore_into(m: &Machine, s: &MachineState) -> Result<()> {
    // The VM clock before the vCPUs: the engine's vCPUs rewrite their kvm-clock records from
    // it when their MSRs are restored (KVM refreshes its records on the next entry anyway).
    if let Some(ns) = s.clock_ns {
        m.vm.set_clock_ns(ns)?;
    }
    // Then the vCPUs: a CPUID this backend cannot show is the likeliest refusal.
    for (i, (v, st)) in m.vcpus.iter().zip(&s.vcpus).enumerate() {
        let st = st.clone();
        v.run_on(move |vcpu| vcpu.restore_state(&st))
            .map_err(|e| Error::Host(format!("vCPU {i}: {e}")))?
            .map_err(|e| refuse(format!("vCPU {i}: {e}")))?;
    }
    fn dev(what: &'static str) -> impl Fn(String) -> Error {
        move |e| refuse(format!("{what}: {e}"))
    }
    lock(&m.platform.serial)
        .restore_state(&s.serial)
        .map_err(dev("serial"))?;
    lock(&m.platform.i8042)
        .restore_state(&s.i8042)
        .map_err(dev("i8042"))?;
    lock(&m.platform.rtc)
        .restore_state(&s.rtc)
        .map_err(dev("RTC"))?;
    lock(&m.platform.acpi_pm).restore_state(&s.acpi_pm);
    lock(&m.fw_cfg)
        .restore_state(&s.fw_cfg)
        .map_err(|e| refuse(format!("fw_cfg: {e}")))?;
    let p = &m.irq_platform;
    if let Some(chip) = &s.irqchip {
        p.chip.restore_state(chip)?;
    }
    if let Some(pit) = &s.pit {
        lock(&p.pit).restore_state(pit).map_err(dev("PIT"))?;
    }
    for (d, st) in m.virtio.pci.iter().zip(&s.virtio_pci) {
        lock(d).restore_state(st)?;
    }
    if let Some(root) = &m.virtio.pci_root {
        lock(root)
            .remap_all()
            .map_err(|e| refuse(format!("PCI BARs: {e}")))?;
    }
    for (d, st) in m.virtio.mmio.iter().zip(&s.virtio_mmio) {
        lock(d).restore_state(st)?;
    }
    // The limiters' buckets as they were (the devices were built with their configuration),
    // before the workers run again.
    let live = &m.virtio.limiters;
    for (l, st) in live.disks.iter().zip(&s.limiters.disks) {
        l.restore_state(st);
    }
    for ((rx, tx), (rs, ts)) in live.nets.iter().zip(&s.limiters.nets) {
        rx.restore_state(rs);
        tx.restore_state(ts);
    }
    for d in &m.virtio.pci {
        lock(d).resume()?;
    }
    for d in &m.virtio.mmio {
        lock(d).resume()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a version-2 payload gets appended is exactly the encoding of no limiters.
    #[test]
    fn the_version_2_upgrade_appends_no_limiters() {
        let none = postcard::to_stdvec(&SavedLimiters::default()).unwrap();
        assert_eq!(none, postcard_empty_limiters());
    }
}
