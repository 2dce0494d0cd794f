//! kvmbox snapshot files.
//!
//! A snapshot is two files. The **state file** ([`write_state`], [`read_state`]) holds the
//! machine's state (any serde type; the VMM's) as
//!
//! ```text
//! offset  size  field
//!      0     8  magic "KVMBOXSN"
//!      8     4  format version (little-endian), FORMAT_VERSION
//!     12     4  reserved, 0
//!     16     8  payload length N (little-endian)
//!     24     N  payload: the state, serialized with postcard
//!   24+N     8  CRC-64/XZ of bytes 0..24+N (little-endian)
//! ```
//!
//! and is checked whole (size, magic, version, length, checksum, decoding) before anything
//! uses it, so a file from another version or a damaged one is refused with a message and
//! never half-restored. The **memory file** ([`write_memory`], [`map_memory`]) is guest RAM,
//! region after region in guest-address order: sparse (pages that are zero are not written),
//! and mapped privately on restore so pages load on demand.

mod memory;
mod state;

pub use memory::{
    map_memory, memory_size, merge_memory, write_memory, GuestMemoryMmap, PageFilter, PAGE_SIZE,
};
pub use state::{read_state, read_state_upgrading, write_state, FORMAT_VERSION, MAGIC};

/// The temporary file beside `path` that a file replaced whole is written to before it is
/// renamed over `path` (so a crash leaves the old file or the new one, and a process that
/// maps the old file keeps its pages).
fn temporary(path: &std::path::Path) -> std::path::PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    tmp.into()
}

/// What went wrong with a snapshot file. [`Error::is_user_error`] tells a bad file (the
/// caller's) from a host failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a kvmbox state file.
    #[error("{0}: not a kvmbox snapshot state file (bad magic)")]
    BadMagic(String),
    /// The file was written by another snapshot format version.
    #[error("{path}: snapshot format version {found}, this kvmbox reads version {expected}")]
    Version {
        /// The file.
        path: String,
        /// Version in the file.
        found: u32,
        /// Version this build reads.
        expected: u32,
    },
    /// The file is shorter or longer than its header says.
    #[error("{path}: truncated or padded state file ({size} bytes, the header says {expected})")]
    Length {
        /// The file.
        path: String,
        /// Its size.
        size: u64,
        /// The size the header implies.
        expected: u64,
    },
    /// The checksum does not match: the file is damaged.
    #[error("{0}: corrupted state file (CRC-64 mismatch)")]
    Checksum(String),
    /// The payload does not decode as a kvmbox machine state.
    #[error("{path}: cannot decode the state: {msg}")]
    Decode {
        /// The file.
        path: String,
        /// Why.
        msg: String,
    },
    /// The memory file is smaller than the VM's memory.
    #[error("{path}: memory file of {size} bytes is smaller than the VM's {needed} bytes of RAM")]
    MemoryTooSmall {
        /// The file.
        path: String,
        /// Its size.
        size: u64,
        /// Bytes the VM needs.
        needed: u64,
    },
    /// Mapping the memory file failed.
    #[error("{path}: cannot map guest memory from it: {msg}")]
    Map {
        /// The file.
        path: String,
        /// Why.
        msg: String,
    },
}

impl Error {
    /// True when the file given is at fault (missing, damaged, another version, too small);
    /// false for host failures.
    pub fn is_user_error(&self) -> bool {
        match self {
            Error::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::PermissionDenied
                    | std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::IsADirectory
                    | std::io::ErrorKind::InvalidInput
            ),
            Error::Map { .. } => false,
            _ => true,
        }
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}
