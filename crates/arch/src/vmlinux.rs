//! Host-side decompression of a bzImage: the ELF vmlinux inside an LZ4-compressed bzImage, so a
//! guest can start at the kernel proper instead of running the decompressor (tens of millions of
//! instructions, slow on an emulated CPU).

use crate::{Error, Result};
use std::path::Path;

/// LZ4 "legacy" frame magic, the format Linux's `CONFIG_KERNEL_LZ4` payloads use.
const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
/// Largest decompressed block of the legacy format.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// Largest vmlinux we accept (the decompressed size comes from the image).
const MAX_VMLINUX: usize = 1 << 30;

fn u32_at(d: &[u8], o: usize) -> Option<u32> {
    let b = d.get(o..o.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The compressed payload of a bzImage (`payload_offset`/`payload_length` of protocol 2.08+).
fn payload(img: &[u8]) -> std::result::Result<&[u8], String> {
    if img.get(0x202..0x206) != Some(&b"HdrS"[..]) {
        return Err("not a bzImage".into());
    }
    let version = u16::from_le_bytes([img[0x206], img[0x207]]);
    if version < 0x0208 {
        return Err(format!(
            "bzImage boot protocol {}.{:02} does not describe its payload",
            version >> 8,
            version & 0xff
        ));
    }
    let setup_sects = match img[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let setup = (setup_sects + 1) * 512;
    let off = u32_at(img, 0x248).ok_or("truncated bzImage")? as usize;
    let len = u32_at(img, 0x24c).ok_or("truncated bzImage")? as usize;
    let start = setup.checked_add(off).ok_or("bad payload offset")?;
    img.get(start..start.checked_add(len).ok_or("bad payload length")?)
        .ok_or_else(|| "truncated bzImage: payload runs past the end of the file".into())
}

/// Decompress Linux's LZ4 legacy stream: magic, then (u32 compressed size, block)*, then the
/// kernel build's 4-byte decompressed size.
fn unlz4_legacy(data: &[u8]) -> std::result::Result<Vec<u8>, String> {
    if u32_at(data, 0) != Some(LZ4_LEGACY_MAGIC) {
        return Err(
            "payload is not LZ4-compressed (only CONFIG_KERNEL_LZ4 kernels can be decompressed \
             on the host)"
                .into(),
        );
    }
    let total = u32_at(data, data.len().saturating_sub(4)).unwrap_or(0) as usize;
    if total == 0 || total > MAX_VMLINUX {
        return Err(format!("implausible decompressed size {total}"));
    }
    let mut out = vec![0u8; total];
    let (mut pos, mut written) = (4usize, 0usize);
    while let Some(size) = u32_at(data, pos) {
        if size == LZ4_LEGACY_MAGIC {
            pos += 4;
            continue;
        }
        let size = size as usize;
        let Some(block) = data.get(pos + 4..pos + 4 + size) else {
            break; // the trailing decompressed-size word
        };
        let room = (total - written).min(LZ4_LEGACY_BLOCK);
        let n = lz4_flex::block::decompress_into(block, &mut out[written..written + room])
            .map_err(|e| format!("corrupt LZ4 block at payload offset {pos:#x}: {e}"))?;
        written += n;
        pos += 4 + size;
        if written == total {
            break;
        }
    }
    if written != total {
        return Err(format!(
            "LZ4 payload decompressed to {written} bytes, the image says {total}"
        ));
    }
    Ok(out)
}

/// The ELF vmlinux inside the LZ4-compressed bzImage `img` (the bytes of the file at `path`,
/// which only names it in errors).
pub(crate) fn vmlinux_from_bzimage(path: &Path, img: &[u8]) -> Result<Vec<u8>> {
    let err = |msg: String| Error::Kernel {
        path: path.to_path_buf(),
        msg,
    };
    let elf = unlz4_legacy(payload(img).map_err(err)?).map_err(err)?;
    if !elf.starts_with(b"\x7fELF") {
        return Err(err("decompressed payload is not an ELF vmlinux".into()));
    }
    Ok(elf)
}

/// Read the bzImage at `path` and return the ELF vmlinux inside it (LZ4-compressed kernels only,
/// as Debian's are).
pub fn extract_vmlinux(path: &Path) -> Result<Vec<u8>> {
    let img = std::fs::read(path).map_err(|e| Error::Kernel {
        path: path.to_path_buf(),
        msg: crate::io_msg(&e),
    })?;
    vmlinux_from_bzimage(path, &img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_what_it_cannot_decompress() {
        let p = Path::new("k");
        let mut img = vec![0u8; 0x1000];
        let e = vmlinux_from_bzimage(p, &img).unwrap_err().to_string();
        assert_eq!(e, "kernel image k: not a bzImage");
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206] = 0x0f;
        img[0x207] = 0x02;
        img[0x1f1] = 1; // setup = 1 KiB
        img[0x248..0x24c].copy_from_slice(&0x100u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&0x10u32.to_le_bytes());
        img[0x500..0x504].copy_from_slice(&[0x1f, 0x8b, 8, 0]); // gzip
        let e = vmlinux_from_bzimage(p, &img).unwrap_err().to_string();
        assert!(e.contains("not LZ4-compressed"), "{e}");
        img[0x24c..0x250].copy_from_slice(&0x10_0000u32.to_le_bytes());
        let e = vmlinux_from_bzimage(p, &img).unwrap_err().to_string();
        assert!(e.contains("payload runs past the end"), "{e}");
    }

    #[test]
    fn decompresses_a_legacy_stream() {
        let data: Vec<u8> = b"\x7fELF"
            .iter()
            .copied()
            .chain((0..100_000u32).map(|i| (i / 300) as u8))
            .collect();
        let block = lz4_flex::block::compress(&data);
        let mut s = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        s.extend_from_slice(&(block.len() as u32).to_le_bytes());
        s.extend_from_slice(&block);
        s.extend_from_slice(&(data.len() as u32).to_le_bytes());
        assert_eq!(unlz4_legacy(&s).unwrap(), data);
        // A corrupt block is an error, not a panic.
        let mut bad = s.clone();
        bad[10] ^= 0xff;
        bad[20] ^= 0xff;
        let _ = unlz4_legacy(&bad);
        // A stream that ends early is an error.
        let mut short = s[..8 + block.len()].to_vec();
        short.extend_from_slice(&((data.len() + 5) as u32).to_le_bytes());
        assert!(unlz4_legacy(&short)
            .unwrap_err()
            .contains("decompressed to"));
    }
}
