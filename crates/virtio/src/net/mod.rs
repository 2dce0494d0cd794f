//! virtio-net on a TAP device (IFF_VNET_HDR, with checksum and TSO offloads both ways) or on
//! the user network (passt over a stream socket; checksum offloads, 64 KiB MTU), behind one
//! [`backend`] seam.

mod backend;
mod device;
mod event_handler;
mod tap;
mod user;

pub use device::{
    Net, NetBackendConfig, NetConfig, F_CSUM, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6,
    F_HOST_TSO4, F_HOST_TSO6, F_MAC, F_MRG_RXBUF, F_STATUS, QUEUE_SIZE,
};
pub use event_handler::{parse_tx_frame, MAX_FRAME, VNET_HDR_LEN};
pub(crate) use event_handler::{place_frame, Placed};
pub use tap::{give_back as give_back_tap, lend as lend_tap, Tap, TapLoan};
pub use user::{HostFwd, Proto, UserNetConfig, DNS_ADDR, GATEWAY_ADDR, GUEST_ADDR};

#[cfg(test)]
mod tests;
