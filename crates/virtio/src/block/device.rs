//! The virtio-blk device: options, configuration space, activation.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use super::event_handler::BlockHandler;
use super::request::{Disk, ID_BYTES, MAX_SEGMENTS, MAX_SEGMENT_SECTORS, SECTOR_SIZE};
use crate::device::{read_config_bytes, ActivateContext, VirtioDevice};
use crate::metrics::DeviceMetrics;
use crate::worker::Worker;
use crate::{Error, Result, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1, TYPE_BLOCK};

/// Feature bit: `seg_max` is valid.
pub const F_SEG_MAX: u32 = 2;
/// Feature bit: the device is read-only.
pub const F_RO: u32 = 5;
/// Feature bit: `blk_size` is valid.
pub const F_BLK_SIZE: u32 = 6;
/// Feature bit: FLUSH is supported.
pub const F_FLUSH: u32 = 9;
/// Feature bit: DISCARD is supported.
pub const F_DISCARD: u32 = 13;
/// Feature bit: WRITE_ZEROES is supported.
pub const F_WRITE_ZEROES: u32 = 14;

/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
const CONFIG_SIZE: usize = 60;

/// One `--disk PATH[,ro][,serial=ID]` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The raw image file.
    pub path: PathBuf,
    /// Expose it read-only (and open it read-only).
    pub read_only: bool,
    /// GET_ID answer (at most 20 bytes).
    pub serial: Option<String>,
}

impl FromStr for DiskConfig {
    type Err = Error;

    /// Parse `PATH[,ro][,serial=ID]`.
    fn from_str(s: &str) -> Result<Self> {
        let mut parts = s.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(Error::Config(format!("--disk '{s}': missing image path")));
        }
        let mut cfg = DiskConfig {
            path: PathBuf::from(path),
            read_only: false,
            serial: None,
        };
        for p in parts {
            match p.split_once('=') {
                None if p == "ro" => cfg.read_only = true,
                Some(("serial", id)) if !id.is_empty() && id.len() <= ID_BYTES => {
                    cfg.serial = Some(id.to_string());
                }
                Some(("serial", id)) => {
                    return Err(Error::Config(format!(
                        "--disk '{s}': serial '{id}' must be 1 to {ID_BYTES} bytes"
                    )))
                }
                _ => {
                    return Err(Error::Config(format!(
                        "--disk '{s}': unknown option '{p}' (expected ro or serial=ID)"
                    )))
                }
            }
        }
        Ok(cfg)
    }
}

/// A virtio-blk device backed by a raw image file.
pub struct Block {
    disk: Arc<Disk>,
    features: u64,
    config: [u8; CONFIG_SIZE],
    worker: Option<Worker>,
    metrics: Arc<DeviceMetrics>,
}

impl Block {
    /// Open the image `cfg` names.
    pub fn new(cfg: &DiskConfig) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(!cfg.read_only)
            .open(&cfg.path)
            .map_err(|source| Error::Backend {
                what: "opening disk image",
                path: cfg.path.display().to_string(),
                source,
            })?;
        let len = file
            .metadata()
            .map_err(|source| Error::Backend {
                what: "reading the size of disk image",
                path: cfg.path.display().to_string(),
                source,
            })?
            .len();
        let capacity = len / SECTOR_SIZE;
        let mut id = [0u8; ID_BYTES];
        if let Some(s) = &cfg.serial {
            let n = s.len().min(ID_BYTES);
            id[..n].copy_from_slice(&s.as_bytes()[..n]);
        }
        let mut features = 1 << F_VERSION_1
            | 1 << F_RING_EVENT_IDX
            | 1 << F_RING_INDIRECT_DESC
            | 1 << F_SEG_MAX
            | 1 << F_BLK_SIZE
            | 1 << F_FLUSH;
        if cfg.read_only {
            features |= 1 << F_RO;
        } else {
            features |= 1 << F_DISCARD | 1 << F_WRITE_ZEROES;
        }
        let mut config = [0u8; CONFIG_SIZE];
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        // seg_max: the chain holds header and status besides the data.
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        config[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
        config[36..40].copy_from_slice(&MAX_SEGMENT_SECTORS.to_le_bytes());
        config[40..44].copy_from_slice(&MAX_SEGMENTS.to_le_bytes());
        config[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        config[48..52].copy_from_slice(&MAX_SEGMENT_SECTORS.to_le_bytes());
        config[52..56].copy_from_slice(&MAX_SEGMENTS.to_le_bytes());
        config[56] = 1; // write_zeroes_may_unmap
        Ok(Self {
            disk: Arc::new(Disk {
                file,
                capacity,
                read_only: cfg.read_only,
                id,
            }),
            features,
            config,
            worker: None,
            metrics: Arc::default(),
        })
    }

    /// Size of the disk in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<()> {
        self.reset();
        let ActivateContext {
            mem,
            interrupt,
            queues,
            ..
        } = ctx;
        let Some((Some(queue), evt)) = queues.into_iter().next() else {
            return Err(Error::InvalidQueue(0));
        };
        let fd = evt.as_raw_fd();
        let handler = BlockHandler {
            mem,
            queue,
            evt,
            interrupt,
            disk: self.disk.clone(),
            metrics: self.metrics.clone(),
        };
        self.worker = Some(Worker::spawn(
            "virtio-blk",
            &[(fd, super::event_handler::QUEUE_TOKEN)],
            handler,
        )?);
        Ok(())
    }

    fn metrics(&self) -> Arc<DeviceMetrics> {
        self.metrics.clone()
    }

    fn reset(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_option_parsing() {
        let c: DiskConfig = "/img,ro,serial=abc".parse().unwrap();
        assert_eq!(c.path, PathBuf::from("/img"));
        assert!(c.read_only);
        assert_eq!(c.serial.as_deref(), Some("abc"));
        let c: DiskConfig = "/img".parse().unwrap();
        assert!(!c.read_only && c.serial.is_none());
        let e = "".parse::<DiskConfig>().unwrap_err().to_string();
        assert!(e.contains("missing image path"), "{e}");
        let e = "/img,rw".parse::<DiskConfig>().unwrap_err().to_string();
        assert!(e.contains("unknown option 'rw'"), "{e}");
        let e = "/img,serial=123456789012345678901"
            .parse::<DiskConfig>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 to 20 bytes"), "{e}");
    }

    #[test]
    fn missing_image_is_one_clear_error() {
        let e = Block::new(&DiskConfig {
            path: "/nonexistent/kvmbox.img".into(),
            read_only: false,
            serial: None,
        })
        .err()
        .unwrap()
        .to_string();
        assert_eq!(
            e,
            "opening disk image '/nonexistent/kvmbox.img': No such file or directory (os error 2)"
        );
    }
}
