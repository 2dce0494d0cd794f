//! The state file: magic, version, length, postcard payload, CRC-64.

use crate::{io_err, Error, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::Write;
use std::path::Path;

/// The first 8 bytes of every state file.
pub const MAGIC: [u8; 8] = *b"KVMBOXSN";
/// The layout of the state this build writes and reads. Bump it whenever a saved struct
/// changes shape: an old file is then refused by name instead of misread, unless its reader
/// knows how to bring that version's payload up to this one ([`read_state_upgrading`]).
/// 3: the devices' rate limiters (a field at the end of the machine state).
pub const FORMAT_VERSION: u32 = 3;

const HEADER: usize = 24;
const TRAILER: usize = 8;
/// Larger state files are refused before being read (a machine's state is a few MiB).
const MAX_FILE: u64 = 1 << 30;

const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

/// Write `state` to `path` (replaced whole: written to a temporary file beside it, synced,
/// then renamed over it, so a crash leaves the old file or the new one).
pub fn write_state<T: Serialize>(path: &Path, state: &T) -> Result<()> {
    let payload = postcard::to_stdvec(state).map_err(|e| Error::Decode {
        path: path.display().to_string(),
        msg: format!("cannot encode: {e}"),
    })?;
    let mut buf = Vec::with_capacity(HEADER + payload.len() + TRAILER);
    buf.extend_from_slice(&MAGIC);
    buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    buf.extend_from_slice(&0u32.to_le_bytes());
    buf.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    buf.extend_from_slice(&payload);
    let crc = CRC.checksum(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());

    let tmp = crate::temporary(path);
    let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(&buf).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Read and check a state file written by [`write_state`]: everything is verified before
/// the state is returned. A file of another format version is refused.
pub fn read_state<T: DeserializeOwned>(path: &Path) -> Result<T> {
    read_state_upgrading(path, &[], |_, _| {})
}

/// [`read_state`], also reading a file of one of the `older` format versions: once the file
/// is checked whole (length, checksum), `upgrade` gets its version and payload and makes the
/// payload this version's (e.g. appends the encoding of a field added at the end), which is
/// then decoded. Any other version is refused.
pub fn read_state_upgrading<T: DeserializeOwned>(
    path: &Path,
    older: &[u32],
    upgrade: impl FnOnce(u32, &mut Vec<u8>),
) -> Result<T> {
    let name = || path.display().to_string();
    let size = std::fs::metadata(path).map_err(io_err(path))?.len();
    if size > MAX_FILE {
        return Err(Error::Length {
            path: name(),
            size,
            expected: MAX_FILE,
        });
    }
    let buf = std::fs::read(path).map_err(io_err(path))?;
    if buf.len() < MAGIC.len() || buf[..MAGIC.len()] != MAGIC {
        return Err(Error::BadMagic(name()));
    }
    if buf.len() < HEADER + TRAILER {
        return Err(Error::Length {
            path: name(),
            size: buf.len() as u64,
            expected: (HEADER + TRAILER) as u64,
        });
    }
    let word = |o: usize| u32::from_le_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
    let version = word(8);
    if version != FORMAT_VERSION && !older.contains(&version) {
        return Err(Error::Version {
            path: name(),
            found: version,
            expected: FORMAT_VERSION,
        });
    }
    let len = u64::from(word(16)) | u64::from(word(20)) << 32;
    let expected = len.saturating_add((HEADER + TRAILER) as u64);
    if buf.len() as u64 != expected {
        return Err(Error::Length {
            path: name(),
            size: buf.len() as u64,
            expected,
        });
    }
    let body = buf.len() - TRAILER;
    let mut crc = [0u8; 8];
    crc.copy_from_slice(&buf[body..]);
    if CRC.checksum(&buf[..body]) != u64::from_le_bytes(crc) {
        return Err(Error::Checksum(name()));
    }
    let mut payload = buf[HEADER..body].to_vec();
    if version != FORMAT_VERSION {
        upgrade(version, &mut payload);
    }
    postcard::from_bytes(&payload).map_err(|e| Error::Decode {
        path: name(),
        msg: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct S {
        a: u64,
        b: Vec<u8>,
        c: Option<String>,
    }

    fn sample() -> S {
        S {
            a: 0x1234_5678_9abc,
            b: (0..=255).collect(),
            c: Some("vcpu".into()),
        }
    }

    fn dir() -> tempdir::Dir {
        tempdir::Dir::new("state")
    }

    mod tempdir {
        /// A directory under the target's temp dir, removed on drop.
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new(tag: &str) -> Self {
                let p = std::env::temp_dir().join(format!(
                    "kvmbox-snapshot-{tag}-{}-{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn round_trip() {
        let d = dir();
        let p = d.0.join("s");
        write_state(&p, &sample()).unwrap();
        assert_eq!(read_state::<S>(&p).unwrap(), sample());
        assert_eq!(&std::fs::read(&p).unwrap()[..8], b"KVMBOXSN");
    }

    #[test]
    fn every_damage_is_refused_by_name() {
        let d = dir();
        let p = d.0.join("s");
        write_state(&p, &sample()).unwrap();
        let good = std::fs::read(&p).unwrap();
        let check = |bytes: &[u8], want: &str| {
            std::fs::write(&p, bytes).unwrap();
            let e = read_state::<S>(&p).unwrap_err();
            assert!(e.to_string().contains(want), "{want}: got {e}");
            assert!(e.is_user_error(), "{e}");
        };
        check(&good[..good.len() - 1], "truncated");
        check(&good[..30], "truncated");
        check(&good[..4], "bad magic");
        check(b"", "bad magic");
        let mut v = good.clone();
        v[8] = 99;
        check(
            &v,
            &format!("format version 99, this kvmbox reads version {FORMAT_VERSION}"),
        );
        let mut v = good.clone();
        v[40] ^= 0x10;
        check(&v, "CRC-64 mismatch");
        let mut v = good.clone();
        v.push(0);
        check(&v, "truncated or padded");
        let mut v = good.clone();
        v[0] = b'X';
        check(&v, "bad magic");
        // A well-formed file whose payload is not this type.
        write_state(&p, &7u8).unwrap();
        let e = read_state::<S>(&p).unwrap_err();
        assert!(e.to_string().contains("cannot decode"), "{e}");
        let missing = read_state::<S>(&d.0.join("nope")).unwrap_err();
        assert!(missing.is_user_error() && missing.to_string().contains("nope"));
    }

    /// A file of an older version that the reader knows is upgraded; others are still refused.
    #[test]
    fn an_older_version_is_read_through_its_upgrade() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Old {
            a: u64,
        }
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct New {
            a: u64,
            added: Vec<u32>,
        }
        let d = dir();
        let p = d.0.join("s");
        write_state(&p, &Old { a: 7 }).unwrap();
        // Make it an older file: version 2, checksum again.
        let mut v = std::fs::read(&p).unwrap();
        v[8] = 2;
        let body = v.len() - TRAILER;
        let crc = CRC.checksum(&v[..body]).to_le_bytes();
        v[body..].copy_from_slice(&crc);
        std::fs::write(&p, &v).unwrap();
        let e = read_state::<New>(&p).unwrap_err();
        assert!(e.to_string().contains("format version 2"), "{e}");
        let upgraded: New = read_state_upgrading(&p, &[2], |version, payload| {
            assert_eq!(version, 2);
            payload.extend(postcard::to_stdvec(&Vec::<u32>::new()).unwrap());
        })
        .unwrap();
        assert_eq!(
            upgraded,
            New {
                a: 7,
                added: vec![]
            }
        );
        let e = read_state_upgrading::<New>(&p, &[1], |_, _| {}).unwrap_err();
        assert!(e.to_string().contains("format version 2"), "{e}");
    }
}
