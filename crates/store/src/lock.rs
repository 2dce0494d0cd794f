//! `flock(2)` locks: a VM's command lock and the probe of its keeper's lock. An flock belongs to
//! the open file description, so the kernel drops it when the holder dies, however it dies:
//! a lock never outlives a crashed command.

use crate::{io_err, Error, Result};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;

/// A VM's command lock, held until dropped.
#[derive(Debug)]
pub struct VmLock {
    _file: File,
}

fn open(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
}

/// Try `op | LOCK_NB` on `file`: Ok(true) when taken, Ok(false) when someone else holds it.
fn try_flock(file: &File, op: libc::c_int) -> std::io::Result<bool> {
    loop {
        // SAFETY: flock on a descriptor `file` owns; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

/// Open (creating it) the lock file at `path` and take its exclusive lock, waiting for it;
/// held until the file is dropped.
pub(crate) fn lock_wait(path: &Path) -> Result<File> {
    let file = open(path).map_err(|e| io_err(format_args!("opening {}", path.display()), e))?;
    flock_wait(&file, libc::LOCK_EX)
        .map_err(|e| io_err(format_args!("locking {}", path.display()), e))?;
    Ok(file)
}

/// Take `op` on `file`, waiting for it.
fn flock_wait(file: &File, op: libc::c_int) -> std::io::Result<()> {
    loop {
        // SAFETY: flock on a descriptor `file` owns; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

impl VmLock {
    /// Take the lock at `path` for `command` on VM `name`, or fail at once with
    /// [`Error::Busy`].
    pub(crate) fn take(path: &Path, name: &str, command: &str) -> Result<Self> {
        let file = open(path).map_err(|e| match e.kind() {
            // Deleted since it was looked up.
            std::io::ErrorKind::NotFound => Error::NotFound(name.to_string()),
            _ => io_err(format_args!("opening {}", path.display()), e),
        })?;
        match try_flock(&file, libc::LOCK_EX) {
            Ok(true) => Ok(Self { _file: file }),
            Ok(false) => Err(Error::Busy(format!(
                "VM '{name}' is busy: another kvmbox command is working on it (try `{command}` again when it is done)"
            ))),
            Err(e) => Err(io_err(format_args!("locking {}", path.display()), e)),
        }
    }
}

/// Whether another open file description holds an flock on `path` (a missing file: no).
pub(crate) fn held_by_other(path: &Path) -> bool {
    let Ok(file) = OpenOptions::new().read(true).open(path) else {
        return false;
    };
    // A shared probe conflicts only with the keeper's exclusive lock; it is dropped at once.
    !matches!(try_flock(&file, libc::LOCK_SH), Ok(true))
}
