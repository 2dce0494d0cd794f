//! Free-space checks before the store writes disk images (clones, snapshots), so that a
//! filesystem that cannot hold the result is refused up front with [`Error::NoSpace`], naming
//! what is needed and what is free, instead of failing half-way with ENOSPC.
//!
//! The needs are upper bounds from the images' headers and sizes (kvmbox-block's `info`), never
//! guesses from a dry run: copying a disk's state into a new qcow2 image writes at most its
//! data (no more than the virtual size, nor than what its layers have allocated) plus that
//! image's tables; a qcow2 metadata change (snapshot take or restore) writes a new L1 table,
//! snapshot table and refcount structure after the end of the file.

use crate::{Error, Result};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Bytes one step will write into the filesystem of `dir`.
#[derive(Debug, Clone)]
pub(crate) struct Need {
    /// A folder on the filesystem written to.
    pub dir: PathBuf,
    /// How many bytes at most.
    pub bytes: u64,
    /// What for, for the message.
    pub what: String,
}

/// `n` bytes for people: `17.0 MiB (17825792 bytes)`.
pub(crate) fn human(n: u64) -> String {
    const MIB: f64 = (1u64 << 20) as f64;
    const GIB: f64 = (1u64 << 30) as f64;
    let n_f = n as f64;
    if n_f >= GIB {
        format!("{:.1} GiB ({n} bytes)", n_f / GIB)
    } else {
        format!("{:.1} MiB ({n} bytes)", n_f / MIB)
    }
}

/// Bytes an unprivileged process may still write to the filesystem of `dir`.
fn free_bytes(dir: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| Error::Usage(format!("{}: a path with a NUL byte", dir.display())))?;
    // SAFETY: statvfs is plain data, so all zeroes is a valid value to be overwritten.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid statvfs for the kernel to fill.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(Error::Failed(format!(
            "finding the free space of {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Refuse with [`Error::NoSpace`] when the needs on one filesystem add up to more than it has
/// free.
pub(crate) fn check(needs: &[Need]) -> Result<()> {
    let mut by_fs: Vec<(u64, &Path, u64, Vec<&str>)> = Vec::new();
    for n in needs {
        let dev = std::fs::metadata(&n.dir)
            .map_err(|e| Error::Failed(format!("reading {}: {e}", n.dir.display())))?
            .dev();
        match by_fs.iter_mut().find(|f| f.0 == dev) {
            Some(f) => {
                f.2 = f.2.saturating_add(n.bytes);
                f.3.push(&n.what);
            }
            None => by_fs.push((dev, &n.dir, n.bytes, vec![&n.what])),
        }
    }
    for (_, dir, bytes, whats) in by_fs {
        let free = free_bytes(dir)?;
        if free < bytes {
            return Err(Error::NoSpace(format!(
                "not enough free space on the filesystem of {}: up to {} is needed ({}), {} is free; nothing was changed",
                dir.display(),
                human(bytes),
                whats.join(", "),
                human(free)
            )));
        }
    }
    Ok(())
}

/// The layers of `disk`, or an error naming it.
fn layers(disk: &Path) -> Result<Vec<kvmbox_block::image::LayerInfo>> {
    kvmbox_block::image::info(disk)
        .map_err(|e| Error::Failed(format!("reading {}: {e}", disk.display())))
}

/// At most how many bytes a new standalone qcow2 image of `disk`'s state takes: its data
/// (no more than the virtual size, nor than all its layers' allocated bytes) and the new
/// image's tables (an L2 entry and a refcount per 64 KiB cluster, the header, L1 and
/// refcount table: 1 MiB covers them with room).
pub(crate) fn flatten_bytes(disk: &Path) -> Result<u64> {
    let l = layers(disk)?;
    let virtual_size = l.first().map_or(0, |l| l.virtual_size);
    let allocated: u64 = l.iter().map(|l| l.allocated_bytes).sum();
    Ok(virtual_size.min(allocated) + virtual_size / 4096 + (1 << 20))
}

/// At most how many bytes one qcow2 metadata change of `disk` (a snapshot taken or
/// restored) appends to it: a new L1 table, the snapshot table and a new refcount structure
/// for every cluster of the file (counted at 64 bits a refcount, the widest), each rounded
/// up to clusters, and a few clusters more.
pub(crate) fn metadata_change_bytes(disk: &Path) -> Result<u64> {
    let l = layers(disk)?;
    let top = l
        .first()
        .ok_or_else(|| Error::Failed(format!("reading {}: no layers", disk.display())))?;
    let cs = top.cluster_size.unwrap_or(64 << 10).max(512);
    let file_len = std::fs::metadata(disk)
        .map_err(|e| Error::Failed(format!("reading {}: {e}", disk.display())))?
        .len();
    let l1_bytes = top.virtual_size.div_ceil(cs * (cs / 8)) * 8;
    let clusters = file_len.div_ceil(cs) + l1_bytes.div_ceil(cs) + 8;
    let refcounts = (clusters * 8).div_ceil(cs) + 1;
    Ok((l1_bytes.div_ceil(cs) + refcounts + 4) * cs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_on_one_filesystem_add_up_and_are_refused_naming_both_figures() {
        let dir = std::env::temp_dir();
        let free = free_bytes(&dir).unwrap();
        assert!(free > 0);
        let need = |bytes: u64, what: &str| Need {
            dir: dir.clone(),
            bytes,
            what: what.into(),
        };
        check(&[need(1, "a"), need(1, "b")]).unwrap();
        // Each fits on its own; together they do not.
        let e = check(&[
            need(free / 2 + 1, "the copy"),
            need(free / 2 + 1, "the image"),
        ])
        .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::NoSpace(_)), "{msg}");
        assert!(
            msg.contains("is needed (the copy, the image)")
                && msg.contains(" is free")
                && msg.contains(&dir.display().to_string()),
            "{msg}"
        );
        assert_eq!(human(3 << 20), "3.0 MiB (3145728 bytes)");
    }
}
