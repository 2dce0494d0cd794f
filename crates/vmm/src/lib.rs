//! The kvmbox virtual machine monitor.
