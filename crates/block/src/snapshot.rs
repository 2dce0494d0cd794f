//! qcow2 internal snapshots (`kvmbox disk snapshot`), in QEMU's on-disk format so
//! `qemu-img snapshot` and kvmbox read each other's. Every change goes through
//! [`meta::commit`](crate::meta::commit): new tables are written after the end of the file,
//! then one header write switches to them.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::lock::{lock_for_tool, Access};
use crate::meta::{alloc, commit, Image, Snapshot, State, MAX_SNAPSHOTS};
use crate::open::{detect_format, open_image_file};
use crate::{Error, Format, Result};

const COPIED: u64 = 1 << 63;

/// Open `path` as a qcow2 image for snapshot work, locked for `access`, refusing a dirty
/// (unless repairing it is allowed) or corrupt image.
fn with_image<T>(
    path: &Path,
    access: Access,
    f: impl FnOnce(&mut Image<'_>) -> Result<T>,
) -> Result<T> {
    let writable = access == Access::Write;
    let file = open_image_file(path, writable)?;
    let _lock = lock_for_tool(&file, path, access)?;
    if detect_format(&file, path)? != Format::Qcow2 {
        return Err(Error::image(path, "snapshots need a qcow2 image"));
    }
    let mut img = Image::load(&file, path)?;
    if img.h.corrupt() {
        return Err(Error::image(
            path,
            "the corrupt bit is set; check it with `kvmbox disk check`",
        ));
    }
    if img.h.dirty() && writable {
        // As QEMU does when it opens a dirty image read-write: rebuild the refcounts first.
        let report = crate::meta::repair(&mut img, &mut |_, _| {})?;
        if !report.repairable {
            return Err(Error::image(
                path,
                "the dirty image has damaged tables; see `kvmbox disk check`",
            ));
        }
    }
    f(&mut img)
}

/// The snapshots of the image at `path`.
pub fn list(path: &Path) -> Result<Vec<Snapshot>> {
    with_image(path, Access::Read, |img| Ok(img.snapshots()?.0))
}

/// The names of the snapshots of the qcow2 image at `path`, read without taking its lock (as
/// [`crate::image::info`] reads headers), so it works on an image a running VM uses. A VM
/// process changes its images' snapshot tables only by writing a new table and then the
/// header ([`crate::Qcow2Backend::snapshot_create`]), so this sees the old table or the new
/// one; the caller makes sure no such change runs meanwhile where it matters.
pub fn names_unlocked(path: &Path) -> Result<Vec<String>> {
    let file = open_image_file(path, false)?;
    if detect_format(&file, path)? != Format::Qcow2 {
        return Err(Error::image(path, "snapshots need a qcow2 image"));
    }
    let img = Image::load(&file, path)?;
    Ok(img.snapshots()?.0.into_iter().map(|s| s.name).collect())
}

fn find(st: &State, name: &str, path: &Path) -> Result<usize> {
    st.snapshots
        .iter()
        .position(|(s, _)| s.name == name)
        .or_else(|| st.snapshots.iter().position(|(s, _)| s.id == name))
        .ok_or_else(|| Error::image(path, format!("no snapshot named '{name}'")))
}

/// Write the snapshot table of `st` after the end of the file; record it in `st`.
fn place_table(st: &mut State, next: &mut u64, bits: u32, new: &mut Vec<(u64, Vec<u8>)>) {
    if st.snapshots.is_empty() {
        st.snapshot_table = (0, 0);
        return;
    }
    let mut t = Vec::new();
    for (s, _) in &st.snapshots {
        s.encode_into(&mut t);
    }
    let off = alloc(next, t.len() as u64, bits);
    st.snapshot_table = (off, t.len() as u64);
    new.push((off, t));
}

/// Take a snapshot named `name` of the image's current contents.
pub fn create(path: &Path, name: &str) -> Result<()> {
    check_name(path, name)?;
    with_image(path, Access::Write, |img| create_in(img, name))
}

fn check_name(path: &Path, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 255 {
        return Err(Error::image(path, "a snapshot name must be 1 to 255 bytes"));
    }
    Ok(())
}

/// Take snapshot `name` in `img` (the image's file, opened and checked by the caller: the
/// tool's [`with_image`] or an open [`Qcow2Backend`](crate::Qcow2Backend)).
pub(crate) fn create_in(img: &mut Image<'_>, name: &str) -> Result<()> {
    let path = img.path.clone();
    let path = path.as_path();
    check_name(path, name)?;
    let mut st = img.state()?;
    if st
        .snapshots
        .iter()
        .any(|(s, _)| s.name == name || s.id == name)
    {
        return Err(Error::image(
            path,
            format!("a snapshot named '{name}' exists"),
        ));
    }
    if st.snapshots.len() >= MAX_SNAPSHOTS {
        return Err(Error::image(path, "too many snapshots"));
    }
    let bits = img.h.cluster_bits;
    let mut next = img.end_cluster();
    let mut new = Vec::new();
    // The snapshot's L1 table: a copy of the active one, without COPIED flags (its
    // clusters are now shared).
    let l1: Vec<u64> = st.l1.iter().map(|e| e & !COPIED).collect();
    let l1_offset = if l1.is_empty() {
        0
    } else {
        let b: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        let off = alloc(&mut next, b.len() as u64, bits);
        new.push((off, b));
        off
    };
    let id = st
        .snapshots
        .iter()
        .filter_map(|(s, _)| s.id.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // QEMU's extra data: 64-bit VM state size, disk size, icount (-1: none).
    let mut extra = Vec::with_capacity(24);
    extra.extend(0u64.to_be_bytes());
    extra.extend(st.size.to_be_bytes());
    extra.extend(u64::MAX.to_be_bytes());
    let snap = Snapshot {
        id: id.to_string(),
        name: name.to_string(),
        l1_offset,
        l1_size: l1.len() as u32,
        date_sec: now.as_secs() as u32,
        date_nsec: now.subsec_nanos(),
        vm_clock_nsec: 0,
        vm_state_size: 0,
        extra,
    };
    st.snapshots.push((snap, l1));
    place_table(&mut st, &mut next, bits, &mut new);
    // The active tables keep their clusters; commit clears their COPIED flags (the
    // clusters' refcounts are now 2), so the next write to one copies it first.
    commit(img, &st, &new, next)
}

/// Make the image's contents those of snapshot `name` (a name or an ID); the current
/// contents are dropped, the snapshot stays.
pub fn apply(path: &Path, name: &str) -> Result<()> {
    with_image(path, Access::Write, |img| {
        let mut st = img.state()?;
        let i = find(&st, name, path)?;
        let (snap, l1) = st.snapshots[i].clone();
        let size = snap.disk_size().unwrap_or(st.size);
        let cs = img.h.cluster_size();
        let needed = size.div_ceil(cs * (cs / 8)) as usize;
        let mut l1: Vec<u64> = l1.iter().map(|e| e & !COPIED).collect();
        if l1.len() < needed {
            l1.resize(needed, 0);
        }
        let mut next = img.end_cluster();
        st.l1_offset = if l1.is_empty() {
            0
        } else {
            alloc(&mut next, l1.len() as u64 * 8, img.h.cluster_bits)
        };
        st.l1 = l1;
        st.size = size;
        commit(img, &st, &[], next)
    })
}

/// Delete snapshot `name` (a name or an ID), freeing the clusters only it used.
pub fn delete(path: &Path, name: &str) -> Result<()> {
    with_image(path, Access::Write, |img| delete_in(img, name))
}

/// Delete snapshot `name` in `img` (see [`create_in`]).
pub(crate) fn delete_in(img: &mut Image<'_>, name: &str) -> Result<()> {
    let mut st = img.state()?;
    let i = find(&st, name, &img.path)?;
    st.snapshots.remove(i);
    let mut next = img.end_cluster();
    let mut new = Vec::new();
    place_table(&mut st, &mut next, img.h.cluster_bits, &mut new);
    commit(img, &st, &new, next)
}
