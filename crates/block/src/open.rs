//! Opening a disk: the one path from a [`DiskSpec`] to a backend (file, lock, format, chain).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

use crate::lock::{lock, unlock, Access};
use crate::qcow2::Header;
use crate::qcow2_read::Qcow2Reader;
use crate::{BlockBackend, DiskSpec, Error, Format, Qcow2Backend, RawBackend, Result};

/// Deepest backing chain kvmbox opens (the image itself not counted).
pub const MAX_CHAIN_DEPTH: usize = 64;

/// `BLKGETSIZE64` (`_IOR(0x12, 114, size_t)` in linux/fs.h; not in the libc crate): a block
/// device's size in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// The length of an image: a regular file's size, or a block device's (whose metadata says 0).
pub fn image_len(file: &File, path: &Path) -> Result<u64> {
    let md = file.metadata().map_err(Error::io("reading", path))?;
    if !md.file_type().is_block_device() {
        return Ok(md.len());
    }
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `size`.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if r < 0 {
        return Err(Error::io("reading the size of block device", path)(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(size)
}

/// Open an image file for reading (and writing if `writable`). Every image and backing file
/// kvmbox opens comes through here.
///
/// Only regular files and block devices: opening a FIFO (a backing file name in a hostile
/// image may point at one) would wait forever for a writer, so the open does not block, and
/// anything else is refused before it is read.
pub fn open_image_file(path: &Path, writable: bool) -> Result<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(Error::io("opening disk image", path))?;
    let t = file
        .metadata()
        .map_err(Error::io("reading", path))?
        .file_type();
    if !t.is_file() && !t.is_block_device() {
        return Err(Error::image(path, "not a regular file or a block device"));
    }
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL and F_SETFL on a descriptor we own; only O_NONBLOCK is cleared.
    let cleared = unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        fl >= 0 && libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK) >= 0
    };
    if !cleared {
        return Err(Error::io("opening disk image", path)(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(file)
}

/// The image format whose signature starts `head` (the first 512 bytes of a file), if any.
pub(crate) fn probe_bytes(head: &[u8]) -> Option<&'static str> {
    let at = |o: usize, m: &[u8]| head.get(o..o + m.len()) == Some(m);
    if at(0, b"QFI\xfb") {
        Some("qcow2")
    } else if at(0, b"KDMV") || at(0, b"# Disk DescriptorFile") {
        Some("vmdk")
    } else if at(0x40, &0xbeda_107fu32.to_le_bytes()) {
        Some("vdi")
    } else if at(0, b"vhdxfile") {
        Some("vhdx")
    } else if at(0, b"conectix") {
        Some("vpc")
    } else {
        None
    }
}

/// The signature of `file`'s format: its first 512 bytes, else a VHD footer at the end (fixed
/// VHDs have no header). None: raw.
pub(crate) fn probe_file(file: &File, path: &Path) -> Result<Option<&'static str>> {
    let mut head = [0u8; 512];
    let len = image_len(file, path)?;
    let n = (len as usize).min(head.len());
    file.read_exact_at(&mut head[..n], 0)
        .map_err(Error::io("reading the header of", path))?;
    if let Some(f) = probe_bytes(&head[..n]) {
        return Ok(Some(f));
    }
    if len >= 1024 {
        file.read_exact_at(&mut head, len - 512)
            .map_err(Error::io("reading the footer of", path))?;
        if probe_bytes(&head) == Some("vpc") {
            return Ok(Some("vpc"));
        }
    }
    Ok(None)
}

/// Detect the format of `file` from its signature: qcow2, else raw. Images of other formats
/// are refused (they are read-only, for `ro` disks and `kvmbox disk convert`), never served as
/// raw.
pub fn detect_format(file: &File, path: &Path) -> Result<Format> {
    match probe_file(file, path)? {
        None => Ok(Format::Raw),
        Some("qcow2") => Ok(Format::Qcow2),
        Some(other) => Err(Error::image(
            path,
            format!(
                "{other} images can only be opened read-only (ro) or converted with `kvmbox disk convert` (or give format=raw to serve its bytes as they are)"
            ),
        )),
    }
}

/// The files of one backing chain: their identities (to catch loops), depth and locking.
pub(crate) struct ChainGuard {
    seen: Vec<(u64, u64)>,
    lock: bool,
}

fn identity(file: &File, path: &Path) -> Result<(u64, u64)> {
    let md = file.metadata().map_err(Error::io("reading", path))?;
    Ok((md.dev(), md.ino()))
}

impl ChainGuard {
    /// Start a chain at the top image `file`.
    pub(crate) fn new(file: &File, path: &Path, lock: bool) -> Result<Self> {
        Ok(Self {
            seen: vec![identity(file, path)?],
            lock,
        })
    }

    /// Add the backing file `file`: check depth and loops, lock it for reading.
    pub(crate) fn enter(&mut self, file: &File, path: &Path) -> Result<()> {
        if self.seen.len() > MAX_CHAIN_DEPTH {
            return Err(Error::image(
                path,
                format!("backing chain deeper than {MAX_CHAIN_DEPTH} images"),
            ));
        }
        let id = identity(file, path)?;
        if self.seen.contains(&id) {
            return Err(Error::image(
                path,
                "backing file loop: this file is already in the chain",
            ));
        }
        self.seen.push(id);
        if self.lock {
            lock(file, path, Access::Read)?;
        }
        Ok(())
    }
}

/// Open the disk `spec` names: the file (read-only for `ro`), its lock, its format (from the
/// spec, else detected once here), and for qcow2 the backing chain.
pub fn open(spec: &DiskSpec) -> Result<Arc<dyn BlockBackend>> {
    let path = &spec.path;
    let file = open_image_file(path, !spec.read_only)?;
    if !spec.lock {
        return open_file(spec, file);
    }
    let access = if spec.read_only {
        Access::Read
    } else {
        Access::Write
    };
    lock(&file, path, access)?;
    // A copy of the descriptor (the same open file), to release the locks at once when the
    // image turns out unusable: closing it alone leaves them while a child another thread is
    // starting holds its copy (`lock::unlock`), and a reopen right after would be refused.
    let held = file
        .try_clone()
        .map_err(Error::io("duplicating the descriptor of disk image", path))?;
    let opened = open_file(spec, file);
    if opened.is_err() {
        unlock(&held);
    }
    opened
}

/// `open` past the lock: the format (from the spec, else detected once here), and for qcow2
/// the backing chain.
fn open_file(spec: &DiskSpec, file: File) -> Result<Arc<dyn BlockBackend>> {
    let path = &spec.path;
    let (format, probed) = match spec.format {
        Some(f) => (f, false),
        None => match probe_file(&file, path)? {
            Some(other @ ("vdi" | "vmdk" | "vpc" | "vhdx")) if spec.read_only => {
                return crate::foreign::open(other, file, path);
            }
            _ => (detect_format(&file, path)?, true),
        },
    };
    Ok(match format {
        Format::Raw => {
            let size = image_len(&file, path)?;
            Arc::new(RawBackend::new(file, size, spec.read_only, probed))
        }
        // Read-only images imago refuses (zstd, dirty, corrupt) are read by kvmbox's reader.
        Format::Qcow2
            if spec.read_only && crate::qcow2_read::needed(&Header::read(&file, path)?) =>
        {
            Arc::new(Qcow2Reader::open(file, path, spec.lock)?)
        }
        Format::Qcow2 => Arc::new(Qcow2Backend::open(file, path, spec.read_only, spec.lock)?),
    })
}
