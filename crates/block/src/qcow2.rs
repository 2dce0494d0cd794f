//! qcow2 v2/v3 images through `imago`: our own header check (clear errors naming the file,
//! the facts `kvmbox disk info` shows, the backing file name and format) and the backing chain
//! opened by us (read-only, locked, loop- and depth-checked), then imago for the L1/L2 tables,
//! caches, refcounts, allocation, zero and compressed clusters.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{
    DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder, Mapping, StorageExt,
    StorageOpenOptions,
};

use crate::open::{detect_format, open_image_file, ChainGuard};
use crate::{io_err, BlockBackend, Caps, Error, Extent, Format, Result};

/// The qcow2 magic, "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_EXTERNAL_DATA: u64 = 1 << 2;
pub(crate) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// The persistent dirty bitmaps header extension.
pub(crate) const EXT_BITMAPS: u32 = 0x2385_2875;
/// Largest virtual size accepted (QEMU's limit: offsets must fit in 56 bits of an L2 entry).
pub const MAX_SIZE: u64 = 1 << 56;
/// Largest L1 table QEMU accepts (32 MiB).
const MAX_L1_BYTES: u64 = 32 << 20;
/// The offset bits of an L1 entry.
const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Largest refcount table QEMU accepts (8 MiB).
const MAX_REFTABLE_BYTES: u64 = 8 << 20;

/// The facts of a qcow2 header kvmbox uses, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size (9 to 21).
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// The backing file name as stored (relative to the image's directory unless absolute).
    pub backing_file: Option<String>,
    /// The backing file's format, if the image names it.
    pub backing_format: Option<String>,
    /// Incompatible feature bits (v3; 0 for v2).
    pub incompatible: u64,
    /// Compatible feature bits (v3; 0 for v2).
    pub compatible: u64,
    /// Number of internal snapshots.
    pub snapshots: u32,
    /// Bits per refcount.
    pub refcount_bits: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Types of the header extensions present.
    pub extensions: Vec<u32>,
    /// Compression type (0 zlib, 1 zstd).
    pub compression_type: u8,
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap_or_default())
}

pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The dirty bit: refcounts may be stale (not closed cleanly).
    pub fn dirty(&self) -> bool {
        self.incompatible & INCOMPAT_DIRTY != 0
    }

    /// The corrupt bit: QEMU found an inconsistency and stopped writing.
    pub fn corrupt(&self) -> bool {
        self.incompatible & INCOMPAT_CORRUPT != 0
    }

    /// Lazy refcounts allowed.
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible & COMPAT_LAZY_REFCOUNTS != 0
    }

    /// Read and check the header of `file` (`path` names it in errors).
    pub fn read(file: &File, path: &Path) -> Result<Self> {
        let bad = |p: String| Error::image(path, format!("bad qcow2 header: {p}"));
        let file_len = crate::open::image_len(file, path)?;
        let mut b = vec![0u8; 4096.min(file_len as usize)];
        file.read_exact_at(&mut b, 0)
            .map_err(Error::io("reading the header of", path))?;
        if b.len() < 72 {
            return Err(bad(format!("file is only {file_len} bytes long")));
        }
        if be32(&b, 0) != MAGIC {
            return Err(bad("no qcow2 magic".into()));
        }
        let version = be32(&b, 4);
        if version != 2 && version != 3 {
            return Err(bad(format!("version {version} (kvmbox reads 2 and 3)")));
        }
        let cluster_bits = be32(&b, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(bad(format!(
                "cluster_bits {cluster_bits} out of range (9 to 21)"
            )));
        }
        let cluster = 1u64 << cluster_bits;
        let size = be64(&b, 24);
        if size > MAX_SIZE {
            return Err(bad(format!("virtual size {size} exceeds {MAX_SIZE}")));
        }
        if be32(&b, 32) != 0 {
            return Err(bad("encrypted images are not supported".into()));
        }
        let l1_size = u64::from(be32(&b, 36));
        let l1_offset = be64(&b, 40);
        let l2_span = cluster * (cluster / 8);
        if l1_size < size.div_ceil(l2_span) {
            return Err(bad(format!(
                "L1 table of {l1_size} entries too small for the size"
            )));
        }
        if l1_size * 8 > MAX_L1_BYTES {
            return Err(bad(format!("L1 table of {l1_size} entries too large")));
        }
        let in_file = |what: &str, off: u64, len: u64| -> Result<()> {
            if !off.is_multiple_of(cluster)
                || off == 0
                || off.checked_add(len).is_none_or(|e| e > file_len)
            {
                return Err(bad(format!(
                    "{what} at offset {off:#x} (+{len:#x}) is unaligned, in the header or past the end of the file ({file_len:#x})"
                )));
            }
            Ok(())
        };
        if l1_size > 0 {
            in_file("L1 table", l1_offset, l1_size * 8)?;
        }
        let rt_offset = be64(&b, 48);
        let rt_bytes = u64::from(be32(&b, 56)) * cluster;
        if rt_bytes == 0 || rt_bytes > MAX_REFTABLE_BYTES {
            return Err(bad(format!("refcount table of {rt_bytes} bytes")));
        }
        in_file("refcount table", rt_offset, rt_bytes)?;
        let snapshots = be32(&b, 60);
        let (mut incompatible, mut compatible, mut refcount_bits, mut header_len) =
            (0, 0, 16, 72usize);
        let mut compression_type = 0;
        if version == 3 {
            if b.len() < 104 {
                return Err(bad("v3 header truncated".into()));
            }
            incompatible = be64(&b, 72);
            compatible = be64(&b, 80);
            let order = be32(&b, 96);
            if order > 6 {
                return Err(bad(format!("refcount_order {order} out of range (0 to 6)")));
            }
            refcount_bits = 1 << order;
            header_len = be32(&b, 100) as usize;
            if header_len < 104 || header_len > b.len() || header_len as u64 > cluster {
                return Err(bad(format!("header_length {header_len}")));
            }
            if incompatible & INCOMPAT_COMPRESSION != 0 && header_len > 104 {
                compression_type = b[104];
                if compression_type > 1 {
                    return Err(bad(format!("unknown compression type {compression_type}")));
                }
            }
            let unknown =
                incompatible & !(INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION);
            if unknown & INCOMPAT_EXTERNAL_DATA != 0 {
                return Err(bad("external data files are not supported".into()));
            }
            if unknown & INCOMPAT_EXTENDED_L2 != 0 {
                return Err(bad(
                    "extended L2 entries (subclusters) are not supported".into()
                ));
            }
            if unknown != 0 {
                return Err(bad(format!("unknown incompatible features {unknown:#x}")));
            }
        }
        // Header extensions: only the backing format matters here.
        let mut backing_format = None;
        let mut extensions = Vec::new();
        let mut at = header_len.next_multiple_of(8);
        while at + 8 <= b.len() {
            let (kind, len) = (be32(&b, at), be32(&b, at + 4) as usize);
            if kind == 0 {
                break;
            }
            extensions.push(kind);
            let data = b
                .get(at + 8..at + 8 + len)
                .ok_or_else(|| bad(format!("header extension {kind:#x} runs past the header")))?;
            if kind == EXT_BACKING_FORMAT {
                backing_format = Some(String::from_utf8_lossy(data).into_owned());
            }
            at = at + 8 + len.next_multiple_of(8);
        }
        let bf_off = be64(&b, 8);
        let bf_len = be32(&b, 16) as usize;
        let backing_file = if bf_off == 0 {
            None
        } else {
            if bf_len == 0 || bf_len > 1023 || bf_off + bf_len as u64 > cluster.min(b.len() as u64)
            {
                return Err(bad(format!(
                    "backing file name at {bf_off:#x} (+{bf_len}) outside the first cluster"
                )));
            }
            let name = &b[bf_off as usize..bf_off as usize + bf_len];
            Some(
                String::from_utf8(name.to_vec())
                    .map_err(|_| bad("backing file name is not UTF-8".into()))?,
            )
        };
        Ok(Header {
            version,
            cluster_bits,
            size,
            backing_file,
            backing_format,
            incompatible,
            compatible,
            snapshots,
            refcount_bits,
            l1_size: l1_size as u32,
            l1_offset,
            refcount_table_offset: rt_offset,
            refcount_table_clusters: be32(&b, 56),
            snapshots_offset: be64(&b, 64),
            extensions,
            compression_type,
        })
    }
}

/// Where QEMU looks for `backing` named in the image at `image`: as given if absolute, else
/// relative to the directory of the image (as the image's path was given, not canonicalized).
pub fn resolve_backing(image: &Path, backing: &str) -> PathBuf {
    let b = Path::new(backing);
    if b.is_absolute() {
        return b.to_path_buf();
    }
    match image.parent() {
        Some(dir) => dir.join(b),
        None => b.to_path_buf(),
    }
}

type Storage = imago::file::File;
type Access = FormatAccess<Storage>;

fn imago_storage(file: File, path: &Path, writable: bool) -> Result<Storage> {
    let opts = StorageOpenOptions::new().filename(path).write(writable);
    Storage::from_open_file(file, opts).map_err(Error::io("opening", path))
}

fn imago_err(path: &Path) -> impl Fn(io::Error) -> Error + '_ {
    move |e| Error::image(path, e.to_string())
}

/// Open the backing chain of the image at `path` (header `h`): every file read-only and
/// locked for reading; `chain` counts depth and catches loops.
pub(crate) fn open_backing(
    path: &Path,
    h: &Header,
    chain: &mut ChainGuard,
) -> Result<Option<Access>> {
    let Some(name) = &h.backing_file else {
        return Ok(None);
    };
    let bpath = resolve_backing(path, name);
    let file = open_image_file(&bpath, false).map_err(|e| match e {
        Error::Io { source, .. } => Error::image(
            path,
            format!("backing file '{}': {source}", bpath.display()),
        ),
        e => e,
    })?;
    chain.enter(&file, &bpath)?;
    let format = match h.backing_format.as_deref() {
        Some("qcow2") => Format::Qcow2,
        Some("raw") | Some("file") => Format::Raw,
        Some(f) => {
            return Err(Error::image(
                path,
                format!(
                    "backing file '{}' has format '{f}' (kvmbox reads raw and qcow2)",
                    bpath.display()
                ),
            ))
        }
        // Backing files are opened read-only, so probing one cannot lead to writing the host.
        None => detect_format(&file, &bpath)?,
    };
    let access = match format {
        Format::Qcow2 => {
            let bh = Header::read(&file, &bpath)?;
            open_access(file, &bpath, &bh, false, chain)?.0
        }
        Format::Raw => {
            let raw = Raw::builder(imago_storage(file, &bpath, false)?)
                .write(false)
                .open(DenyImplicitOpenGate::default())
                .map_err(imago_err(&bpath))?;
            FormatAccess::new(raw)
        }
    };
    Ok(Some(access))
}

/// The image `file` (header `h`) and its backing chain, opened; the access and the backing
/// chain's own access (if any).
fn open_access(
    file: File,
    path: &Path,
    h: &Header,
    writable: bool,
    chain: &mut ChainGuard,
) -> Result<(Access, Option<Arc<Access>>)> {
    if h.incompatible & INCOMPAT_COMPRESSION != 0 {
        return Err(Error::image(
            path,
            "zstd-compressed images open read-only (ro) and convert, but cannot be written or serve as backing files (convert with `kvmbox disk convert`)",
        ));
    }
    if h.dirty() {
        return Err(Error::image(
            path,
            "the dirty bit is set (not closed cleanly): it opens read-only (ro), or run `kvmbox disk check --repair`",
        ));
    }
    if h.corrupt() && writable {
        return Err(Error::image(
            path,
            "the corrupt bit is set; open it read-only (ro) or check it with `kvmbox disk check`",
        ));
    }
    if writable {
        check_tables_inside_file(&file, path, h)?;
    }
    let backing = open_backing(path, h, chain)?.map(Arc::new);
    Ok((
        build_access(file, path, writable, backing.clone())?,
        backing,
    ))
}

/// imago's access to the qcow2 image `file` over the already open `backing`. Shared (`Arc`)
/// so that [`Qcow2Backend::snapshot_create`] can build the access again over the same backing
/// chain without opening a file.
fn build_access(
    file: File,
    path: &Path,
    writable: bool,
    backing: Option<Arc<Access>>,
) -> Result<Access> {
    let q = Qcow2::<Storage, Arc<Access>>::builder(imago_storage(file, path, writable)?)
        .write(writable)
        .backing(backing)
        .open(DenyImplicitOpenGate::default())
        .map_err(imago_err(path))?;
    Ok(FormatAccess::new(q))
}

/// Before a read-write open, the tables imago writes back to must lie inside the file: every
/// cluster of the file under a refcount block of the refcount table, every refcount block and
/// every L2 table of the active L1 table cluster aligned, past the header and inside the file.
///
/// Where a refcount block was missing, a write made imago allocate a refcount block for a
/// cluster range with none, which needed another one, and so on until the stack overflowed
/// (found by the `image_open` fuzz target; an all-zero refcount table also made it place a
/// refcount block over the header). Where an L1 entry pointed at 48 GiB in a 4 KiB image, the
/// flush at close wrote the L2 table there, and checking the now 48 GiB (sparse) file with its
/// 512-byte clusters took seconds (the fuzz target's slow inputs). QEMU never leaves such
/// tables; `kvmbox disk check` reports them.
fn check_tables_inside_file(file: &File, path: &Path, h: &Header) -> Result<()> {
    let mut b = [0u8; 60];
    file.read_exact_at(&mut b, 0)
        .map_err(Error::io("reading the header of", path))?;
    let (rt_offset, cluster) = (be64(&b, 48), h.cluster_size());
    let rt_bytes = u64::from(be32(&b, 56)) * cluster;
    let len = crate::open::image_len(file, path)?;
    let damaged = |what: String| {
        Error::image(
            path,
            format!("{what}; open it read-only (ro) or see `kvmbox disk check`"),
        )
    };
    let inside = |off: u64| off >= cluster && off.is_multiple_of(cluster) && off + cluster <= len;
    let mut rt = vec![0u8; rt_bytes as usize];
    file.read_exact_at(&mut rt, rt_offset)
        .map_err(Error::io("reading the refcount table of", path))?;
    for (i, e) in rt.chunks_exact(8).enumerate() {
        let off = be64(e, 0);
        if off != 0 && !inside(off) {
            return Err(damaged(format!(
                "refcount block {i} at offset {off:#x} is unaligned, in the header or past the end of the file ({len:#x})"
            )));
        }
    }
    // Clusters one refcount block covers: a cluster of refcount_bits-wide entries.
    let per_rb = cluster * 8 / u64::from(h.refcount_bits.max(1));
    let needed = len.div_ceil(cluster).div_ceil(per_rb) as usize;
    let covered = rt.chunks_exact(8).take(needed);
    if let Some(missing) = covered
        .clone()
        .position(|e| be64(e, 0) == 0)
        .or((covered.len() < needed).then_some(rt.len() / 8))
    {
        return Err(Error::image(
            path,
            format!(
                "the refcount table has no refcount block for clusters {} and on (of {}); open it read-only (ro) or repair it with `kvmbox disk check --repair`",
                missing as u64 * per_rb,
                len.div_ceil(cluster)
            ),
        ));
    }
    let mut l1 = vec![0u8; h.l1_size as usize * 8];
    file.read_exact_at(&mut l1, h.l1_offset)
        .map_err(Error::io("reading the L1 table of", path))?;
    for (i, e) in l1.chunks_exact(8).enumerate() {
        let off = be64(e, 0) & L1_OFFSET_MASK;
        if off != 0 && !inside(off) {
            return Err(damaged(format!(
                "L1 entry {i} points at an L2 table at offset {off:#x}, which is unaligned, in the header or past the end of the file ({len:#x})"
            )));
        }
    }
    Ok(())
}

/// log2 of the slots of [`MappingCache`].
const SLOT_BITS: u32 = 12;
/// Bits of a slot holding the host cluster index (the rest holds the guest cluster's tag).
const HOST_BITS: u32 = 36;

/// Where guest clusters of the top image are stored, for reads and writes that need no other
/// metadata: clusters imago reports as plain data of the top image, inside the file, that
/// writes change in place (COPIED: not shared with an internal snapshot, not compressed, not
/// zero, not from a backing file).
/// Only a discard, write-zeroes or resize can move or hide such a cluster, and those empty the
/// cache while holding the backend's lock exclusively, so no read can be looking a mapping up
/// (and putting it back) meanwhile.
///
/// Direct-mapped by guest cluster, one `u64` per slot so that a lookup is one load (no lock):
/// the guest cluster's index above the slot bits, plus one, in the top 28 bits and the host
/// cluster's index in the low 36 (clusters that do not fit, past 32 TiB of file or 512 TiB of
/// disk at 512-byte clusters, are simply not cached).
struct MappingCache {
    slots: Vec<AtomicU64>,
    cluster_bits: u32,
}

impl MappingCache {
    fn new(cluster_bits: u32) -> Self {
        Self {
            slots: (0..1 << SLOT_BITS).map(|_| AtomicU64::new(0)).collect(),
            cluster_bits,
        }
    }

    fn slot(&self, cluster: u64) -> &AtomicU64 {
        &self.slots[(cluster & ((1 << SLOT_BITS) - 1)) as usize]
    }

    /// The guest cluster holding all `len` bytes at `offset`, if they lie in one cluster.
    fn cluster_of(&self, offset: u64, len: u64) -> Option<u64> {
        let c = offset >> self.cluster_bits;
        (len > 0 && (offset + len - 1) >> self.cluster_bits == c).then_some(c)
    }

    /// Where in its cluster guest byte `offset` is.
    fn within(&self, offset: u64) -> u64 {
        offset & ((1 << self.cluster_bits) - 1)
    }

    /// The host offset of guest byte `offset` in `cluster`, if the cluster is cached.
    fn get(&self, cluster: u64, offset: u64) -> Option<u64> {
        // Relaxed: entries change under the backend's lock (see above), not through this load.
        let e = self.slot(cluster).load(Ordering::Relaxed);
        let tag = (cluster >> SLOT_BITS) + 1;
        (e >> HOST_BITS == tag)
            .then(|| ((e & ((1 << HOST_BITS) - 1)) << self.cluster_bits) + self.within(offset))
    }

    /// Remember that guest `cluster` starts at `host` (cluster aligned) in the top image.
    fn insert(&self, cluster: u64, host: u64) {
        let (tag, host) = ((cluster >> SLOT_BITS) + 1, host >> self.cluster_bits);
        if tag < 1 << (64 - HOST_BITS) && host < 1 << HOST_BITS {
            self.slot(cluster)
                .store(tag << HOST_BITS | host, Ordering::Relaxed);
        }
    }

    fn clear(&self) {
        for s in &self.slots {
            s.store(0, Ordering::Relaxed);
        }
    }
}

/// A qcow2 image and its backing chain.
pub struct Qcow2Backend {
    path: PathBuf,
    access: RwLock<Access>,
    /// The top image file (the descriptor imago has, duplicated): cached clusters are read
    /// from it directly.
    file: File,
    mappings: MappingCache,
    size: u64,
    read_only: bool,
    /// A version 3 image open read-write: the dirty bit is set while it is open, and
    /// cleared through this handle on a clean close.
    dirty_bit: Option<File>,
    /// The backing chain (also inside `access`), kept to build `access` again after a
    /// snapshot.
    backing: Option<Arc<Access>>,
    /// imago's access could not be built again after a snapshot: the one left has a view of
    /// the tables that may be out of date, so nothing may be written through it.
    stale: std::sync::atomic::AtomicBool,
}

impl Qcow2Backend {
    /// Open the qcow2 image `file` (already opened and locked) at `path`.
    ///
    /// As QEMU does, a dirty image (not closed cleanly) opened read-write has its refcounts
    /// rebuilt first. A version 3 image open read-write carries the dirty bit until it is
    /// closed cleanly, lazy refcounts or not: imago writes an L1 entry for a new L2 table
    /// before the refcount block that counts it, so an image kvmbox was killed while writing
    /// (between flushes) can have a refcount too low; the bit makes QEMU and kvmbox rebuild
    /// refcounts before the next writer could hand that cluster out twice. A version 2 image
    /// has no dirty bit to set, so every read-write open of one is treated as an open of a
    /// dirty image: its metadata is checked first and its refcounts rebuilt when the check
    /// finds anything (a kill of an earlier writer leaves nothing else behind to tell).
    pub fn open(file: File, path: &Path, read_only: bool, lock: bool) -> Result<Self> {
        let mut h = Header::read(&file, path)?;
        if (h.dirty() || h.version == 2) && !read_only {
            let mut img = crate::meta::Image::load(&file, path)?;
            let report = crate::meta::repair(&mut img, &mut |_, _| {})?;
            if let Some(p) = report
                .problems
                .iter()
                .find(|p| p.kind == crate::meta::Kind::Mapping)
            {
                let why = if h.dirty() {
                    "the dirty bit is set"
                } else {
                    "version 2 image checked before writing"
                };
                return Err(Error::image(
                    path,
                    format!(
                        "{why} and the tables are damaged ({}); see `kvmbox disk check`",
                        p.message
                    ),
                ));
            }
            h = Header::read(&file, path)?;
        }
        let dirty_bit = if !read_only && h.version == 3 {
            Some(file.try_clone().map_err(Error::io("opening", path))?)
        } else {
            None
        };
        let mut chain = ChainGuard::new(&file, path, lock)?;
        let own = file.try_clone().map_err(Error::io("opening", path))?;
        let (access, backing) = open_access(file, path, &h, !read_only, &mut chain)?;
        if let Some(f) = &dirty_bit {
            crate::meta::set_dirty(f, path, true)?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            size: access.size(),
            access: RwLock::new(access),
            file: own,
            mappings: MappingCache::new(h.cluster_bits),
            read_only,
            dirty_bit,
            backing,
            stale: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Take internal snapshot `name` (QEMU's format, as `kvmbox disk snapshot create`) of the
    /// open image, on its own file descriptor: no second open, no lock to take, so the VM
    /// process does it while the guest is paused. The caller has stopped the requests to this
    /// backend (none may run meanwhile; they would wait for the lock anyway).
    ///
    /// imago's cached metadata is written back and synced first; the snapshot is then made
    /// by [`meta::commit`](crate::meta::commit) (new tables after the end of the file, one
    /// header write), which clears the COPIED flags of the active tables, now shared with the
    /// snapshot; imago's access is then built again over the same file and backing chain, so
    /// it reloads the new header and tables and copies a shared cluster before the next write
    /// to it. On an error the image is either unchanged or has the snapshot, never damaged,
    /// and the backend goes on serving it.
    pub fn snapshot_create(&self, name: &str) -> Result<()> {
        self.with_metadata(|img| crate::snapshot::create_in(img, name))
    }

    /// Delete internal snapshot `name` of the open image, as [`Self::snapshot_create`] takes
    /// one (to undo a snapshot taken on some disks of a VM when another disk failed).
    pub fn snapshot_delete(&self, name: &str) -> Result<()> {
        self.with_metadata(|img| crate::snapshot::delete_in(img, name))
    }

    /// The names of the open image's internal snapshots, read on its own descriptor after
    /// imago's cached metadata is written back (the caller has stopped the requests, as for
    /// [`Self::snapshot_create`]; only that and [`Self::snapshot_delete`] change the table).
    pub fn snapshot_names(&self) -> Result<Vec<String>> {
        let a = self.access_mut();
        if !self.read_only {
            a.flush()
                .map_err(|e| Error::image(&self.path, format!("writing back metadata: {e}")))?;
        }
        let img = crate::meta::Image::load(&self.file, &self.path)?;
        let names = img.snapshots()?.0.into_iter().map(|s| s.name).collect();
        drop(a);
        Ok(names)
    }

    /// Run `f` on kvmbox's own view of the image's metadata while imago's is written back and
    /// then dropped, then build imago's access again (see [`Self::snapshot_create`]).
    fn with_metadata(
        &self,
        f: impl FnOnce(&mut crate::meta::Image<'_>) -> Result<()>,
    ) -> Result<()> {
        if self.read_only {
            return Err(Error::image(&self.path, "the disk is read-only"));
        }
        self.check_fresh()
            .map_err(|e| Error::image(&self.path, e.to_string()))?;
        let mut a = self.access_mut();
        a.flush()
            .and_then(|()| a.sync())
            .map_err(|e| Error::image(&self.path, format!("writing back metadata: {e}")))?;
        let result = crate::meta::Image::load(&self.file, &self.path).and_then(|mut img| {
            if img.h.corrupt() {
                return Err(Error::image(&self.path, "the corrupt bit is set"));
            }
            f(&mut img)
        });
        // Both states on disk (before and after a commit) are consistent now: the dirty bit
        // goes while imago opens the image again (it reads a clean header), and comes back.
        let rebuilt = if self.dirty_bit.is_some() {
            crate::meta::set_dirty(&self.file, &self.path, false)
        } else {
            Ok(())
        }
        .and_then(|()| {
            self.file
                .try_clone()
                .map_err(Error::io("reopening", &self.path))
        })
        .and_then(|file| build_access(file, &self.path, true, self.backing.clone()));
        match rebuilt {
            Ok(access) => *a = access,
            Err(e) => {
                // The image on disk is consistent (with or without the snapshot), but the old
                // access may know stale tables: nothing may be written through it any more.
                self.stale.store(true, Ordering::Relaxed);
                return Err(e);
            }
        }
        if let Some(d) = &self.dirty_bit {
            crate::meta::set_dirty(d, &self.path, true)?;
        }
        result
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io_err(io::ErrorKind::PermissionDenied, "read-only disk"));
        }
        self.check_fresh()
    }

    /// Refuse once [`Self::snapshot_create`] could not build imago's access again.
    fn check_fresh(&self) -> io::Result<()> {
        if self.stale.load(Ordering::Relaxed) {
            return Err(io_err(
                io::ErrorKind::Other,
                "the image could not be opened again after a snapshot; stop the VM (the image on disk is consistent)",
            ));
        }
        Ok(())
    }

    /// Change the virtual size (new space reads as zeroes; shrinking drops data past the end).
    pub fn resize(&self, size: u64) -> Result<()> {
        let mut a = self.access_mut();
        a.resize(size, imago::format::PreallocateMode::Zero)
            .and_then(|()| a.flush())
            .map_err(|e| Error::image(&self.path, e.to_string()))
    }

    fn access(&self) -> std::sync::RwLockReadGuard<'_, Access> {
        self.access.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The top image's length (of the file, or of the block device it is on).
    fn file_len(&self) -> io::Result<u64> {
        crate::open::image_len(&self.file, &self.path)
            .map_err(|e| io_err(io::ErrorKind::Other, e.to_string()))
    }

    /// The image exclusively, for an operation that may move or hide data clusters: the
    /// mapping cache is emptied (no read holds the lock meanwhile).
    fn access_mut(&self) -> std::sync::RwLockWriteGuard<'_, Access> {
        let a = self.access.write().unwrap_or_else(|e| e.into_inner());
        self.mappings.clear();
        a
    }
}

impl Drop for Qcow2Backend {
    /// A clean close: metadata written back and synced, then the dirty bit cleared, then the
    /// image's locks released (see [`crate::lock::unlock`]; not after a failed write-back,
    /// which imago tries again as it closes the file).
    fn drop(&mut self) {
        let a = self.access.get_mut().unwrap_or_else(|e| e.into_inner());
        let written = if let Some(f) = self.dirty_bit.take() {
            let ok = a.flush().and_then(|()| a.sync()).is_ok();
            if ok {
                let _ = crate::meta::set_dirty(&f, &self.path, false);
            }
            ok
        } else {
            self.read_only || a.flush().is_ok()
        };
        if written {
            crate::lock::unlock(&self.file);
        }
    }
}

/// `bufs` without empty buffers: imago's I/O vectors must not hold any (it asserts that a vector
/// is empty exactly when it has no buffers; a guest's zero-length descriptor would break that).
fn non_empty<'a>(bufs: &'a mut [IoSliceMut<'_>]) -> Vec<IoSliceMut<'a>> {
    bufs.iter_mut()
        .filter(|b| !b.is_empty())
        .map(|b| IoSliceMut::new(b))
        .collect()
}

impl BlockBackend for Qcow2Backend {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps::writable_unless(self.read_only)
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        let a = self.access();
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        // A request inside one cluster: one mapping lookup (none when the cluster is cached),
        // then one read into the caller's buffers.
        if let Some(c) = self.mappings.cluster_of(offset, len) {
            if let Some(host) = self.mappings.get(c, offset) {
                return crate::raw::preadv_exact(self.file.as_raw_fd(), bufs, host, true);
            }
            match a.get_mapping(offset, len)? {
                (
                    Mapping::Raw {
                        storage,
                        offset: host,
                        writable,
                        ..
                    },
                    n,
                ) if n == len => {
                    let start = host - self.mappings.within(offset);
                    if writable && start + (1 << self.mappings.cluster_bits) <= self.file_len()? {
                        self.mappings.insert(c, start);
                    }
                    return storage.readv(IoVectorMut::from(non_empty(bufs)), host);
                }
                (Mapping::Zero { .. } | Mapping::Eof { .. }, n) if n == len || n == 0 => {
                    bufs.iter_mut().for_each(|b| b.fill(0));
                    return Ok(());
                }
                _ => {}
            }
        }
        a.readv(IoVectorMut::from(non_empty(bufs)), offset)
    }

    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        let a = self.access();
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        // Inside one cached cluster: written in place, as imago would.
        if let Some(host) = self
            .mappings
            .cluster_of(offset, len)
            .and_then(|c| self.mappings.get(c, offset))
        {
            return crate::raw::pwritev_all(self.file.as_raw_fd(), bufs, host);
        }
        // Clusters written in place must lie inside the file: a damaged L2 entry pointing far
        // past its end would otherwise grow the file there (data past the end of the file is
        // damage; reads of it give zeroes).
        let file_len = self.file_len()?;
        let (mut at, end) = (offset, offset.saturating_add(len));
        while at < end {
            let (m, n) = a.get_mapping(at, end - at)?;
            if let Mapping::Raw {
                offset: host,
                writable: true,
                ..
            } = m
            {
                if host.saturating_add(n) > file_len {
                    return Err(io_err(
                        io::ErrorKind::InvalidData,
                        format!("data cluster at {host:#x} past the end of the image file"),
                    ));
                }
            }
            if n == 0 {
                break;
            }
            at += n;
        }
        let v: Vec<IoSlice<'_>> = bufs.iter().filter(|b| !b.is_empty()).copied().collect();
        a.writev(IoVector::from(v), offset)
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.check_fresh()?;
        let a = self.access();
        a.flush()?;
        a.sync()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        self.access_mut().discard_to_zero(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        if may_unmap {
            return self.discard(offset, len);
        }
        self.check_writable()?;
        self.access_mut().write_zeroes(offset, len)
    }

    fn holds_internal_snapshots(&self) -> bool {
        !self.read_only
    }

    fn snapshot_create(&self, name: &str) -> io::Result<()> {
        Qcow2Backend::snapshot_create(self, name)
            .map_err(|e| io_err(io::ErrorKind::Other, e.to_string()))
    }

    fn snapshot_delete(&self, name: &str) -> io::Result<()> {
        Qcow2Backend::snapshot_delete(self, name)
            .map_err(|e| io_err(io::ErrorKind::Other, e.to_string()))
    }

    fn snapshot_names(&self) -> io::Result<Vec<String>> {
        Qcow2Backend::snapshot_names(self).map_err(|e| io_err(io::ErrorKind::Other, e.to_string()))
    }

    /// Zero and unallocated clusters through the whole chain (imago's mapping).
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Extent> {
        let access = self.access();
        let (mapping, n) = access.get_mapping(offset, len)?;
        Ok(match mapping {
            Mapping::Zero { .. } => Extent {
                data: false,
                len: n,
            },
            Mapping::Eof { .. } => Extent { data: false, len },
            _ => Extent { data: true, len: n },
        })
    }
}
