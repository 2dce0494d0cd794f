//! virtio-blk on a kvmbox-block backend (raw, qcow2, read-only foreign formats): read, write,
//! flush, discard and write-zeroes, get-id; read-only disks.

mod device;
mod event_handler;
mod io_pool;
pub mod request;

pub use device::{
    Block, DiskConfig, F_BLK_SIZE, F_DISCARD, F_FLUSH, F_RO, F_SEG_MAX, F_WRITE_ZEROES, QUEUE_SIZE,
};

#[cfg(test)]
mod tests;
