//! The devices that tell firmware and test kernels about the machine, as QEMU's PC has them:
//! fw_cfg (always), pc-testdev and pci-testdev (with `--testdev`); and the state a BIOS leaves
//! behind for multiboot kernels.

use crate::vm::{Error, Result};
use kvmbox_arch::{layout, BootSetup};
use kvmbox_cpu::{IrqLine, Vm};
use kvmbox_devices::fw_cfg::{FwCfg, Machine, FW_CFG_DMA_LEN, FW_CFG_IO_LEN};
use kvmbox_devices::testdev::{TestDevIomem, TestDevIrq, TestDevPorts, TESTDEV_PORT_LEN};
use kvmbox_devices::IoBus;
use std::sync::{Arc, Mutex};

/// Put fw_cfg on the port bus with QEMU's PC items for this machine and the loaded kernel
/// (`None` when the machine is rebuilt from a snapshot: no kernel was loaded, and the
/// snapshot's fw_cfg state replaces these items).
pub(crate) fn attach_fw_cfg(
    io: &IoBus,
    mem: &kvmbox_cpu::GuestMemory,
    cpus: u32,
    memory: u64,
    boot: Option<&BootSetup>,
    cmdline: &str,
) -> Result<Arc<Mutex<FwCfg>>> {
    let machine = Machine {
        cpus: u16::try_from(cpus).map_err(|_| Error::Device(format!("fw_cfg: {cpus} vCPUs")))?,
        ram_size: memory,
        e820: kvmbox_arch::e820_table(memory)
            .iter()
            .map(|e| (e.addr, e.size, e.kind))
            .collect(),
        kernel: boot.map(|b| (b.kernel_range.0, b.kernel_range.1, b.regs.rip)),
        initrd: boot.and_then(|b| b.initrd_range),
        cmdline: Some((layout::CMDLINE_START, cmdline.to_string())),
    };
    let dma = u64::from(layout::FW_CFG_DMA_PORT);
    let dev = FwCfg::with_machine(mem.clone(), dma, &machine)
        .map_err(|e| Error::Device(e.to_string()))?;
    let dev = Arc::new(Mutex::new(dev));
    io.pio
        .insert(dev.clone(), u64::from(layout::FW_CFG_PORT), FW_CFG_IO_LEN)?;
    io.pio.insert(dev.clone(), dma, FW_CFG_DMA_LEN)?;
    Ok(dev)
}

/// Leave the machine as a PC BIOS (SeaBIOS, which QEMU runs before a multiboot `-kernel`) leaves
/// it for a multiboot kernel: the real-mode interrupt vector table and its handlers
/// ([`kvmbox_arch::bios`]), both 8259s initialized with the BIOS's vector bases and only the
/// timer (IRQ 0) and the cascade (IRQ 2) unmasked, and the PIT's channel 0 ticking at 18.2 Hz
/// (mode 3, count 65536). The ports are written through the bus, as the BIOS's own `out`
/// instructions would write them, so the same device models take the same state on both
/// backends. Interrupts stay disabled at entry (multiboot enters with IF clear).
pub(crate) fn bios_state(io: &IoBus, mem: &kvmbox_cpu::GuestMemory) -> Result<()> {
    use kvmbox_arch::bios::{BIOS_HWIRQ0_VECTOR, BIOS_HWIRQ8_VECTOR};
    kvmbox_arch::bios::write_real_mode_ivt(mem)?;
    let writes: [(u16, u8); 13] = [
        // ICW1 (edge, cascade, ICW4 follows), ICW2 (vector base), ICW3, ICW4 (8086 mode), mask.
        (0x20, 0x11),
        (0x21, BIOS_HWIRQ0_VECTOR),
        (0x21, 1 << 2),
        (0x21, 0x01),
        (0x21, !((1 << 0) | (1 << 2))),
        (0xa0, 0x11),
        (0xa1, BIOS_HWIRQ8_VECTOR),
        (0xa1, 2),
        (0xa1, 0x01),
        (0xa1, 0xff),
        // PIT channel 0: lobyte/hibyte access, mode 3 (square wave), binary; count 0 = 65536.
        (0x43, 0x36),
        (0x40, 0x00),
        (0x40, 0x00),
    ];
    for (port, value) in writes {
        if !io.pio.write(u64::from(port), &[value]) {
            return Err(Error::Device(format!(
                "BIOS state: no device at port {port:#x}"
            )));
        }
    }
    Ok(())
}

/// Put QEMU's pc-testdev on the buses: the scratch register (word and byte windows), the flush
/// port, the interrupt-line ports (through the backend's `irq_line`, so the same for KVM and the
/// engine) and the device memory.
pub(crate) fn attach_testdev(vm: &dyn Vm, io: &IoBus) -> Result<()> {
    let flush = u64::from(layout::TESTDEV_FLUSH_PORT);
    let ports = Arc::new(Mutex::new(TestDevPorts::new(flush)));
    for port in [
        layout::TESTDEV_IOPORT,
        layout::TESTDEV_FLUSH_PORT,
        layout::TESTDEV_IOPORT_BYTE,
    ] {
        io.pio
            .insert(ports.clone(), u64::from(port), TESTDEV_PORT_LEN)?;
    }
    let lines = (0..layout::TESTDEV_IRQ_LINES as u32)
        .map(|gsi| vm.irq_line(gsi))
        .collect::<std::result::Result<Vec<Arc<dyn IrqLine>>, _>>()?;
    io.pio.insert(
        Arc::new(Mutex::new(TestDevIrq::new(lines))),
        u64::from(layout::TESTDEV_IRQ_PORT),
        layout::TESTDEV_IRQ_LINES,
    )?;
    io.mmio.insert(
        Arc::new(Mutex::new(TestDevIomem::default())),
        layout::TESTDEV_IOMEM_START,
        layout::TESTDEV_IOMEM_SIZE,
    )?;
    Ok(())
}

/// Put QEMU's pci-testdev on PCI bus 0 (there is a bus with `--virtio pci`, the default).
pub(crate) fn attach_pci_testdev(root: &Mutex<kvmbox_pci::PciRoot>) -> Result<()> {
    let pci = |e: kvmbox_pci::Error| Error::Device(format!("pci-testdev: {e}"));
    let dev = Arc::new(Mutex::new(kvmbox_pci::PciTestDev::new().map_err(pci)?));
    root.lock()
        .unwrap_or_else(|e| e.into_inner())
        .add_device(dev)
        .map_err(pci)?;
    Ok(())
}
