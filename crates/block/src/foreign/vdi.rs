//! VirtualBox VDI (dynamic and fixed): a header, a block map of u32 (little-endian) block
//! numbers, and the blocks.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{le32, le64, read_table, BlockMap, Layout, Loc, MAX_BLOCK};
use crate::{io_err, Error, Result};

/// Signature at 0x40.
pub(crate) const SIGNATURE: u32 = 0xbeda_107f;
const UNALLOCATED: u32 = 0xffff_ffff;
const DISCARDED: u32 = 0xffff_fffe;

pub(crate) struct Vdi {
    block: u64,
    data: u64,
    map: Vec<u32>,
}

impl Vdi {
    pub(crate) fn open(file: File, path: &Path) -> Result<(Layout, Self)> {
        let bad = |p: String| Error::image(path, format!("bad VDI header: {p}"));
        let mut h = vec![0u8; 0x190];
        file.read_exact_at(&mut h, 0)
            .map_err(|_| bad("file shorter than the header".into()))?;
        if le32(&h, 0x40) != SIGNATURE {
            return Err(bad("no VDI signature".into()));
        }
        let version = le32(&h, 0x44);
        if version != 0x0001_0001 {
            return Err(bad(format!("version {version:#x} (kvmbox reads 1.1)")));
        }
        let kind = le32(&h, 0x4c);
        if kind != 1 && kind != 2 {
            return Err(bad(format!(
                "image type {kind} (1 dynamic and 2 fixed are supported)"
            )));
        }
        let (bmap, data) = (u64::from(le32(&h, 0x154)), u64::from(le32(&h, 0x158)));
        let sector = le32(&h, 0x168);
        let size = le64(&h, 0x170);
        let block = u64::from(le32(&h, 0x178));
        let extra = u64::from(le32(&h, 0x17c));
        let blocks = u64::from(le32(&h, 0x180));
        if sector != 512 {
            return Err(bad(format!("sector size {sector}")));
        }
        if !block.is_power_of_two() || !(512..=MAX_BLOCK).contains(&block) || extra != 0 {
            return Err(bad(format!("block size {block} (+{extra} extra)")));
        }
        if blocks.checked_mul(block).is_none_or(|s| s < size) {
            return Err(bad(format!(
                "{blocks} blocks of {block} bytes do not cover the size {size}"
            )));
        }
        let raw = read_table(&file, path, "VDI block map", bmap, blocks, 4)?;
        let map = raw.chunks_exact(4).map(|c| le32(c, 0)).collect();
        let layout = Layout {
            files: vec![file],
            size,
            block,
        };
        Ok((layout, Self { block, data, map }))
    }
}

impl BlockMap for Vdi {
    fn lookup(&self, index: u64) -> io::Result<Loc> {
        let e = *self
            .map
            .get(index as usize)
            .ok_or_else(|| io_err(io::ErrorKind::InvalidInput, "block past the map"))?;
        Ok(match e {
            UNALLOCATED | DISCARDED => Loc::Zero,
            n => Loc::Data {
                file: 0,
                offset: self.data + u64::from(n) * self.block,
            },
        })
    }
}
