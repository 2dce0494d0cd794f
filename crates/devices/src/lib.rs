//! Devices of a kvmbox guest and the one bus that reaches them.
//!
//! Every device implements [`BusDevice`] and sits on the port-I/O or the MMIO [`Bus`] of an
//! [`IoBus`]. The CPU backends deliver every guest access through [`IoBus`] (it implements
//! `kvmbox_cpu::IoHandler`), so a device never knows which engine runs the guest.

pub mod bus;
pub mod control;
pub mod fw_cfg;
pub mod legacy;
pub mod testdev;

pub use bus::{Bus, BusDevice, BusError, IoBus};
pub use control::{ExitRequest, VmControl};
