//! virtio-blk on a raw image file: read, write, flush (fdatasync), discard and write-zeroes
//! (fallocate), get-id; read-only images.

mod device;
mod event_handler;
pub mod request;

pub use device::{
    Block, DiskConfig, F_BLK_SIZE, F_DISCARD, F_FLUSH, F_RO, F_SEG_MAX, F_WRITE_ZEROES, QUEUE_SIZE,
};

#[cfg(test)]
mod tests;
