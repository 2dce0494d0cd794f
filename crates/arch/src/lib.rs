//! The x86-64 PC a kvmbox guest sees: where things live in guest-physical memory
//! ([`layout`]), how guest RAM is laid out ([`guest_memory`], [`e820_table`]), how a kernel is
//! loaded and started ([`load`]), and the firmware tables it finds ([`create_acpi_tables`],
//! [`setup_mptable`]).
//!
//! A VMM boots a guest with:
//! ```no_run
//! # fn main() -> Result<(), kvmbox_arch::Error> {
//! let mem = kvmbox_arch::guest_memory(256 << 20)?;
//! let rsdp = kvmbox_arch::create_acpi_tables(&mem, 2)?;
//! let mut p = kvmbox_arch::LoadParams::new(std::path::Path::new("vmlinuz"), "console=ttyS0", 256 << 20);
//! p.cpus = 2;
//! p.rsdp = Some(rsdp);
//! let boot = kvmbox_arch::load(&mem, &p)?;
//! // set boot.regs / boot.sregs on vCPU 0, start it.
//! # let _ = boot; Ok(()) }
//! ```

mod acpi;
pub mod bios;
mod boot_cpu;
pub mod fuzzing;
pub mod layout;
mod loader;
mod memory;
mod mptable;
pub mod multiboot;
mod vmlinux;

pub use acpi::{
    create_acpi_tables, create_acpi_tables_with, facs_address, AcpiConfig, McfgEntry,
    PciHostBridge, PciIntx,
};
pub use loader::{load, BootSetup, EntryKind, LoadParams};
pub use memory::{e820_table, guest_memory, ByteSize, E820Entry, E820_RAM, E820_RESERVED};
pub use mptable::{setup_mptable, MAX_CPUS};
pub use vmlinux::extract_vmlinux;

use std::path::PathBuf;

/// Everything that can go wrong while building a guest's memory, loading its kernel or writing
/// its firmware tables. Each message is one line naming the problem and the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel image cannot be opened or read, or is not something we can boot.
    #[error("kernel image {}: {msg}", path.display())]
    Kernel {
        /// The kernel image.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// The guest does not have room for the kernel's decompressed image (`init_size`).
    #[error(
        "kernel image {}: kernel needs {needed_mib} MiB from its load address (init_size) \
         but the guest has {guest_mib} MiB",
        path.display()
    )]
    KernelTooBig {
        /// The kernel image.
        path: PathBuf,
        /// Guest RAM the kernel needs: load address + init_size, rounded up to MiB.
        needed_mib: u64,
        /// Guest RAM there is.
        guest_mib: u64,
    },
    /// An ELF program header asks for memory that is not guest RAM above 1 MiB.
    #[error(
        "kernel image {}: ELF segment {start:#x}..{end:#x} is outside guest RAM above 1 MiB",
        path.display()
    )]
    SegmentOutsideRam {
        /// The kernel image.
        path: PathBuf,
        /// First guest-physical byte of the segment.
        start: u64,
        /// End (exclusive) of the segment.
        end: u64,
    },
    /// The initrd cannot be opened or read.
    #[error("initrd {}: {msg}", path.display())]
    Initrd {
        /// The initrd.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The initrd does not fit in guest RAM next to the kernel.
    #[error(
        "initrd {} is {size} bytes but at most {room} bytes of guest RAM below {limit:#x} are \
         free next to the kernel",
        path.display()
    )]
    InitrdTooLarge {
        /// The initrd.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The largest free range for it.
        room: u64,
        /// The highest address the initrd may end at.
        limit: u64,
    },
    /// The command line is longer than the kernel accepts.
    #[error("kernel command line is {len} bytes but the kernel accepts at most {max}")]
    CmdlineTooLong {
        /// Command-line length in bytes.
        len: usize,
        /// The kernel's `cmdline_size` (or kvmbox's limit).
        max: usize,
    },
    /// The command line contains a NUL byte.
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    /// Guest memory cannot be created, or does not match the requested size.
    #[error("guest memory of {size}: {msg}")]
    GuestMemory {
        /// Requested size.
        size: ByteSize,
        /// What is wrong.
        msg: String,
    },
    /// A write into guest memory failed (the address is not guest RAM).
    #[error("cannot write {what} to guest memory at {addr:#x}")]
    GuestWrite {
        /// What was being written.
        what: &'static str,
        /// Where.
        addr: u64,
    },
    /// The vCPU count cannot be described to the guest.
    #[error("{cpus} vCPUs: {msg}")]
    Cpus {
        /// Requested vCPUs.
        cpus: u32,
        /// Why that does not work.
        msg: &'static str,
    },
    /// A PCI host bridge's BAR memory window is empty or does not end at or below 4 GiB.
    #[error("PCI memory window of {size:#x} bytes at {start:#x} is empty or not below 4 GiB")]
    PciWindow {
        /// Start of the window.
        start: u64,
        /// Its size.
        size: u64,
    },
    /// Firmware tables do not fit in their area.
    #[error("{what} need {size} bytes at {start:#x} but must end by {end:#x}")]
    TablesTooLarge {
        /// Which tables.
        what: &'static str,
        /// Bytes needed.
        size: u64,
        /// Where they start.
        start: u64,
        /// Where their area ends.
        end: u64,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// `io::Error` as a message without the " (os error N)" suffix: "No such file or directory".
pub(crate) fn io_msg(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Helpers for this crate's unit tests.
#[cfg(test)]
pub(crate) mod test_util {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A file in the temp directory, removed on drop.
    pub(crate) struct TempFile(pub(crate) PathBuf);

    impl TempFile {
        pub(crate) fn new(data: &[u8]) -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "kvmbox-arch-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&p, data).unwrap();
            TempFile(p)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}
