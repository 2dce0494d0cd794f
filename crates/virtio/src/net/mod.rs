//! virtio-net on a TAP device (IFF_VNET_HDR), with checksum and TSO offloads both ways.

mod device;
mod event_handler;
mod tap;

pub use device::{
    Net, NetConfig, F_CSUM, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_HOST_TSO4, F_HOST_TSO6,
    F_MAC, F_MRG_RXBUF, QUEUE_SIZE,
};
pub use event_handler::{parse_tx_frame, MAX_FRAME, VNET_HDR_LEN};
pub(crate) use event_handler::{place_frame, Placed};
pub use tap::Tap;

#[cfg(test)]
mod tests;
