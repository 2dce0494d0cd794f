//! Microsoft VHD (Virtual PC / Hyper-V gen 1), fixed and dynamic: a 512-byte big-endian
//! footer at the end (and, for dynamic disks, a copy at 0), a dynamic header with the block
//! allocation table (u32 sector numbers), and blocks of data each preceded by a sector bitmap.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{be32, be64, read_table, BlockMap, Layout, Loc, MAX_BLOCK};
use crate::{io_err, Error, Result};

/// The footer's cookie.
pub(crate) const COOKIE: &[u8; 8] = b"conectix";
const TYPE_FIXED: u32 = 2;
const TYPE_DYNAMIC: u32 = 3;
const UNALLOCATED: u32 = 0xffff_ffff;

pub(crate) struct Vhd {
    block: u64,
    /// Dynamic: the BAT, and the bytes of sector bitmap before each block's data.
    bat: Option<(Vec<u32>, u64)>,
}

impl Vhd {
    pub(crate) fn open(file: File, path: &Path) -> Result<(Layout, Self)> {
        let bad = |p: String| Error::image(path, format!("bad VHD: {p}"));
        let len = crate::open::image_len(&file, path)?;
        let mut f = [0u8; 512];
        // The footer is the last 512 bytes (511 for images from old tools).
        if len < 512 || file.read_exact_at(&mut f, len - 512).is_err() || &f[..8] != COOKIE {
            file.read_exact_at(&mut f, 0)
                .map_err(|_| bad("file too short".into()))?;
            if &f[..8] != COOKIE {
                return Err(bad("no footer".into()));
            }
        }
        let size = be64(&f, 48);
        let kind = be32(&f, 60);
        match kind {
            TYPE_FIXED => {
                if size > len - 512 {
                    return Err(bad(format!("size {size} larger than the file")));
                }
                let block = 1 << 21;
                let layout = Layout {
                    files: vec![file],
                    size,
                    block,
                };
                Ok((layout, Self { block, bat: None }))
            }
            TYPE_DYNAMIC => {
                let dh_off = be64(&f, 16);
                let mut d = [0u8; 1024];
                file.read_exact_at(&mut d, dh_off)
                    .map_err(|_| bad(format!("dynamic header at {dh_off:#x} past the end")))?;
                if &d[..8] != b"cxsparse" {
                    return Err(bad("no dynamic header".into()));
                }
                let bat_off = be64(&d, 16);
                let entries = u64::from(be32(&d, 28));
                let block = u64::from(be32(&d, 32));
                if !block.is_power_of_two() || !(512..=MAX_BLOCK).contains(&block) {
                    return Err(bad(format!("block size {block}")));
                }
                if entries.checked_mul(block).is_none_or(|s| s < size) {
                    return Err(bad(format!(
                        "{entries} blocks do not cover the size {size}"
                    )));
                }
                let raw = read_table(
                    &file,
                    path,
                    "VHD block allocation table",
                    bat_off,
                    entries,
                    4,
                )?;
                let bat = raw.chunks_exact(4).map(|c| be32(c, 0)).collect();
                let bitmap = (block / 512).div_ceil(8).next_multiple_of(512);
                let layout = Layout {
                    files: vec![file],
                    size,
                    block,
                };
                Ok((
                    layout,
                    Self {
                        block,
                        bat: Some((bat, bitmap)),
                    },
                ))
            }
            other => Err(bad(format!(
                "disk type {other} (fixed and dynamic are supported; differencing is not)"
            ))),
        }
    }
}

impl BlockMap for Vhd {
    fn lookup(&self, index: u64) -> io::Result<Loc> {
        let Some((bat, bitmap)) = &self.bat else {
            return Ok(Loc::Data {
                file: 0,
                offset: index * self.block,
            });
        };
        let e = *bat
            .get(index as usize)
            .ok_or_else(|| io_err(io::ErrorKind::InvalidInput, "block past the table"))?;
        Ok(if e == UNALLOCATED {
            Loc::Zero
        } else {
            Loc::Data {
                file: 0,
                offset: u64::from(e) * 512 + bitmap,
            }
        })
    }
}
