//! qcow2 metadata walked by kvmbox itself, for what imago does not offer: checking and
//! repairing refcounts (`kvmbox disk check`), the dirty bit of lazy-refcount images, and
//! internal snapshots.
//!
//! [`walk`] follows every table of one metadata state (header, active L1 and its L2 tables,
//! snapshot table, each snapshot's L1 and L2 tables) and counts how often each host cluster is
//! referenced, the way QEMU's `qcow2_check_refcounts` counts. [`check`] compares those counts
//! with the refcounts on disk. [`commit`] is the one way kvmbox changes metadata: it writes
//! whatever is new (snapshot L1 copies, a snapshot table, an active L1 table) and a complete
//! new refcount structure computed from the references after the end of the file, then
//! switches the header to them in one sector write. Until that write the old state is
//! intact; after it the new one is. The only in-place changes are COPIED flags: flags that
//! must go are cleared before the switch (a clear flag only costs a copy-on-write), flags that
//! may be set are set after it.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::qcow2::{be32, be64, Header, EXT_BITMAPS, INCOMPAT_DIRTY};
use crate::{Error, Result};

const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
const REFT_RESERVED: u64 = 0x1ff;
/// Most snapshots QEMU allows in one image.
pub const MAX_SNAPSHOTS: usize = 65536;
/// Largest snapshot table QEMU reads.
const MAX_SNAPSHOT_TABLE: u64 = 64 << 20;

/// What one host cluster is used for (bits).
const USE_META: u8 = 1;
const USE_L2: u8 = 2;
const USE_DATA: u8 = 4;
const USE_COMPRESSED: u8 = 8;
const USE_REFCOUNT: u8 = 16;

/// How bad a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A cluster has a higher refcount than references: wasted space, no harm to data.
    Leak,
    /// Refcounts or COPIED flags disagree with the tables: rebuilding them from the tables is
    /// safe (the refcount structure holds no guest data).
    Refcount,
    /// The tables themselves are damaged (entries past the end of the file, unaligned,
    /// reserved bits, clusters used twice): guest data may already be lost, and no automatic
    /// change can be trusted, so kvmbox only reports these.
    Mapping,
}

/// One inconsistency.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Problem {
    /// How bad.
    pub kind: Kind,
    /// What, in QEMU's wording where QEMU reports the same thing.
    pub message: String,
}

/// An internal snapshot as the snapshot table stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Unique ID (QEMU numbers them 1, 2, ...).
    pub id: String,
    /// The name (QEMU's "tag").
    pub name: String,
    /// Offset of the snapshot's L1 table.
    pub l1_offset: u64,
    /// Entries of that L1 table.
    pub l1_size: u32,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock at creation (0: none).
    pub vm_clock_nsec: u64,
    /// Saved VM state size (kvmbox saves none).
    pub vm_state_size: u32,
    /// Extra data as stored (QEMU: 64-bit VM state size, disk size, icount).
    pub extra: Vec<u8>,
}

impl Snapshot {
    /// The virtual disk size when the snapshot was taken, where the image records it.
    pub fn disk_size(&self) -> Option<u64> {
        (self.extra.len() >= 16).then(|| be64(&self.extra, 8))
    }

    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend(self.l1_offset.to_be_bytes());
        out.extend(self.l1_size.to_be_bytes());
        out.extend((self.id.len() as u16).to_be_bytes());
        out.extend((self.name.len() as u16).to_be_bytes());
        out.extend(self.date_sec.to_be_bytes());
        out.extend(self.date_nsec.to_be_bytes());
        out.extend(self.vm_clock_nsec.to_be_bytes());
        out.extend(self.vm_state_size.to_be_bytes());
        out.extend((self.extra.len() as u32).to_be_bytes());
        out.extend(&self.extra);
        out.extend(self.id.as_bytes());
        out.extend(self.name.as_bytes());
        out.resize(out.len().next_multiple_of(8), 0);
    }
}

/// One metadata state: what the header points at.
#[derive(Debug, Clone)]
pub(crate) struct State {
    pub size: u64,
    pub l1_offset: u64,
    pub l1: Vec<u64>,
    pub snapshots: Vec<(Snapshot, Vec<u64>)>,
    /// Offset and length of the snapshot table (0, 0 without snapshots).
    pub snapshot_table: (u64, u64),
}

/// A qcow2 image opened for metadata work; the caller holds the file (and its lock).
pub(crate) struct Image<'f> {
    pub file: &'f File,
    pub path: PathBuf,
    pub h: Header,
    pub file_len: u64,
    l2_cache: HashMap<u64, Vec<u64>>,
}

fn bytes_to_entries(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8).map(|c| be64(c, 0)).collect()
}

fn entries_to_bytes(e: &[u64]) -> Vec<u8> {
    e.iter().flat_map(|v| v.to_be_bytes()).collect()
}

impl<'f> Image<'f> {
    /// Read the header of `file`; refuse what kvmbox cannot account for.
    pub fn load(file: &'f File, path: &Path) -> Result<Self> {
        let h = Header::read(file, path)?;
        if h.extensions.contains(&EXT_BITMAPS) {
            return Err(Error::image(
                path,
                "the image has persistent dirty bitmaps, which kvmbox does not account for (use qemu-img)",
            ));
        }
        let file_len = crate::open::image_len(file, path)?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            h,
            file_len,
            l2_cache: HashMap::new(),
        })
    }

    fn cs(&self) -> u64 {
        self.h.cluster_size()
    }

    fn read(&self, off: u64, len: u64, what: &str) -> Result<Vec<u8>> {
        if off.checked_add(len).is_none_or(|e| e > self.file_len) {
            return Err(Error::image(
                &self.path,
                format!("{what} at {off:#x} (+{len:#x}) lies past the end of the file"),
            ));
        }
        let mut b = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut b, off)
            .map_err(Error::io("reading", &self.path))?;
        Ok(b)
    }

    fn write(&self, off: u64, b: &[u8]) -> Result<()> {
        self.file
            .write_all_at(b, off)
            .map_err(Error::io("writing", &self.path))
    }

    fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(Error::io("syncing", &self.path))
    }

    /// Read an L1 table of `n` entries at `off` (checked: aligned, inside the file).
    fn read_l1(&self, off: u64, n: u32, what: &str) -> Result<Vec<u64>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        if !off.is_multiple_of(self.cs()) || off == 0 || u64::from(n) * 8 > 32 << 20 {
            return Err(Error::image(
                &self.path,
                format!("{what} at {off:#x} with {n} entries is invalid"),
            ));
        }
        Ok(bytes_to_entries(&self.read(off, u64::from(n) * 8, what)?))
    }

    /// The snapshot table.
    pub fn snapshots(&self) -> Result<(Vec<Snapshot>, u64)> {
        let n = self.h.snapshots as usize;
        let off = self.h.snapshots_offset;
        if n == 0 {
            return Ok((Vec::new(), 0));
        }
        let bad = |p: String| Error::image(&self.path, format!("snapshot table: {p}"));
        if n > MAX_SNAPSHOTS || !off.is_multiple_of(self.cs()) || off == 0 || off >= self.file_len {
            return Err(bad(format!("{n} snapshots at {off:#x}")));
        }
        let avail = (self.file_len - off).min(MAX_SNAPSHOT_TABLE);
        let t = self.read(off, avail, "snapshot table")?;
        let mut at = 0usize;
        let mut out = Vec::with_capacity(n);
        let get = |from: usize, len: usize| {
            t.get(from..from + len)
                .ok_or_else(|| bad("runs past the end of the file or its 64 MiB limit".into()))
        };
        for _ in 0..n {
            let fixed = get(at, 40)?;
            let l1_offset = be64(fixed, 0);
            let l1_size = be32(fixed, 8);
            let id_len = u16::from_be_bytes([fixed[12], fixed[13]]) as usize;
            let name_len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
            let extra_len = be32(fixed, 36) as usize;
            if extra_len > 1024 {
                return Err(bad(format!("extra data of {extra_len} bytes")));
            }
            let extra = get(at + 40, extra_len)?.to_vec();
            let id = get(at + 40 + extra_len, id_len)?;
            let name = get(at + 40 + extra_len + id_len, name_len)?;
            out.push(Snapshot {
                id: String::from_utf8_lossy(id).into_owned(),
                name: String::from_utf8_lossy(name).into_owned(),
                l1_offset,
                l1_size,
                date_sec: be32(fixed, 16),
                date_nsec: be32(fixed, 20),
                vm_clock_nsec: be64(fixed, 24),
                vm_state_size: be32(fixed, 32),
                extra,
            });
            at = (at + 40 + extra_len + id_len + name_len).next_multiple_of(8);
        }
        Ok((out, at as u64))
    }

    /// The state the header describes now.
    pub fn state(&self) -> Result<State> {
        let (snaps, table_len) = self.snapshots()?;
        let mut snapshots = Vec::with_capacity(snaps.len());
        for s in snaps {
            let what = format!("L1 table of snapshot '{}'", s.name);
            let l1 = self.read_l1(s.l1_offset, s.l1_size, &what)?;
            snapshots.push((s, l1));
        }
        Ok(State {
            size: self.h.size,
            l1_offset: self.h.l1_offset,
            l1: self.read_l1(self.h.l1_offset, self.h.l1_size, "active L1 table")?,
            snapshots,
            snapshot_table: (self.h.snapshots_offset, table_len),
        })
    }

    fn l2(&mut self, off: u64) -> Result<&Vec<u64>> {
        if !self.l2_cache.contains_key(&off) {
            let t = bytes_to_entries(&self.read(off, self.cs(), "L2 table")?);
            self.l2_cache.insert(off, t);
        }
        Ok(&self.l2_cache[&off])
    }

    /// The clusters the rest of the file ends at, rounded up: where new structures go.
    pub fn end_cluster(&self) -> u64 {
        self.file_len.div_ceil(self.cs())
    }
}

/// References counted over one state.
pub(crate) struct Walk {
    cluster_bits: u32,
    /// Clusters that exist (references past them are problems).
    limit: u64,
    pub refs: Vec<u32>,
    uses: Vec<u8>,
    pub problems: Vec<Problem>,
    /// Data clusters the active L1 maps, and how many of them are compressed.
    pub allocated: u64,
    pub compressed: u64,
    /// L2 tables of the active L1 (offsets, in order).
    pub active_l2: Vec<u64>,
}

impl Walk {
    fn problem(&mut self, kind: Kind, message: String) {
        self.problems.push(Problem { kind, message });
    }

    /// Count one reference to each cluster of `off..off+len`; false if it leaves the file.
    fn count(
        &mut self,
        off: u64,
        len: u64,
        usage: u8,
        kind: Kind,
        what: &dyn Fn() -> String,
    ) -> bool {
        if len == 0 {
            return true;
        }
        let first = off >> self.cluster_bits;
        let last = off.saturating_add(len - 1) >> self.cluster_bits;
        if last >= self.limit {
            let m = format!(
                "ERROR {}: offset {off:#x} (+{len:#x}) exceeds the end of the image file",
                what()
            );
            self.problem(kind, m);
            return false;
        }
        for c in first..=last {
            self.refs[c as usize] = self.refs[c as usize].saturating_add(1);
            self.uses[c as usize] |= usage;
        }
        true
    }

    /// The refcount every cluster should have.
    pub fn reference(&self, cluster: u64) -> u64 {
        self.refs.get(cluster as usize).map_or(0, |&r| u64::from(r))
    }
}

/// Count the references of one L1 table and its L2 tables.
fn walk_l1(
    img: &mut Image<'_>,
    w: &mut Walk,
    l1: &[u64],
    active: bool,
    progress: &mut dyn FnMut(),
) -> Result<()> {
    let cs = img.cs();
    let bits = img.h.cluster_bits;
    let shift = 62 - (bits - 8);
    let csize_mask = (1u64 << (bits - 8)) - 1;
    for (i, &e) in l1.iter().enumerate() {
        if e & L1_RESERVED != 0 {
            w.problem(
                Kind::Mapping,
                format!("ERROR L1 entry {i} ({e:#x}) has reserved bits set"),
            );
            continue;
        }
        let off = e & OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if !off.is_multiple_of(cs) {
            w.problem(
                Kind::Mapping,
                format!("ERROR L2 table at {off:#x} (L1 entry {i}) is not cluster-aligned; L1 entry corrupted"),
            );
            continue;
        }
        if !w.count(off, cs, USE_L2, Kind::Mapping, &|| {
            format!("L2 table (L1 entry {i})")
        }) {
            continue;
        }
        if active {
            w.active_l2.push(off);
        }
        let l2 = img.l2(off)?.clone();
        for (j, &e2) in l2.iter().enumerate() {
            if e2 & COMPRESSED != 0 {
                let coff = e2 & ((1u64 << shift) - 1);
                let sectors = ((e2 >> shift) & csize_mask) + 1;
                let clen = sectors * 512 - (coff & 511);
                if w.count(coff, clen, USE_COMPRESSED, Kind::Mapping, &|| {
                    format!("compressed cluster (L2 table {off:#x} entry {j})")
                }) && active
                {
                    w.allocated += 1;
                    w.compressed += 1;
                }
                continue;
            }
            if e2 & L2_RESERVED != 0 {
                w.problem(
                    Kind::Mapping,
                    format!("ERROR L2 table {off:#x} entry {j} ({e2:#x}) has reserved bits set"),
                );
                continue;
            }
            let d = e2 & OFFSET_MASK;
            if d == 0 {
                continue;
            }
            if !d.is_multiple_of(cs) {
                w.problem(
                    Kind::Mapping,
                    format!("ERROR offset={d:#x}: data cluster is not properly aligned; L2 entry corrupted"),
                );
                continue;
            }
            if w.count(d, cs, USE_DATA, Kind::Mapping, &|| {
                format!("data cluster (L2 table {off:#x} entry {j})")
            }) && active
            {
                w.allocated += 1;
            }
        }
        progress();
    }
    Ok(())
}

/// Count every reference of `st`, with clusters below `limit` existing. Refcount structures are
/// not counted (see [`count_refcount_structure`]).
pub(crate) fn walk(
    img: &mut Image<'_>,
    st: &State,
    limit: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Walk> {
    let cs = img.cs();
    let mut w = Walk {
        cluster_bits: img.h.cluster_bits,
        limit,
        refs: vec![0; limit as usize],
        uses: vec![0; limit as usize],
        problems: Vec::new(),
        allocated: 0,
        compressed: 0,
        active_l2: Vec::new(),
    };
    let total = st.l1.iter().filter(|&&e| e & OFFSET_MASK != 0).count()
        + st.snapshots
            .iter()
            .map(|(_, l1)| l1.iter().filter(|&&e| e & OFFSET_MASK != 0).count())
            .sum::<usize>();
    let mut done = 0u64;
    let mut tick = || {
        done += 1;
        progress(done, total as u64);
    };
    w.count(0, cs, USE_META, Kind::Mapping, &|| "header".into());
    w.count(
        st.l1_offset,
        st.l1.len() as u64 * 8,
        USE_META,
        Kind::Mapping,
        &|| "active L1 table".into(),
    );
    walk_l1(img, &mut w, &st.l1, true, &mut tick)?;
    let (t_off, t_len) = st.snapshot_table;
    w.count(t_off, t_len, USE_META, Kind::Mapping, &|| {
        "snapshot table".into()
    });
    for (s, l1) in &st.snapshots {
        let what = || format!("L1 table of snapshot '{}'", s.name);
        w.count(
            s.l1_offset,
            l1.len() as u64 * 8,
            USE_META,
            Kind::Mapping,
            &what,
        );
        walk_l1(img, &mut w, l1, false, &mut tick)?;
    }
    // Clusters used twice where the format does not allow it. With snapshots, L2 tables and
    // data clusters are legitimately shared; compressed clusters share host clusters anyway.
    let shared_ok = if st.snapshots.is_empty() {
        0
    } else {
        USE_L2 | USE_DATA
    };
    for c in 0..w.refs.len() {
        let (u, r) = (w.uses[c], w.refs[c]);
        let twice =
            r > 1 && (u == USE_META || (u & (USE_L2 | USE_DATA) != 0 && u & shared_ok == 0));
        if u.count_ones() > 1 || twice {
            let m = format!(
                "ERROR cluster {c} (offset {:#x}) is used {r} times, as {}: overlapping allocations",
                (c as u64) * cs,
                use_names(u)
            );
            w.problem(Kind::Mapping, m);
        }
    }
    Ok(w)
}

fn use_names(u: u8) -> String {
    let names = [
        (USE_META, "metadata"),
        (USE_L2, "L2 table"),
        (USE_DATA, "data"),
        (USE_COMPRESSED, "compressed data"),
        (USE_REFCOUNT, "refcount structure"),
    ];
    names
        .iter()
        .filter(|(b, _)| u & b != 0)
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join(" and ")
}

/// The refcount stored for every cluster (index = cluster), after counting the refcount table
/// and blocks themselves into `w`. Damage here is [`Kind::Refcount`]: repair rebuilds them.
fn count_refcount_structure(img: &Image<'_>, w: &mut Walk) -> Result<Vec<u64>> {
    let cs = img.cs();
    let bits = img.h.refcount_bits as u64;
    let per_block = cs * 8 / bits;
    let rt_off = img.h.refcount_table_offset;
    let rt_len = u64::from(img.h.refcount_table_clusters) * cs;
    let mut rc = vec![0u64; w.limit as usize];
    if !w.count(rt_off, rt_len, USE_REFCOUNT, Kind::Refcount, &|| {
        "refcount table".into()
    }) {
        return Ok(rc);
    }
    let table = bytes_to_entries(&img.read(rt_off, rt_len, "refcount table")?);
    for (i, &e) in table.iter().enumerate() {
        let off = e & !REFT_RESERVED;
        if e & REFT_RESERVED != 0 || !off.is_multiple_of(cs) {
            w.problem(
                Kind::Refcount,
                format!("ERROR refcount table entry {i} ({e:#x}) is invalid"),
            );
            continue;
        }
        if off == 0 {
            continue;
        }
        if !w.count(off, cs, USE_REFCOUNT, Kind::Refcount, &|| {
            format!("refcount block {i}")
        }) {
            continue;
        }
        let block = img.read(off, cs, "refcount block")?;
        for k in 0..per_block {
            let c = i as u64 * per_block + k;
            if c >= w.limit {
                break;
            }
            rc[c as usize] = get_refcount(&block, k, bits);
        }
    }
    // Refcount structures must not overlap anything else either.
    for c in 0..w.refs.len() {
        let u = w.uses[c];
        if u & USE_REFCOUNT != 0 && (u != USE_REFCOUNT || w.refs[c] > 1) {
            let m = format!(
                "ERROR cluster {c} (offset {:#x}) is used {} times, as {}: the refcount structure overlaps",
                (c as u64) * cs,
                w.refs[c],
                use_names(u)
            );
            w.problem(Kind::Refcount, m);
        }
    }
    Ok(rc)
}

fn get_refcount(block: &[u8], k: u64, bits: u64) -> u64 {
    if bits < 8 {
        let bit = k * bits;
        (u64::from(block[(bit / 8) as usize]) >> (bit % 8)) & ((1 << bits) - 1)
    } else {
        let n = (bits / 8) as usize;
        let at = k as usize * n;
        block[at..at + n]
            .iter()
            .fold(0u64, |v, &b| (v << 8) | u64::from(b))
    }
}

fn set_refcount(block: &mut [u8], k: u64, bits: u64, v: u64) {
    if bits < 8 {
        let bit = k * bits;
        block[(bit / 8) as usize] |= (v << (bit % 8)) as u8;
    } else {
        let n = (bits / 8) as usize;
        let at = k as usize * n;
        block[at..at + n].copy_from_slice(&v.to_be_bytes()[8 - n..]);
    }
}

/// What `kvmbox disk check` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Every inconsistency, in QEMU's wording where QEMU reports the same.
    pub problems: Vec<Problem>,
    /// Leaked clusters.
    pub leaks: u64,
    /// Corruptions (refcount and mapping problems).
    pub corruptions: u64,
    /// Whether every corruption is one repair may fix (no mapping damage).
    pub repairable: bool,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Of them, mapped by the active L1 table.
    pub allocated_clusters: u64,
    /// Of them, compressed.
    pub compressed_clusters: u64,
    /// End of the last cluster in use.
    pub image_end_offset: u64,
}

impl Report {
    /// Nothing found.
    pub fn clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Compare the references of the image's current state with its refcounts and COPIED flags.
pub(crate) fn check(img: &mut Image<'_>, progress: &mut dyn FnMut(u64, u64)) -> Result<Report> {
    let cs = img.cs();
    let st = img.state()?;
    let mut w = walk(img, &st, img.end_cluster(), progress)?;
    let rc = count_refcount_structure(img, &mut w)?;
    let mut leaks = 0;
    for (c, &stored) in rc.iter().enumerate() {
        let r = w.reference(c as u64);
        if stored > r {
            leaks += 1;
            w.problem(
                Kind::Leak,
                format!("Leaked cluster {c} refcount={stored} reference={r}"),
            );
        } else if stored < r {
            w.problem(
                Kind::Refcount,
                format!("ERROR cluster {c} refcount={stored} reference={r}"),
            );
        }
    }
    let stored = |off: u64| rc.get((off / cs) as usize).copied().unwrap_or(0);
    for (i, &e) in st.l1.iter().enumerate() {
        let off = e & OFFSET_MASK;
        if off == 0 || !off.is_multiple_of(cs) || e & L1_RESERVED != 0 {
            continue;
        }
        let r = stored(off);
        if (r == 1) != (e & COPIED != 0) {
            w.problem(
                Kind::Refcount,
                format!("ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={r}"),
            );
        }
    }
    let active: BTreeSet<u64> = w.active_l2.iter().copied().collect();
    for off in active {
        let l2 = img.l2(off)?.clone();
        for &e in &l2 {
            let d = e & OFFSET_MASK;
            if e & COMPRESSED != 0 {
                if e & COPIED != 0 {
                    w.problem(
                        Kind::Refcount,
                        format!("ERROR compressed cluster with OFLAG_COPIED: l2_entry={e:x}"),
                    );
                }
                continue;
            }
            if d == 0 || !d.is_multiple_of(cs) || e & L2_RESERVED != 0 {
                continue;
            }
            let r = stored(d);
            if (r == 1) != (e & COPIED != 0) {
                w.problem(
                    Kind::Refcount,
                    format!("ERROR OFLAG_COPIED data cluster: l2_entry={e:x} refcount={r}"),
                );
            }
        }
    }
    let last_used = w
        .refs
        .iter()
        .rposition(|&r| r > 0)
        .map_or(0, |c| c as u64 + 1);
    let corruptions = w.problems.iter().filter(|p| p.kind != Kind::Leak).count() as u64;
    Ok(Report {
        repairable: !w.problems.iter().any(|p| p.kind == Kind::Mapping),
        leaks,
        corruptions,
        problems: w.problems,
        total_clusters: st.size.div_ceil(cs),
        allocated_clusters: w.allocated,
        compressed_clusters: w.compressed,
        image_end_offset: last_used * cs,
    })
}

/// Allocate `len` bytes (whole clusters) at cluster `*next`, returning the offset.
pub(crate) fn alloc(next: &mut u64, len: u64, cluster_bits: u32) -> u64 {
    let off = *next << cluster_bits;
    *next += len.div_ceil(1 << cluster_bits).max(1);
    off
}

/// Switch the image to `st`: write `new` (structures `st` refers to, placed at or after the
/// old end of the file by [`alloc`], ending before cluster `end`), a new refcount structure,
/// the active L1 table if it is new or its flags change, and the header. Refuses a state
/// whose tables are damaged. Clears the dirty bit.
pub(crate) fn commit(
    img: &mut Image<'_>,
    st: &State,
    new: &[(u64, Vec<u8>)],
    end: u64,
) -> Result<()> {
    let cs = img.cs();
    let w = walk(img, st, end, &mut |_, _| {})?;
    if let Some(p) = w.problems.iter().find(|p| p.kind == Kind::Mapping) {
        return Err(Error::image(
            &img.path,
            format!("refusing to change damaged metadata: {}", p.message),
        ));
    }
    let bits = u64::from(img.h.refcount_bits);
    let per_block = cs * 8 / bits;
    // A refcount table and blocks covering everything, themselves included.
    let (mut rt_cl, mut nb_rb) = (1u64, 0u64);
    loop {
        let total = end + rt_cl + nb_rb;
        let need_rb = total.div_ceil(per_block);
        let need_rt = (need_rb * 8).div_ceil(cs).max(1);
        if (need_rb, need_rt) == (nb_rb, rt_cl) {
            break;
        }
        (nb_rb, rt_cl) = (need_rb, need_rt);
    }
    if rt_cl * cs > 8 << 20 {
        return Err(Error::image(
            &img.path,
            "the refcount table would exceed 8 MiB",
        ));
    }
    let total = end + rt_cl + nb_rb;
    let max = if bits == 64 {
        u64::MAX
    } else {
        (1 << bits) - 1
    };
    let refcount = |c: u64| if c >= end { 1 } else { w.reference(c) };
    if let Some(c) = (0..end).find(|&c| refcount(c) > max) {
        return Err(Error::image(
            &img.path,
            format!(
                "cluster {c} needs refcount {} but refcounts are {bits} bits wide",
                refcount(c)
            ),
        ));
    }
    let rt_off = end * cs;
    let mut table = vec![0u8; (rt_cl * cs) as usize];
    let mut blocks = vec![0u8; (nb_rb * cs) as usize];
    for i in 0..nb_rb {
        table[i as usize * 8..][..8].copy_from_slice(&((end + rt_cl + i) * cs).to_be_bytes());
        let block = &mut blocks[(i * cs) as usize..][..cs as usize];
        for k in 0..per_block {
            let c = i * per_block + k;
            if c < total {
                set_refcount(block, k, bits, refcount(c));
            }
        }
    }
    for (off, b) in new {
        img.write(*off, b)?;
    }
    img.write(rt_off, &table)?;
    img.write(rt_off + rt_cl * cs, &blocks)?;

    // COPIED flags of the active tree: set exactly where the refcount is 1.
    let copied = |e: u64, off: u64| {
        if w.reference(off / cs) == 1 {
            e | COPIED
        } else {
            e & !COPIED
        }
    };
    let want_l1: Vec<u64> = st
        .l1
        .iter()
        .map(|&e| match e & OFFSET_MASK {
            0 => e & !COPIED,
            off => copied(e, off),
        })
        .collect();
    let mut l2_updates = Vec::new();
    for &off in BTreeSet::from_iter(w.active_l2.iter().copied()).iter() {
        let old = img.l2(off)?.clone();
        let want: Vec<u64> = old
            .iter()
            .map(|&e| match (e & COMPRESSED != 0, e & OFFSET_MASK) {
                (true, _) => e & !COPIED,
                (false, 0) => e,
                (false, d) => copied(e, d),
            })
            .collect();
        if want != old {
            l2_updates.push((off, old, want));
        }
    }
    let clears_only = |old: &[u64], want: &[u64]| -> Vec<u64> {
        old.iter()
            .zip(want)
            .map(|(&o, &n)| o & (n | !COPIED))
            .collect()
    };
    let l1_new = st.l1_offset != img.h.l1_offset || st.l1.len() as u32 != img.h.l1_size;
    let l1_before = clears_only(&st.l1, &want_l1);
    if l1_new || l1_before != st.l1 {
        img.write(st.l1_offset, &entries_to_bytes(&l1_before))?;
    }
    for (off, old, want) in &l2_updates {
        let before = clears_only(old, want);
        if &before != old {
            img.write(*off, &entries_to_bytes(&before))?;
        }
    }
    img.sync()?;
    // The switch: one write inside the first sector.
    let mut hdr = Vec::with_capacity(48);
    hdr.extend(st.size.to_be_bytes());
    hdr.extend(0u32.to_be_bytes());
    hdr.extend((st.l1.len() as u32).to_be_bytes());
    hdr.extend(st.l1_offset.to_be_bytes());
    hdr.extend(rt_off.to_be_bytes());
    hdr.extend((rt_cl as u32).to_be_bytes());
    hdr.extend((st.snapshots.len() as u32).to_be_bytes());
    hdr.extend(st.snapshot_table.0.to_be_bytes());
    img.write(24, &hdr)?;
    img.sync()?;
    if want_l1 != l1_before {
        img.write(st.l1_offset, &entries_to_bytes(&want_l1))?;
    }
    for (off, old, want) in &l2_updates {
        if clears_only(old, want) != *want {
            img.write(*off, &entries_to_bytes(want))?;
        }
    }
    if img.h.dirty() {
        set_dirty(img.file, &img.path, false)?;
    }
    img.sync()?;
    // Reload what changed.
    img.h = Header::read(img.file, &img.path)?;
    img.file_len = crate::open::image_len(img.file, &img.path)?;
    img.l2_cache.clear();
    Ok(())
}

/// Set or clear the dirty bit (version 3 images) and sync.
pub(crate) fn set_dirty(file: &File, path: &Path, dirty: bool) -> Result<()> {
    let mut b = [0u8; 8];
    file.read_exact_at(&mut b, 72)
        .map_err(Error::io("reading the header of", path))?;
    let mut f = u64::from_be_bytes(b);
    if dirty {
        f |= INCOMPAT_DIRTY;
    } else {
        f &= !INCOMPAT_DIRTY;
    }
    file.write_all_at(&f.to_be_bytes(), 72)
        .map_err(Error::io("writing the header of", path))?;
    file.sync_data().map_err(Error::io("syncing", path))
}

/// Repair the image: rebuild refcounts and COPIED flags from the tables, if the tables are
/// sound (see [`Kind`]). Returns the report from before the repair; an error if it was not
/// repairable.
pub(crate) fn repair(img: &mut Image<'_>, progress: &mut dyn FnMut(u64, u64)) -> Result<Report> {
    let before = check(img, progress)?;
    if before.clean() && !img.h.dirty() {
        return Ok(before);
    }
    if !before.repairable {
        return Ok(before);
    }
    let st = img.state()?;
    let end = img.end_cluster();
    commit(img, &st, &[], end)?;
    Ok(before)
}
