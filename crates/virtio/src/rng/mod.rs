//! virtio-rng fed from the host's getrandom(2).

mod device;
mod event_handler;

pub use device::{Rng, QUEUE_SIZE};
