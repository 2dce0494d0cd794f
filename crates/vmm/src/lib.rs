//! The kvmbox virtual machine monitor: builds a VM from a [`VmConfig`] (guest memory, a CPU
//! backend, devices on the bus, the kernel and firmware tables) and runs it until the guest
//! powers off, resets or exits through the debug port.

pub mod config;
pub mod console;
mod controller;
mod exit;
mod firmware;
pub mod limits;
pub mod machine;
pub mod signals;
pub mod snapshot;
pub mod state;
pub mod vcpu;
mod vm;

pub use config::{AccelChoice, ConfigError, CpuModel, FileConfig, OnReboot, Overrides, VmConfig};
pub use controller::{run, run_restored, run_with_api, Ended};
pub use limits::{Affinity, Limits};
pub use state::VmState;
pub use vm::{Error, IrqPlatform, Platform};

/// Exit status when the guest powered off (ACPI S5) or the user quit with `Ctrl-A x`.
pub const EXIT_POWEROFF: i32 = 0;
/// Exit status for bad input: flags, config files, kernel images; nothing ran.
pub const EXIT_USAGE: i32 = 2;
/// Exit status when the guest reset (reboot, triple fault) and `--on-reboot exit` is in force.
pub const EXIT_REBOOT: i32 = 4;
/// Exit status when the VM stopped on an error (a vCPU failed, every vCPU halted for good).
pub const EXIT_ERROR: i32 = 6;
/// Exit status when a stop signal (SIGTERM, SIGINT, SIGHUP, SIGQUIT) ended the VM. Even, so it
/// never collides with a debug-exit status; stderr names the signal.
pub const EXIT_SIGNAL: i32 = 8;
