//! `PATH[,format=raw|qcow2][,ro][,serial=ID][,lock=off][,bw=...][,iops=...]`: one disk, as the CLI, the config
//! file's `disks` and the API's drives all give it.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::{Error, Result};

/// Longest serial (the virtio-blk GET_ID answer is 20 bytes).
pub const SERIAL_MAX: usize = 20;

/// Check a disk serial (`serial=ID`, the API drive's `serial`): 1 to [`SERIAL_MAX`] bytes,
/// no `,` (it would end the `--disk` option).
pub fn check_serial(id: &str) -> std::result::Result<(), String> {
    if id.is_empty() || id.len() > SERIAL_MAX || id.contains(',') {
        return Err(format!(
            "serial '{id}' must be 1 to {SERIAL_MAX} bytes without ','"
        ));
    }
    Ok(())
}

/// An image format kvmbox runs guests on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A plain file: byte N of the file is byte N of the disk.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        })
    }
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            _ => Err(format!("unknown format '{s}' (expected raw or qcow2)")),
        }
    }
}

/// One disk: the image and how to open it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The image file.
    pub path: PathBuf,
    /// The format; `None` detects it from the header once, at open.
    pub format: Option<Format>,
    /// Expose it read-only (and open it read-only).
    pub read_only: bool,
    /// GET_ID answer (1 to [`SERIAL_MAX`] bytes).
    pub serial: Option<String>,
    /// Take QEMU-compatible image locks (default); `lock=off` skips them.
    pub lock: bool,
    /// Rate limits (`bw=`, `iops=` and their `_burst`/`_refill`; none by default).
    pub rate_limiter: kvmbox_ratelimit::RateLimiterConfig,
}

impl DiskSpec {
    /// A read-write, locked, format-detected disk on `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            format: None,
            read_only: false,
            serial: None,
            lock: true,
            rate_limiter: Default::default(),
        }
    }
}

impl FromStr for DiskSpec {
    type Err = Error;

    /// Parse `PATH[,format=raw|qcow2][,ro][,serial=ID][,lock=on|off]` and the rate limits
    /// (`bw=BYTES[,bw_burst=BYTES][,bw_refill=MS][,iops=N][,iops_burst=N][,iops_refill=MS]`).
    fn from_str(s: &str) -> Result<Self> {
        let bad = |problem: String| Error::Spec {
            spec: s.to_string(),
            problem,
        };
        let mut parts = s.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(bad("missing image path".into()));
        }
        let mut spec = DiskSpec::new(path);
        for p in parts {
            match p.split_once('=') {
                None if p == "ro" => spec.read_only = true,
                Some(("format", f)) => spec.format = Some(f.parse().map_err(bad)?),
                Some(("serial", id)) => {
                    check_serial(id).map_err(bad)?;
                    spec.serial = Some(id.to_string());
                }
                Some(("lock", "off")) => spec.lock = false,
                Some(("lock", "on")) => spec.lock = true,
                Some(("lock", v)) => return Err(bad(format!("lock={v}: expected on or off"))),
                Some((k, v)) if spec.rate_limiter.set_option(k, v).map_err(bad)? => {}
                _ => {
                    return Err(bad(format!(
                    "unknown option '{p}' (expected format=raw|qcow2, ro, serial=ID, lock=off, \
                     bw=, bw_burst=, bw_refill=, iops=, iops_burst= or iops_refill=)"
                )))
                }
            }
        }
        spec.rate_limiter.check_options("").map_err(bad)?;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_option() {
        let c: DiskSpec = "/img,ro,serial=abc,format=qcow2,lock=off".parse().unwrap();
        assert_eq!(c.path, PathBuf::from("/img"));
        assert!(c.read_only && !c.lock);
        assert_eq!(c.format, Some(Format::Qcow2));
        assert_eq!(c.serial.as_deref(), Some("abc"));
        let c: DiskSpec = "/img".parse().unwrap();
        assert_eq!(c, DiskSpec::new("/img"));
        assert!(c.rate_limiter.is_unlimited());
        let c: DiskSpec = "/img,bw=4M,bw_burst=1M,iops=100,iops_refill=100"
            .parse()
            .unwrap();
        let b = c.rate_limiter.bandwidth.unwrap();
        assert_eq!(
            (b.size, b.one_time_burst, b.refill_time),
            (4 << 20, 1 << 20, 1000)
        );
        let o = c.rate_limiter.ops.unwrap();
        assert_eq!((o.size, o.one_time_burst, o.refill_time), (100, 0, 100));
    }

    #[test]
    fn errors_name_the_option_and_the_problem() {
        let err = |s: &str| s.parse::<DiskSpec>().unwrap_err().to_string();
        assert_eq!(err(""), "--disk '': missing image path");
        assert!(err("/img,rw").contains("unknown option 'rw'"));
        assert!(err("/img,serial=123456789012345678901").contains("1 to 20 bytes"));
        assert!(err("/img,format=vdi").contains("unknown format 'vdi'"));
        assert!(err("/img,lock=maybe").contains("lock=maybe"));
        assert!(err("/img,bw=fast").contains("bw=fast: expected a number"));
        assert!(err("/img,iops_burst=10").contains("iops_burst and iops_refill need iops"));
    }

    #[test]
    fn serial_check_is_the_parsers() {
        assert_eq!(check_serial(&"x".repeat(SERIAL_MAX)), Ok(()));
        for bad in ["", "a,b", &"x".repeat(SERIAL_MAX + 1)] {
            assert!(
                check_serial(bad).unwrap_err().contains("1 to 20 bytes"),
                "{bad:?}"
            );
        }
        assert!("/img,serial=".parse::<DiskSpec>().is_err());
    }
}
