//! Microsoft VHDX (Hyper-V): two headers (the newer wins), a region table locating the block
//! allocation table (BAT) and the metadata (block size, disk size, sector size), and payload
//! blocks whose BAT entries interleave with sector-bitmap entries. Images with a log to replay
//! and differencing images are refused.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{le16, le32, le64, read_table, BlockMap, Layout, Loc, MAX_BLOCK};
use crate::{io_err, Error, Result};

/// The file identifier at offset 0.
pub(crate) const SIGNATURE: &[u8; 8] = b"vhdxfile";
const BAT_GUID: [u8; 16] = [
    0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08,
];
const METADATA_GUID: [u8; 16] = [
    0x06, 0xa2, 0x7c, 0x8b, 0x90, 0x47, 0x9a, 0x4b, 0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e,
];
const FILE_PARAMETERS: [u8; 16] = [
    0x37, 0x67, 0xa1, 0xca, 0x36, 0xfa, 0x43, 0x4d, 0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b,
];
const VIRTUAL_DISK_SIZE: [u8; 16] = [
    0x24, 0x42, 0xa5, 0x2f, 0x1b, 0xcd, 0x76, 0x48, 0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8,
];
const LOGICAL_SECTOR_SIZE: [u8; 16] = [
    0x1d, 0xbf, 0x41, 0x81, 0x6f, 0xa9, 0x09, 0x47, 0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f,
];
const PAYLOAD_FULLY_PRESENT: u64 = 6;

pub(crate) struct Vhdx {
    chunk_ratio: u64,
    bat: Vec<u64>,
}

impl Vhdx {
    pub(crate) fn open(file: File, path: &Path) -> Result<(Layout, Self)> {
        let bad = |p: String| Error::image(path, format!("bad VHDX: {p}"));
        let read = |at: u64, len: usize| -> Result<Vec<u8>> {
            let mut v = vec![0u8; len];
            file.read_exact_at(&mut v, at)
                .map_err(|_| bad(format!("structure at {at:#x} past the end of the file")))?;
            Ok(v)
        };
        if read(0, 8)? != SIGNATURE {
            return Err(bad("no file identifier".into()));
        }
        // The current header: the valid one with the larger sequence number.
        let headers: Vec<Vec<u8>> = [64u64 << 10, 128 << 10]
            .iter()
            .filter_map(|&at| read(at, 4096).ok())
            .filter(|h| &h[..4] == b"head")
            .collect();
        let h = headers
            .iter()
            .max_by_key(|h| le64(h, 8))
            .ok_or_else(|| bad("no valid header".into()))?;
        if h[48..64].iter().any(|&b| b != 0) {
            return Err(bad(
                "the log has entries to replay (not closed cleanly); open it in Hyper-V or `qemu-img check -r all` it first".into(),
            ));
        }
        let rt = read(192 << 10, 64 << 10)?;
        if &rt[..4] != b"regi" {
            return Err(bad("no region table".into()));
        }
        let n = (le32(&rt, 8) as usize).min(2047);
        let region = |guid: &[u8; 16]| {
            (0..n)
                .map(|i| &rt[16 + i * 32..48 + i * 32])
                .find(|e| &e[..16] == guid)
                .map(|e| (le64(e, 16), u64::from(le32(e, 24))))
        };
        let (bat_off, bat_len) = region(&BAT_GUID).ok_or_else(|| bad("no BAT region".into()))?;
        let (md_off, md_len) =
            region(&METADATA_GUID).ok_or_else(|| bad("no metadata region".into()))?;
        let md = read(md_off, md_len.min(1 << 20) as usize)?;
        if &md[..8] != b"metadata" {
            return Err(bad("no metadata table".into()));
        }
        let entries = (le16(&md, 10) as usize).min(2047);
        let item = |guid: &[u8; 16], len: usize| -> Result<&[u8]> {
            (0..entries)
                .map(|i| &md[32 + i * 32..64 + i * 32])
                .find(|e| &e[..16] == guid)
                .and_then(|e| {
                    let at = le32(e, 16) as usize;
                    md.get(at..at + len)
                })
                .ok_or_else(|| bad("metadata item missing or outside the region".into()))
        };
        let params = item(&FILE_PARAMETERS, 8)?;
        let block = u64::from(le32(params, 0));
        if le32(params, 4) & 2 != 0 {
            return Err(bad("differencing images are not supported".into()));
        }
        let size = le64(item(&VIRTUAL_DISK_SIZE, 8)?, 0);
        let sector = u64::from(le32(item(&LOGICAL_SECTOR_SIZE, 4)?, 0));
        if !block.is_power_of_two() || !(1 << 20..=MAX_BLOCK).contains(&block) {
            return Err(bad(format!("block size {block}")));
        }
        if sector != 512 && sector != 4096 {
            return Err(bad(format!("logical sector size {sector}")));
        }
        if size > crate::qcow2::MAX_SIZE {
            return Err(bad(format!("virtual size {size}")));
        }
        let chunk_ratio = (1u64 << 23) * sector / block;
        let blocks = size.div_ceil(block);
        let total = blocks + blocks.saturating_sub(1) / chunk_ratio + 1;
        if total * 8 > bat_len {
            return Err(bad(format!(
                "BAT region of {bat_len} bytes too small for {total} entries"
            )));
        }
        let raw = read_table(&file, path, "VHDX BAT", bat_off, total, 8)?;
        let bat = raw.chunks_exact(8).map(|c| le64(c, 0)).collect();
        let layout = Layout {
            files: vec![file],
            size,
            block,
        };
        Ok((layout, Self { chunk_ratio, bat }))
    }
}

impl BlockMap for Vhdx {
    fn lookup(&self, index: u64) -> io::Result<Loc> {
        let e = *self
            .bat
            .get((index + index / self.chunk_ratio) as usize)
            .ok_or_else(|| io_err(io::ErrorKind::InvalidInput, "block past the BAT"))?;
        Ok(if e & 7 == PAYLOAD_FULLY_PRESENT {
            Loc::Data {
                file: 0,
                offset: (e >> 20) << 20,
            }
        } else {
            // Not present, undefined, zero, unmapped: zeroes (no parent to read from).
            Loc::Zero
        })
    }
}
