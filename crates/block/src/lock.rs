//! Image locking in QEMU's scheme, so kvmbox and QEMU exclude each other.
//!
//! QEMU (`block/file-posix.c`, `raw_apply_lock_bytes` / `raw_check_lock_bytes`) takes shared
//! open-file-description (OFD) `fcntl` locks on single bytes of the image file: byte
//! `100 + i` while it uses permission `i`, byte `200 + i` while it does not let others use
//! permission `i`. Permissions: 0 consistent read, 1 write, 2 write-unchanged, 3 resize.
//! Before using a permission it checks nobody locks the matching "not shared" byte, and before
//! refusing to share one that nobody uses it. kvmbox does the same:
//! - a writer uses {read, write, write-unchanged, resize} and shares only {read,
//!   write-unchanged};
//! - a reader (`ro` disks, backing files, `kvmbox disk info`) uses {read} and does not share
//!   {write, resize}, like QEMU's read-only devices and `qemu-img info`.
//!
//! So readers coexist, and a writer excludes every other writer and reader. OFD locks belong
//! to the open file: they last exactly as long as the image stays open, and closing another
//! descriptor of the same file does not drop them.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::{Error, Result};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const PERM_READ: u32 = 1 << 0;
const PERM_WRITE: u32 = 1 << 1;
const PERM_WRITE_UNCHANGED: u32 = 1 << 2;
const PERM_RESIZE: u32 = 1 << 3;
const PERM_COUNT: u32 = 4;

/// How an image is about to be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read only; other readers welcome, writers not.
    Read,
    /// Read and write; nobody else may write or read.
    Write,
}

impl Access {
    fn perms(self) -> (u32, u32) {
        let all = PERM_READ | PERM_WRITE | PERM_WRITE_UNCHANGED | PERM_RESIZE;
        let shared = PERM_READ | PERM_WRITE_UNCHANGED;
        match self {
            Access::Read => (PERM_READ, all & !shared),
            Access::Write => (all, all & !shared),
        }
    }
}

fn perm_name(bit: u32) -> &'static str {
    ["consistent read", "write", "write unchanged", "resize"][bit as usize]
}

fn flock(start: i64, kind: libc::c_int) -> libc::flock {
    // SAFETY: flock is plain integers; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = 1;
    fl
}

/// Lock `file` (the image at `path`) for `access`, or explain who is in the way.
pub fn lock(file: &File, path: &Path, access: Access) -> Result<()> {
    let fd = file.as_raw_fd();
    let (perm, unshared) = access.perms();
    let conflict = |byte: i64, problem: String| Error::Locked {
        path: path.to_path_buf(),
        holder: holder_pid(file, byte),
        problem,
    };
    for bit in 0..PERM_COUNT {
        for (set, base) in [(perm, PERM_BASE), (unshared, SHARED_BASE)] {
            if set & (1 << bit) == 0 {
                continue;
            }
            let fl = flock(base + i64::from(bit), libc::F_RDLCK);
            // SAFETY: F_OFD_SETLK with a valid flock struct on our own descriptor.
            if unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl) } != 0 {
                let e = std::io::Error::last_os_error();
                if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
                    return Err(conflict(
                        base + i64::from(bit),
                        format!("cannot take the {} lock", perm_name(bit)),
                    ));
                }
                return Err(Error::io("locking disk image", path)(e));
            }
        }
    }
    for bit in 0..PERM_COUNT {
        // Someone refuses to share what we use, or uses what we refuse to share.
        for (set, other_base, problem) in [
            (perm, SHARED_BASE, "another process does not share"),
            (unshared, PERM_BASE, "another process has"),
        ] {
            if set & (1 << bit) == 0 {
                continue;
            }
            let byte = other_base + i64::from(bit);
            let mut fl = flock(byte, libc::F_WRLCK);
            // SAFETY: F_OFD_GETLK with a valid flock struct on our own descriptor.
            if unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut fl) } != 0 {
                return Err(Error::io("testing the lock of disk image", path)(
                    std::io::Error::last_os_error(),
                ));
            }
            if i32::from(fl.l_type) != libc::F_UNLCK {
                return Err(conflict(
                    byte,
                    format!("{problem} {} access", perm_name(bit)),
                ));
            }
        }
    }
    Ok(())
}

/// Release every lock this open file holds on its image, now. An OFD lock otherwise lasts
/// until the last descriptor of the open file is closed, and a child that another thread is
/// starting holds a copy of every descriptor until it executes its program (the descriptors
/// are close-on-exec): closing the image alone could leave it locked for that moment, and a
/// process reopening it at once would be refused.
pub(crate) fn unlock(file: &File) {
    let mut fl = flock(PERM_BASE, libc::F_UNLCK);
    fl.l_len = SHARED_BASE + i64::from(PERM_COUNT) - PERM_BASE;
    // SAFETY: F_OFD_SETLK with a valid flock struct on our own descriptor; unlocking bytes
    // this open file does not lock changes nothing.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
}

/// The process holding a lock on `byte` of `file`. OFD locks show no owner (`fcntl` and
/// /proc/locks say -1), so look, as `lslocks` does, for the descriptor that holds it in
/// /proc/PID/fdinfo, whose `lock:` lines name the file as "major:minor:inode start end".
fn holder_pid(file: &File, byte: i64) -> Option<i32> {
    let md = file.metadata().ok()?;
    let (maj, min) = (libc::major(md.dev()), libc::minor(md.dev()));
    let id = format!("{maj:02x}:{min:02x}:{}", md.ino());
    let me = std::process::id() as i32;
    let holds = |text: &str| {
        text.lines().filter(|l| l.starts_with("lock:")).any(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let Some(i) = f.iter().position(|x| *x == id) else {
                return false;
            };
            let start: i64 = f
                .get(i + 1)
                .and_then(|x| x.parse().ok())
                .unwrap_or(i64::MAX);
            let end: i64 = f
                .get(i + 2)
                .and_then(|x| x.parse().ok())
                .unwrap_or(i64::MAX);
            start <= byte && byte <= end
        })
    };
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|p| {
        let pid: i32 = p.file_name().to_str()?.parse().ok()?;
        if pid == me {
            return None;
        }
        let fds = std::fs::read_dir(p.path().join("fdinfo")).ok()?;
        fds.flatten()
            .any(|fd| std::fs::read_to_string(fd.path()).is_ok_and(|t| holds(&t)))
            .then_some(pid)
    })
}

/// The locks a `kvmbox disk` command holds on an image: released when this is dropped (see
/// [`unlock`]), through a duplicate of the image's descriptor (the same open file).
pub(crate) struct ToolLock(File);

impl Drop for ToolLock {
    fn drop(&mut self) {
        unlock(&self.0);
    }
}

/// [`lock`] for `kvmbox disk` commands: the same locks, held until the returned guard is
/// dropped, and an error that does not suggest `lock=off` (which only `--disk` takes).
pub(crate) fn lock_for_tool(file: &File, path: &Path, access: Access) -> Result<ToolLock> {
    lock(file, path, access).map_err(|e| match e {
        Error::Locked {
            path,
            holder,
            problem,
        } => Error::image(
            &path,
            format!(
                "in use{}: {problem}; stop it first",
                holder
                    .map(|p| format!(" by process {p}"))
                    .unwrap_or_default()
            ),
        ),
        e => e,
    })?;
    let same_file = file
        .try_clone()
        .map_err(Error::io("duplicating the descriptor of", path))?;
    Ok(ToolLock(same_file))
}
