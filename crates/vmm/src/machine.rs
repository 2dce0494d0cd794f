//! One built VM: guest memory, the backend, the bus with its devices, and the vCPU threads.
//! The control loop owns it; snapshot code walks it.

use crate::config::CpuModel;
use crate::config::VmConfig;
use crate::vcpu::{VcpuError, VcpuHandle, VcpuShared};
use crate::vm::{
    add_legacy_devices, attach_virtio, check_cpus, create_backend, mmio_slots, portable_cpuid,
    virtio_devices, Error, IrqPlatform, Platform, VirtioDevices,
};
use kvmbox_cpu::{Accel, VcpuConfig, Vm};
use kvmbox_devices::fw_cfg::FwCfg;
use kvmbox_devices::{IoBus, VmControl};
use kvmbox_virtio::transport::cmdline_arg;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

/// A built VM. Fields drop in order: vCPU threads first (see [`Machine::stop`]), then device
/// threads, then the backend and its guest-memory mappings.
pub struct Machine {
    /// One handle per vCPU thread, by vCPU index.
    pub vcpus: Vec<VcpuHandle>,
    /// The PC platform devices (serial, i8042, ACPI PM, RTC).
    pub platform: Platform,
    /// QEMU's firmware configuration device.
    pub fw_cfg: Arc<Mutex<FwCfg>>,
    /// The virtio devices.
    pub virtio: VirtioDevices,
    /// The virtio-blk disks' open images, in the configuration's order.
    pub disks: Vec<crate::vm::DiskBackend>,
    /// The interrupt controllers (IOAPIC, PIC; the engine's LAPICs) and the PIT timer.
    pub irq_platform: IrqPlatform,
    /// Port and MMIO buses.
    pub io: Arc<IoBus>,
    /// The CPU backend's VM.
    pub vm: Box<dyn Vm>,
    /// Guest RAM.
    pub mem: kvmbox_cpu::GuestMemory,
    /// The engine it runs on.
    pub accel: Accel,
}

impl Machine {
    /// Build the VM from `cfg` and start its vCPU threads running: each runs guest code as
    /// soon as it has filtered itself (an INIT/SIPI sent to one not running yet waits in its
    /// local APIC).
    pub fn build(cfg: &VmConfig, accel: Accel, control: &Arc<VmControl>) -> Result<Machine, Error> {
        Self::build_from(cfg, accel, control, false, None)
    }

    /// [`Machine::build`], or with `restored` guest memory (a snapshot's, kernel and
    /// firmware tables already in it) the same machine without loading anything: its vCPUs
    /// and devices wait, paused, for their saved state.
    pub fn build_from(
        cfg: &VmConfig,
        accel: Accel,
        control: &Arc<VmControl>,
        paused: bool,
        restored: Option<kvmbox_cpu::GuestMemory>,
    ) -> Result<Machine, Error> {
        let (mem, fresh) = match restored {
            Some(mem) => (mem, false),
            None => (kvmbox_arch::guest_memory(cfg.memory)?, true),
        };
        // The kernel goes in first: a bad image is the user's most likely mistake, and it
        // should be reported as such whatever the backend.
        let opened = virtio_devices(cfg)?;
        let mmio_slots = mmio_slots(cfg, opened.devices.len())?;
        let mut cmdline = cfg.cmdline.clone();
        for &(base, gsi) in &mmio_slots {
            cmdline.push(' ');
            cmdline.push_str(&cmdline_arg(base, gsi));
        }
        let mut acpi = kvmbox_arch::AcpiConfig::new(cfg.cpus);
        // kvmbox's i8042 is the reset line (Linux's reboot=k writes 0xfe to port 0x64 either
        // way) and a keyboard that only types Ctrl+Alt+Del: advertising it would make every
        // Linux boot probe it. A guest that wants SendCtrlAltDel passes `i8042.nopnp`, as
        // Firecracker's guests do.
        acpi.i8042 = false;
        if cfg.virtio == crate::config::VirtioTransport::Pci {
            acpi.pci = Some(kvmbox_arch::PciHostBridge::new());
        }
        let boot = if fresh {
            let rsdp = kvmbox_arch::create_acpi_tables_with(&mem, &acpi)?;
            let mut params = kvmbox_arch::LoadParams::new(&cfg.kernel, &cmdline, cfg.memory);
            params.initrd = cfg.initrd.as_deref();
            params.cpus = cfg.cpus;
            params.prefer_pvh = cfg.pvh;
            params.rsdp = Some(rsdp);
            // The software engine would spend tens of millions of instructions in a bzImage's
            // own decompressor: unpack the kernel on the host instead.
            params.host_decompress = accel == Accel::Emu;
            params.modules = cfg.modules.clone();
            Some(kvmbox_arch::load(&mem, &params)?)
        } else {
            None
        };
        let io = Arc::new(IoBus::default());
        let (vm, irq_platform) = create_backend(accel, &mem, cfg.cpus, &io)?;
        check_cpus(cfg.cpus, vm.name(), vm.max_vcpus())?;
        let platform = add_legacy_devices(vm.as_ref(), &io, control)?;
        let fw_cfg = crate::firmware::attach_fw_cfg(
            &io,
            &mem,
            cfg.cpus,
            cfg.memory,
            boot.as_ref(),
            &cmdline,
        )?;
        if cfg.testdev {
            crate::firmware::attach_testdev(vm.as_ref(), &io)?;
        }
        if boot.as_ref().map(|b| b.entry_kind) == Some(kvmbox_arch::EntryKind::Multiboot) {
            crate::firmware::bios_state(&io, &mem)?;
        }
        let virtio = attach_virtio(
            cfg,
            vm.as_ref(),
            &io,
            &mem,
            opened.devices,
            opened.limiters,
            &mmio_slots,
        )?;
        if let (true, Some(root)) = (cfg.testdev, &virtio.pci_root) {
            crate::firmware::attach_pci_testdev(root)?;
        }

        let mut vcpus = Vec::new();
        for id in 0..cfg.cpus {
            let mut vcpu = vm.create_vcpu(id)?;
            vcpu.configure(&VcpuConfig {
                id,
                count: cfg.cpus,
            })?;
            if cfg.cpu_model == CpuModel::Portable {
                vcpu.set_cpuid(&portable_cpuid(id, cfg.cpus))?;
            }
            match &boot {
                Some(boot) if id == 0 => {
                    vcpu.set_sregs(&boot.sregs)?;
                    vcpu.set_regs(&boot.regs)?;
                }
                Some(_) => vcpu.set_wait_for_sipi()?,
                // A restored vCPU gets its whole state from the snapshot.
                None => {}
            }
            vcpus.push(vcpu);
        }
        // Before any guest code runs, so the log holds every page written since the memory
        // was made (Diff snapshots).
        if cfg.track_dirty_pages {
            vm.start_dirty_log()?;
        }
        control.set_kickers(vcpus.iter().map(|v| v.kicker()).collect());
        let shared = VcpuShared {
            io: io.clone(),
            control: control.clone(),
            halted: Arc::new(AtomicUsize::new(0)),
            count: vcpus.len(),
            affinity: Arc::new(cfg.limits.affinity.clone()),
        };
        let mut handles = Vec::new();
        for (id, vcpu) in vcpus.into_iter().enumerate() {
            // A running VM's start is vCPU 0's alone (the others wait for its SIPI): the
            // other threads start, and this one goes on (installing its own filter), once
            // vCPU 0 runs guest code, so that on a host with few CPUs their set-up (each
            // compiles and installs a seccomp filter, ~0.6 ms) does not delay it (seen: 4 ms
            // with 4 vCPUs on 2 host CPUs).
            let (filtered, vcpu0_filtered) = if id == 0 && !paused {
                let (tx, rx) = std::sync::mpsc::channel::<()>();
                (Some(tx), Some(rx))
            } else {
                (None, None)
            };
            let h = VcpuHandle::spawn(id, vcpu, shared.clone(), paused, filtered);
            match h {
                Ok(h) => handles.push(h),
                Err(e) => {
                    handles.into_iter().for_each(VcpuHandle::finish);
                    return Err(Error::Host(format!("cannot start vCPU thread: {e}")));
                }
            }
            if let Some(rx) = vcpu0_filtered {
                // Returns when the thread drops its sender: filtered, or ended.
                let _ = rx.recv();
            }
        }
        let machine = Machine {
            vcpus: handles,
            platform,
            fw_cfg,
            virtio,
            disks: opened.disks,
            irq_platform,
            io,
            vm,
            mem,
            accel,
        };
        if paused {
            machine.wait_all(VcpuHandle::wait_paused)?;
        }
        Ok(machine)
    }

    fn wait_all(&self, wait: fn(&VcpuHandle) -> Result<(), VcpuError>) -> Result<(), Error> {
        for v in &self.vcpus {
            match wait(v) {
                // A vCPU whose thread ended runs no guest code: that is what was asked. The
                // reason it ended (a guest stop request) reaches the control loop on its own.
                Ok(()) | Err(VcpuError::Gone(_)) => {}
                Err(e) => return Err(Error::Host(e.to_string())),
            }
        }
        Ok(())
    }

    /// Stop every vCPU from running guest code; returns when all have acknowledged.
    pub fn pause(&self) -> Result<(), Error> {
        for v in &self.vcpus {
            // A vCPU that is gone cannot run: nothing to ask.
            let _ = v.request_pause();
        }
        self.wait_all(VcpuHandle::wait_paused)
    }

    /// Let every vCPU run guest code again; returns when all have acknowledged.
    pub fn resume(&self) -> Result<(), Error> {
        for v in &self.vcpus {
            let _ = v.request_resume();
        }
        self.wait_all(VcpuHandle::wait_resumed)
    }

    /// Where the guest resumes from ACPI S3: the real-mode waking vector it wrote into the
    /// FACS (0: none, as when the guest never set it).
    pub fn waking_vector(&self) -> u32 {
        use vm_memory::{Bytes, GuestAddress};
        let at = kvmbox_arch::facs_address() + FACS_WAKING_VECTOR;
        self.mem.read_obj::<u32>(GuestAddress(at)).unwrap_or(0)
    }

    /// Restart the paused vCPUs after ACPI S3, memory kept: the boot CPU in real mode at
    /// `vector` (CS:IP = vector >> 4 : vector & 0xf, everything else as after a reset that
    /// firmware followed with caches on), the others waiting for INIT/SIPI.
    pub fn restart_at_waking_vector(&self, vector: u32) -> Result<(), Error> {
        for (id, v) in self.vcpus.iter().enumerate() {
            let done = v
                .run_on(move |cpu| {
                    if id != 0 {
                        return cpu.set_wait_for_sipi();
                    }
                    let mut sregs = cpu.sregs()?;
                    real_mode_at(&mut sregs, (vector >> 4) as u16);
                    cpu.set_sregs(&sregs)?;
                    cpu.set_regs(&kvmbox_cpu::Regs {
                        rip: u64::from(vector & 0xf),
                        rflags: 2,
                        ..Default::default()
                    })
                })
                .map_err(|e| Error::Host(e.to_string()))?;
            done.map_err(|e| Error::Host(format!("restarting vCPU {id} after S3: {e}")))?;
        }
        Ok(())
    }

    /// Press the ACPI power button (PWRBTN_STS + SCI): an ACPI-aware guest shuts down.
    pub fn press_power_button(&self) -> Result<(), Error> {
        let mut pm = self
            .platform
            .acpi_pm
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        pm.press_power_button()
            .map_err(|e| Error::Host(format!("raising the SCI: {e}")))
    }

    /// Press and release Ctrl+Alt+Del on the i8042 keyboard (IRQ 1): Linux's atkbd turns it
    /// into its Ctrl-Alt-Del action (a restart, or SIGINT to init).
    pub fn send_ctrl_alt_del(&self) -> Result<(), Error> {
        let mut kbd = self
            .platform
            .i8042
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        kbd.send_ctrl_alt_del()
            .map_err(|e| Error::Device(format!("SendCtrlAltDel: {e}")))
    }

    /// End the vCPU threads, then tear the VM down (device threads before the backend).
    pub fn stop(self) {
        drop(self.stop_keeping_backend());
    }

    /// [`Machine::stop`] short of the backend: the vCPU threads end and the devices go (their
    /// threads finish, disk images and TAP devices are closed), and what is left, the
    /// backend's VM and the guest memory, is handed back to be released last.
    pub fn stop_keeping_backend(mut self) -> Backend {
        for v in std::mem::take(&mut self.vcpus) {
            v.finish();
        }
        let Machine {
            platform,
            virtio,
            disks,
            irq_platform,
            io,
            vm,
            mem,
            ..
        } = self;
        // In field order, as a plain drop of the machine would.
        drop((platform, virtio, disks, irq_platform, io));
        Backend { vm, mem }
    }
}

/// What is left of a stopped [`Machine`]: the backend's VM and the guest memory. Dropping it
/// releases them (the VM first).
pub struct Backend {
    /// The CPU backend's VM.
    pub vm: Box<dyn Vm>,
    /// Guest RAM.
    pub mem: kvmbox_cpu::GuestMemory,
}

/// Offset of Firmware_Waking_Vector in the FACS.
const FACS_WAKING_VECTOR: u64 = 12;

/// Real mode as after a reset (CR0.ET only, no paging, EFER clear, descriptor tables at their
/// reset values) with CS = `cs` and every other segment 0; the APIC base stays.
fn real_mode_at(s: &mut kvmbox_cpu::SpecialRegs, cs: u16) {
    use kvmbox_cpu::{DescriptorTable, Segment};
    let seg = |selector: u16, type_: u8| Segment {
        base: u64::from(selector) << 4,
        limit: 0xffff,
        selector,
        type_,
        present: true,
        s: true,
        ..Segment::default()
    };
    s.cs = seg(cs, 0xb);
    for d in [&mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss] {
        *d = seg(0, 3);
    }
    s.tr = Segment {
        limit: 0xffff,
        type_: 0xb,
        present: true,
        ..Segment::default()
    };
    s.ldt = Segment {
        limit: 0xffff,
        type_: 2,
        present: true,
        ..Segment::default()
    };
    s.gdt = DescriptorTable {
        base: 0,
        limit: 0xffff,
    };
    s.idt = DescriptorTable {
        base: 0,
        limit: 0x3ff,
    };
    s.cr0 = 0x10;
    s.cr2 = 0;
    s.cr3 = 0;
    s.cr4 = 0;
    s.cr8 = 0;
    s.efer = 0;
}
