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
pub use tap::{attach_for_another_process as attach_tap_for_another_process, Tap, TAP_FDS_ENV};
pub use user::{HostFwd, Proto, UserNetConfig, DNS_ADDR, GATEWAY_ADDR, GUEST_ADDR};

#[cfg(test)]
mod tests;
