//! Image operations behind `kvmbox disk`: create, info, convert, resize.

use std::fs::OpenOptions;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use imago::qcow2::Qcow2;
use imago::{FormatCreateBuilder, StorageOpenOptions};

use crate::open::{detect_format, open_image_file};
use crate::qcow2::{resolve_backing, Header};
use crate::{open, BlockBackend, DiskSpec, Error, Format, Result, MAX_CHAIN_DEPTH};

/// A virtual size kvmbox can create: whole sectors, within qcow2's limit.
fn check_size(path: &Path, size: u64) -> Result<()> {
    if !size.is_multiple_of(512) {
        return Err(Error::image(
            path,
            format!("size {size} is not a multiple of 512"),
        ));
    }
    if size > crate::qcow2::MAX_SIZE {
        return Err(Error::image(path, format!("size {size} is too large")));
    }
    Ok(())
}

/// Create an image of `size` bytes at `path` (which must not exist). `backing` (qcow2 only)
/// is stored as given, so a relative name is relative to the new image's directory, as in QEMU.
pub fn create(path: &Path, size: u64, format: Format, backing: Option<&str>) -> Result<()> {
    check_size(path, size)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(Error::io("creating disk image", path))?;
    match (format, backing) {
        (Format::Raw, Some(_)) => Err(Error::image(path, "raw images cannot have a backing file")),
        (Format::Raw, None) => file.set_len(size).map_err(Error::io("sizing", path)),
        (Format::Qcow2, backing) => {
            let mut size = size;
            let mut builder = None;
            if let Some(b) = backing {
                // The backing image must open (format known, chain sane); its size is the default.
                let bpath = resolve_backing(path, b);
                let spec = DiskSpec {
                    read_only: true,
                    ..DiskSpec::new(&bpath)
                };
                let base = open(&spec)?;
                let bfile = open_image_file(&bpath, false)?;
                let bformat = detect_format(&bfile, &bpath)?;
                if size == 0 {
                    size = base.size();
                }
                builder = Some((b.to_string(), bformat.to_string()));
            }
            let storage = imago::file::File::from_open_file(
                file,
                StorageOpenOptions::new().filename(path).write(true),
            )
            .map_err(Error::io("creating disk image", path))?;
            let mut c = Qcow2::<imago::file::File>::create_builder(storage).size(size);
            if let Some((name, fmt)) = builder {
                c = c.backing(name, fmt);
            }
            c.create().map_err(|e| Error::image(path, e.to_string()))
        }
    }
}

/// What `kvmbox disk info` shows about one image of a chain.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerInfo {
    /// The file.
    pub path: PathBuf,
    /// "raw" or "qcow2".
    pub format: String,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Bytes the file occupies on the host (allocated blocks).
    pub allocated_bytes: u64,
    /// qcow2: cluster size in bytes.
    pub cluster_size: Option<u64>,
    /// qcow2: version (2 or 3).
    pub qcow2_version: Option<u32>,
    /// qcow2: backing file name as stored in the image.
    pub backing_file: Option<String>,
    /// qcow2: backing file format as stored.
    pub backing_format: Option<String>,
    /// qcow2: the dirty bit (refcounts may be stale).
    pub dirty: bool,
    /// qcow2: the corrupt bit.
    pub corrupt: bool,
    /// qcow2: lazy refcounts allowed.
    pub lazy_refcounts: bool,
    /// qcow2: number of internal snapshots.
    pub snapshots: u32,
}

impl LayerInfo {
    /// A file's facts before its format is known: its size is the virtual size.
    fn plain(path: &Path, md: &std::fs::Metadata, len: u64) -> Self {
        Self {
            path: path.to_path_buf(),
            format: "raw".into(),
            virtual_size: len,
            allocated_bytes: md.blocks() * 512,
            cluster_size: None,
            qcow2_version: None,
            backing_file: None,
            backing_format: None,
            dirty: false,
            corrupt: false,
            lazy_refcounts: false,
            snapshots: 0,
        }
    }
}

/// Describe the image at `path` and its backing chain (top first). Reads headers only; takes
/// no lock, so it works on an image a running VM uses.
pub fn info(path: &Path) -> Result<Vec<LayerInfo>> {
    let mut out: Vec<LayerInfo> = Vec::new();
    let mut next = Some((path.to_path_buf(), None::<String>));
    while let Some((p, fmt)) = next.take() {
        if out.len() > MAX_CHAIN_DEPTH {
            return Err(Error::image(
                path,
                format!("backing chain deeper than {MAX_CHAIN_DEPTH} images"),
            ));
        }
        let file = open_image_file(&p, false)?;
        let md = file.metadata().map_err(Error::io("reading", &p))?;
        let len = crate::open::image_len(&file, &p)?;
        if out.iter().any(|l| l.path == p) {
            return Err(Error::image(&p, "backing file loop"));
        }
        let format = match fmt.as_deref() {
            Some("qcow2") => Format::Qcow2,
            Some("raw") => Format::Raw,
            _ => match crate::open::probe_file(&file, &p)? {
                Some(other @ ("vdi" | "vmdk" | "vpc" | "vhdx")) => {
                    // Read-only formats: name and virtual size from their reader.
                    let size = crate::foreign::open(other, file, &p)?.size();
                    out.push(LayerInfo {
                        format: other.to_string(),
                        virtual_size: size,
                        ..LayerInfo::plain(&p, &md, len)
                    });
                    break;
                }
                _ => detect_format(&file, &p)?,
            },
        };
        let mut layer = LayerInfo {
            format: format.to_string(),
            ..LayerInfo::plain(&p, &md, len)
        };
        if format == Format::Qcow2 {
            let h = Header::read(&file, &p)?;
            layer.virtual_size = h.size;
            layer.cluster_size = Some(h.cluster_size());
            layer.qcow2_version = Some(h.version);
            layer.dirty = h.dirty();
            layer.corrupt = h.corrupt();
            layer.lazy_refcounts = h.lazy_refcounts();
            layer.snapshots = h.snapshots;
            layer.backing_format = h.backing_format.clone();
            if let Some(b) = &h.backing_file {
                layer.backing_file = Some(b.clone());
                next = Some((resolve_backing(&p, b), h.backing_format.clone()));
            }
        }
        out.push(layer);
    }
    Ok(out)
}

/// Copy the disk `src` (any format kvmbox reads) into a new image `dst` of `format`, writing
/// only blocks that are not all zeroes. `progress(done, total)` is called after each step.
///
/// Ranges the source knows to be zeroes (its [`BlockBackend::block_status`]: holes, unallocated
/// and zero clusters) are not read at all. One thread reads the rest, up to [`IN_FLIGHT`]
/// pieces ahead, while this one skips their zero blocks and writes, and starts the kernel's
/// writeback of the destination as it goes, so the final sync has little left to wait for.
pub fn convert(
    src: &Path,
    dst: &Path,
    format: Format,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let s = open(&DiskSpec {
        read_only: true,
        ..DiskSpec::new(src)
    })?;
    let size = s.size();
    create(dst, size.next_multiple_of(512), format, None)?;
    let d = open(&DiskSpec {
        format: Some(format),
        ..DiskSpec::new(dst)
    })?;
    let writeback = std::fs::File::open(dst).map_err(Error::io("opening", dst))?;
    let (tx, rx) = mpsc::sync_channel::<io::Result<Piece>>(IN_FLIGHT);
    let (spare_tx, spare_rx) = mpsc::channel::<Vec<u8>>();
    // Writeback is started from its own thread: submitting it takes a while, which the
    // writer would otherwise spend not copying.
    let (wb_tx, wb_rx) = mpsc::sync_channel::<()>(1);
    std::thread::scope(|scope| {
        scope.spawn(move || read_pieces(&*s, tx, spare_rx));
        scope.spawn(move || wb_rx.iter().for_each(|()| start_writeback(&writeback)));
        // Owned here, so that it is dropped (ending the writeback thread) on every way out.
        let wb_tx = wb_tx;
        let mut since_writeback = 0;
        for piece in rx {
            let Piece { offset, buf, len } = piece.map_err(Error::io("reading", src))?;
            write_nonzero(&*d, &buf[..len.next_multiple_of(512)], offset)
                .map_err(Error::io("writing", dst))?;
            since_writeback += len;
            if since_writeback >= WRITEBACK_EVERY {
                // Skipped while the last one is still being submitted.
                let _ = wb_tx.try_send(());
                since_writeback = 0;
            }
            progress(offset + len as u64, size);
            // The reader has stopped once it sent its last piece; then nobody takes it back.
            let _ = spare_tx.send(buf);
        }
        Ok::<_, Error>(())
    })?;
    progress(size, size);
    d.flush().map_err(Error::io("flushing", dst))
}

/// Bytes `convert` reads per step.
const CHUNK: usize = 1 << 20;
/// Pieces the reader of `convert` may be ahead of the writer.
const IN_FLIGHT: usize = 4;
/// Bytes `convert` writes between starting the kernel's writeback of the destination.
const WRITEBACK_EVERY: usize = 16 << 20;
/// Granularity at which `convert` skips zero blocks.
const ZERO_BLOCK: u64 = 64 << 10;

/// Data `convert` read: `len` bytes of the disk at `offset` in `buf`, which is zero-padded to
/// whole sectors (only the disk's last piece can end inside one).
struct Piece {
    offset: u64,
    buf: Vec<u8>,
    len: usize,
}

/// `convert`'s reader: the source's data extents, in pieces of at most [`CHUNK`] bytes
/// starting at sector boundaries, sent in order until the end or the first error (which is
/// sent too), or until the writer hangs up.
fn read_pieces(
    s: &dyn BlockBackend,
    tx: mpsc::SyncSender<io::Result<Piece>>,
    spare: mpsc::Receiver<Vec<u8>>,
) {
    let size = s.size();
    let mut offset = 0u64;
    while offset < size {
        let want = (size - offset).min(CHUNK as u64);
        let ext = match s.block_status(offset, want) {
            Ok(e) => e,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let len = ext.len.clamp(1, want);
        // Skip zeroes in whole sectors; a zero extent shorter than that is read as data.
        let zeroes_end = (offset + len) & !511;
        if !ext.data && zeroes_end > offset {
            offset = zeroes_end;
            continue;
        }
        let end = (offset + len).next_multiple_of(512).min(size);
        let n = (end - offset) as usize;
        let mut buf = spare.try_recv().unwrap_or_else(|_| vec![0u8; CHUNK]);
        buf[n..n.next_multiple_of(512)].fill(0);
        let r = s
            .read_vectored_at(&mut [IoSliceMut::new(&mut buf[..n])], offset)
            .map(|()| Piece {
                offset,
                buf,
                len: n,
            });
        let failed = r.is_err();
        if tx.send(r).is_err() || failed {
            return;
        }
        offset = end;
    }
}

/// Write the blocks of `buf` (disk bytes at `offset`) that are not all zeroes, each run of
/// them with one request. Blocks are [`ZERO_BLOCK`]-aligned on the disk.
fn write_nonzero(d: &dyn BlockBackend, buf: &[u8], offset: u64) -> io::Result<()> {
    let block_end = |at: usize| {
        let abs = offset + at as u64;
        ((abs / ZERO_BLOCK + 1) * ZERO_BLOCK - offset).min(buf.len() as u64) as usize
    };
    let mut i = 0;
    while i < buf.len() {
        let mut end = block_end(i);
        if all_zero(&buf[i..end]) {
            i = end;
            continue;
        }
        while end < buf.len() && !all_zero(&buf[end..block_end(end)]) {
            end = block_end(end);
        }
        d.write_vectored_at(&[IoSlice::new(&buf[i..end])], offset + i as u64)?;
        i = end;
    }
    Ok(())
}

/// Start writing the dirty pages of `file` back to the disk, without waiting for it (a hint:
/// failures are left for the final sync to report).
fn start_writeback(file: &std::fs::File) {
    // SAFETY: sync_file_range on our own descriptor; it takes no memory from us.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Whether `b` is all zeroes: OR-folds fixed 256-byte chunks (which the compiler vectorizes)
/// and stops at the first chunk that is not zero, so data is rejected within its first bytes.
fn all_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(256);
    chunks.remainder().iter().all(|&x| x == 0)
        && chunks.all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

/// Change the virtual size of the image at `path` (growing reads as zeroes; shrinking drops
/// the data past the new end). Takes the write lock.
pub fn resize(path: &Path, size: u64) -> Result<()> {
    check_size(path, size)?;
    let file = open_image_file(path, true)?;
    let lock = crate::lock::lock_for_tool(&file, path, crate::lock::Access::Write)?;
    let resized = match detect_format(&file, path)? {
        Format::Raw => file.set_len(size).map_err(Error::io("resizing", path)),
        Format::Qcow2 => crate::Qcow2Backend::open(file, path, false, true)?.resize(size),
    };
    // Unlocked once the image is closed (and its metadata written back).
    drop(lock);
    resized
}

/// What `kvmbox disk check` found and did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckOutcome {
    /// The image.
    pub path: PathBuf,
    /// "raw" (nothing to check) or "qcow2".
    pub format: String,
    /// qcow2: what the check found (before any repair).
    pub found: Option<crate::meta::Report>,
    /// After a repair: the check of the repaired image.
    pub after_repair: Option<crate::meta::Report>,
    /// With repair asked for: why nothing was changed although the image needed it.
    pub repair_refused: Option<String>,
}

impl CheckOutcome {
    /// The state the image is in now: after the repair if there was one.
    pub fn now(&self) -> Option<&crate::meta::Report> {
        self.after_repair.as_ref().or(self.found.as_ref())
    }
}

/// Check the qcow2 image at `path` as `qemu-img check` does (refcounts against the references
/// of every table, COPIED flags, entries past the end of the file, overlapping allocations);
/// with `repair`, rebuild refcounts and COPIED flags from the tables when the tables are sound,
/// and change nothing when they are not. Raw images have nothing to check. Takes the read lock
/// (the write lock to repair), so an image in use is refused.
pub fn check(
    path: &Path,
    repair: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CheckOutcome> {
    let file = open_image_file(path, repair)?;
    let access = if repair {
        crate::lock::Access::Write
    } else {
        crate::lock::Access::Read
    };
    let _lock = crate::lock::lock_for_tool(&file, path, access)?;
    let mut out = CheckOutcome {
        path: path.to_path_buf(),
        format: "raw".into(),
        found: None,
        after_repair: None,
        repair_refused: None,
    };
    match crate::open::probe_file(&file, path)? {
        None => return Ok(out),
        Some("qcow2") => out.format = "qcow2".into(),
        Some(other) => {
            return Err(Error::image(
                path,
                format!("{other} images cannot be checked (kvmbox checks qcow2 images)"),
            ))
        }
    }
    let mut img = crate::meta::Image::load(&file, path)?;
    if !repair {
        out.found = Some(crate::meta::check(&mut img, progress)?);
        return Ok(out);
    }
    let was_dirty = img.h.dirty();
    let found = crate::meta::repair(&mut img, progress)?;
    if !found.clean() || was_dirty {
        if found.repairable {
            out.after_repair = Some(crate::meta::check(&mut img, &mut |_, _| {})?);
        } else {
            out.repair_refused = Some(
                "the L1/L2 tables themselves are damaged (entries past the end of the file, unaligned or with reserved bits, or clusters used twice); refcounts rebuilt from them could lose guest data, so nothing was changed".into(),
            );
        }
    }
    out.found = Some(found);
    Ok(out)
}
