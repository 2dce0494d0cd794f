//! One call per device for the VMM: create the interrupt lines, build the transport, put it
//! on the bus, register the ioeventfds.

use std::sync::{Arc, Mutex};

use kvmbox_cpu::GuestMemoryMmap;
use kvmbox_cpu::{MsiLine, Vm};
use kvmbox_devices::IoBus;
use kvmbox_pci::{PciDevice, PciRoot};

use super::mmio::{cmdline_arg, MmioTransport, MMIO_WINDOW_SIZE};
use super::pci::VirtioPciDevice;
use crate::device::VirtioDevice;
use crate::Result;

/// Put `dev` on PCI bus 0 behind virtio-pci: one MSI-X vector per queue plus one for
/// configuration changes (each a `vm.msi_line()`), INTx on `intx_gsi` if given (its number
/// also goes into the interrupt line register), BAR 0 placed and mapped, queue notifications
/// on ioeventfds where the backend has them. Returns the device number and the device.
pub fn attach_pci(
    root: &Mutex<PciRoot>,
    vm: &dyn Vm,
    mem: &GuestMemoryMmap,
    dev: Box<dyn VirtioDevice>,
    intx_gsi: Option<u32>,
) -> Result<(u8, Arc<Mutex<VirtioPciDevice>>)> {
    let vectors = dev.queue_max_sizes().len() + 1;
    let lines = (0..vectors)
        .map(|_| vm.msi_line())
        .collect::<std::result::Result<Vec<Arc<dyn MsiLine>>, _>>()?;
    let intx = intx_gsi.map(|g| vm.irq_line(g)).transpose()?;
    let mut pci = VirtioPciDevice::new(dev, mem.clone(), lines, intx)?;
    if let Some(g) = intx_gsi {
        pci.config_mut().set_interrupt_line(g as u8);
    }
    let pci = Arc::new(Mutex::new(pci));
    let slot = root
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .add_device(pci.clone())?;
    pci.lock()
        .unwrap_or_else(|e| e.into_inner())
        .register_ioevents(vm)?;
    Ok((slot, pci))
}

/// Put `dev` behind virtio-mmio at `base` (one [`MMIO_WINDOW_SIZE`] window) on `io`'s MMIO
/// bus with edge interrupt `gsi`, notifications on ioeventfds where the backend has them.
/// Returns the kernel command-line entry that announces it, and the device.
pub fn attach_mmio(
    io: &IoBus,
    vm: &dyn Vm,
    mem: &GuestMemoryMmap,
    dev: Box<dyn VirtioDevice>,
    base: u64,
    gsi: u32,
) -> Result<(String, Arc<Mutex<MmioTransport>>)> {
    let t = Arc::new(Mutex::new(MmioTransport::new(
        dev,
        mem.clone(),
        vm.irq_line(gsi)?,
    )?));
    io.mmio.insert(t.clone(), base, MMIO_WINDOW_SIZE)?;
    t.lock()
        .unwrap_or_else(|e| e.into_inner())
        .register_ioevents(vm, base)?;
    Ok((cmdline_arg(base, gsi), t))
}
