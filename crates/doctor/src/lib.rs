//! kvmbox host checks: can this machine run VMs, and which accelerator fits.
