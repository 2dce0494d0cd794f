//! The virtio-blk device: options, configuration space, activation.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use kvmbox_block::DiskSpec;

use super::event_handler::BlockHandler;
use super::io_pool::IoPool;
use super::request::{Disk, ID_BYTES, MAX_SEGMENTS, MAX_SEGMENT_SECTORS, SECTOR_SIZE};
use crate::device::{read_config_bytes, ActivateContext, VirtioDevice};
use crate::limiter::SharedLimiter;
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

/// One `--disk` option: the block crate's [`DiskSpec`], shared with the config file and the API.
pub type DiskConfig = DiskSpec;

/// A virtio-blk device on a block backend (raw or qcow2; the device does not know which).
pub struct Block {
    disk: Arc<Disk>,
    features: u64,
    config: [u8; CONFIG_SIZE],
    worker: Option<Worker>,
    metrics: Arc<DeviceMetrics>,
    limiter: SharedLimiter,
}

impl Block {
    /// Open the image `cfg` names.
    pub fn new(cfg: &DiskConfig) -> Result<Self> {
        let backend = kvmbox_block::open(cfg)?;
        let len = backend.size();
        let caps = backend.caps();
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
        if caps.read_only {
            features |= 1 << F_RO;
        }
        if caps.discard {
            features |= 1 << F_DISCARD;
        }
        if caps.write_zeroes {
            features |= 1 << F_WRITE_ZEROES;
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
                backend,
                capacity,
                read_only: caps.read_only,
                id,
            }),
            features,
            config,
            worker: None,
            metrics: Arc::default(),
            limiter: SharedLimiter::new(&cfg.rate_limiter)?,
        })
    }

    /// The rate limiter (live updates go through it).
    pub fn rate_limiter(&self) -> SharedLimiter {
        self.limiter.clone()
    }

    /// Size of the disk in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity
    }

    /// The disk's backend, for the VMM's work on the open image while the device is
    /// quiesced (live internal snapshots).
    pub fn backend(&self) -> Arc<dyn kvmbox_block::BlockBackend> {
        self.disk.backend.clone()
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
        let pool = IoPool::start(&mem, &self.disk)?;
        let done = pool.done_fd();
        let handler = BlockHandler {
            mem,
            queue,
            evt,
            interrupt,
            disk: self.disk.clone(),
            metrics: self.metrics.clone(),
            limiter: self.limiter.clone(),
            pool,
            broken: false,
        };
        let timer = self.limiter.lock().as_raw_fd();
        self.worker = Some(Worker::spawn(
            kvmbox_seccomp::ThreadKind::BlockWorker,
            &[
                (fd, super::event_handler::QUEUE_TOKEN),
                (timer, super::event_handler::LIMITER_TOKEN),
                (done, super::event_handler::DONE_TOKEN),
            ],
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
    fn missing_image_is_one_clear_error() {
        let e = Block::new(&DiskSpec::new("/nonexistent/kvmbox.img"))
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            e,
            "opening disk image '/nonexistent/kvmbox.img': No such file or directory (os error 2)"
        );
    }
}
