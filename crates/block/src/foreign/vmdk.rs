//! VMware VMDK: hosted sparse extents (monolithicSparse, and streamOptimized with its
//! deflate-compressed grains and the grain directory at the end, as in OVA files), and text
//! descriptors naming FLAT extents (monolithicFlat).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{le32, le64, read_table, BlockMap, Layout, Loc, MAX_BLOCK};
use crate::{io_err, Error, Result};

/// "KDMV" read little-endian.
const MAGIC: &[u8; 4] = b"KDMV";
const GD_AT_END: u64 = u64::MAX;
const FLAG_COMPRESSED: u32 = 1 << 16;
const FLAG_MARKERS: u32 = 1 << 17;
const SECTOR: u64 = 512;

enum Kind {
    /// Grain tables, read fully at open: grain number -> sector (0 unallocated, 1 zero).
    Sparse { grains: Vec<u32>, compressed: bool },
    /// Flat extents, in order: (file index, first disk byte, bytes, offset in the file).
    Flat(Vec<(usize, u64, u64, u64)>),
}

pub(crate) struct Vmdk {
    block: u64,
    /// The image file (compressed grain markers are read from it).
    file: File,
    kind: Kind,
}

fn sparse_header(file: &File, path: &Path, at: u64) -> Result<[u8; 512]> {
    let mut h = [0u8; 512];
    file.read_exact_at(&mut h, at)
        .map_err(|_| Error::image(path, format!("bad VMDK: header at {at:#x} past the end")))?;
    Ok(h)
}

impl Vmdk {
    pub(crate) fn open(file: File, path: &Path) -> Result<(Layout, Self)> {
        let mut head = [0u8; 4];
        file.read_exact_at(&mut head, 0)
            .map_err(|_| Error::image(path, "bad VMDK: file too short"))?;
        if &head == MAGIC {
            Self::open_sparse(file, path)
        } else {
            Self::open_descriptor(file, path)
        }
    }

    fn open_sparse(file: File, path: &Path) -> Result<(Layout, Self)> {
        let bad = |p: String| Error::image(path, format!("bad VMDK: {p}"));
        let mut h = sparse_header(&file, path, 0)?;
        if le64(&h, 56) == GD_AT_END {
            // streamOptimized: the real header is the footer, 1024 bytes before the end.
            let len = crate::open::image_len(&file, path)?;
            let f = sparse_header(
                &file,
                path,
                len.checked_sub(1024)
                    .ok_or_else(|| bad("no footer".into()))?,
            )?;
            if &f[..4] != MAGIC {
                return Err(bad("grain directory at the end but no footer".into()));
            }
            h = f;
        }
        let version = le32(&h, 4);
        if !(1..=3).contains(&version) {
            return Err(bad(format!("version {version}")));
        }
        let flags = le32(&h, 8);
        let capacity = le64(&h, 12);
        let grain = le64(&h, 20);
        let gtes = u64::from(le32(&h, 44));
        let gd = le64(&h, 56);
        let compressed = flags & FLAG_COMPRESSED != 0;
        if compressed && u16::from_le_bytes([h[77], h[78]]) != 1 {
            return Err(bad("unknown compression algorithm".into()));
        }
        if compressed && flags & FLAG_MARKERS == 0 {
            return Err(bad("compressed grains without markers".into()));
        }
        let block = grain.checked_mul(SECTOR).unwrap_or(0);
        if !block.is_power_of_two() || !(4096..=MAX_BLOCK).contains(&block) {
            return Err(bad(format!("grain of {grain} sectors")));
        }
        if gtes == 0 || gtes > 4096 {
            return Err(bad(format!("{gtes} entries per grain table")));
        }
        let size = capacity
            .checked_mul(SECTOR)
            .filter(|&s| s <= crate::qcow2::MAX_SIZE)
            .ok_or_else(|| bad(format!("capacity {capacity} sectors")))?;
        let n_grains = size.div_ceil(block);
        let n_tables = n_grains.div_ceil(gtes);
        let gd_bytes = read_table(
            &file,
            path,
            "VMDK grain directory",
            gd.checked_mul(SECTOR)
                .ok_or_else(|| bad(format!("grain directory at sector {gd}")))?,
            n_tables,
            4,
        )?;
        let mut grains = Vec::with_capacity(n_grains as usize);
        for t in gd_bytes.chunks_exact(4).map(|c| le32(c, 0)) {
            if t == 0 {
                grains.extend(std::iter::repeat_n(0, gtes as usize));
                continue;
            }
            let gt = read_table(
                &file,
                path,
                "VMDK grain table",
                u64::from(t) * SECTOR,
                gtes,
                4,
            )?;
            grains.extend(gt.chunks_exact(4).map(|c| le32(c, 0)));
        }
        grains.truncate(n_grains as usize);
        let me = Self {
            block,
            file: file.try_clone().map_err(Error::io("reading", path))?,
            kind: Kind::Sparse { grains, compressed },
        };
        let layout = Layout {
            files: vec![file],
            size,
            block,
        };
        Ok((layout, me))
    }

    fn open_descriptor(file: File, path: &Path) -> Result<(Layout, Self)> {
        let bad = |p: String| Error::image(path, format!("bad VMDK descriptor: {p}"));
        let len = crate::open::image_len(&file, path)?;
        if len > 1 << 20 {
            return Err(bad("larger than 1 MiB".into()));
        }
        let mut text = vec![0u8; len as usize];
        file.read_exact_at(&mut text, 0)
            .map_err(Error::io("reading", path))?;
        let text = String::from_utf8_lossy(&text);
        if !text.starts_with("# Disk DescriptorFile") {
            return Err(bad("not a VMDK descriptor".into()));
        }
        let mut files = Vec::new();
        let mut extents = Vec::new();
        let mut pos = 0u64;
        for line in text.lines().map(str::trim) {
            let Some(access) = ["RW ", "RDONLY ", "NOACCESS "]
                .iter()
                .find(|a| line.starts_with(**a))
            else {
                continue;
            };
            // RW <sectors> <TYPE> "<file>" [<offset>]
            let rest = &line[access.len()..];
            let mut it = rest.splitn(3, ' ');
            let sectors: u64 = it
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad(format!("extent line '{line}'")))?;
            let kind = it.next().unwrap_or_default();
            let tail = it.next().unwrap_or_default();
            let bytes = sectors
                .checked_mul(SECTOR)
                .ok_or_else(|| bad(format!("extent line '{line}'")))?;
            match kind {
                "FLAT" => {
                    let (name, off) = match tail.strip_prefix('"').and_then(|t| t.split_once('"')) {
                        Some((n, o)) => (n, o.trim()),
                        None => return Err(bad(format!("extent line '{line}'"))),
                    };
                    let offset: u64 = if off.is_empty() {
                        0
                    } else {
                        off.parse::<u64>()
                            .ok()
                            .and_then(|o| o.checked_mul(SECTOR))
                            .ok_or_else(|| bad(format!("extent offset in '{line}'")))?
                    };
                    let epath = crate::qcow2::resolve_backing(path, name);
                    let f = crate::open_image_file(&epath, false)?;
                    files.push(f);
                    extents.push((files.len(), pos, bytes, offset));
                }
                "ZERO" => extents.push((usize::MAX, pos, bytes, 0)),
                other => {
                    return Err(bad(format!(
                        "extent type {other} (FLAT and ZERO are supported in descriptors)"
                    )))
                }
            }
            pos = pos
                .checked_add(bytes)
                .ok_or_else(|| bad("size overflows".into()))?;
        }
        if extents.is_empty() {
            return Err(bad("no extents".into()));
        }
        // File 0 is the descriptor itself; extents index from 1.
        let me_file = file.try_clone().map_err(Error::io("reading", path))?;
        files.insert(0, file);
        // Blocks as large as the extents' alignment allows (lookups per 512 bytes are slow).
        let align = extents.iter().fold(1u64 << 20, |a, e| {
            a.min(1 << (e.1 | e.2 | e.3 | (1 << 20)).trailing_zeros())
        });
        let me = Self {
            block: align,
            file: me_file,
            kind: Kind::Flat(extents),
        };
        let layout = Layout {
            files,
            size: pos,
            block: align,
        };
        Ok((layout, me))
    }
}

impl BlockMap for Vmdk {
    fn lookup(&self, index: u64) -> io::Result<Loc> {
        match &self.kind {
            Kind::Sparse { grains, compressed } => {
                let g = *grains
                    .get(index as usize)
                    .ok_or_else(|| io_err(io::ErrorKind::InvalidInput, "grain past the table"))?;
                if g <= 1 {
                    return Ok(Loc::Zero);
                }
                let at = u64::from(g) * SECTOR;
                if !compressed {
                    return Ok(Loc::Data {
                        file: 0,
                        offset: at,
                    });
                }
                // A grain marker: u64 LBA, u32 size, then the deflate stream.
                let mut m = [0u8; 12];
                self.file.read_exact_at(&mut m, at)?;
                Ok(Loc::Deflate {
                    offset: at + 12,
                    len: u64::from(le32(&m, 8)),
                })
            }
            Kind::Flat(extents) => {
                let pos = index * self.block;
                let &(file, start, _, off) = extents
                    .iter()
                    .find(|e| e.1 <= pos && pos < e.1 + e.2)
                    .ok_or_else(|| io_err(io::ErrorKind::InvalidInput, "past the extents"))?;
                if file == usize::MAX {
                    return Ok(Loc::Zero);
                }
                Ok(Loc::Data {
                    file,
                    offset: off + (pos - start),
                })
            }
        }
    }
}
