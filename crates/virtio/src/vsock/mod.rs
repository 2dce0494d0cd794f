//! virtio-vsock with Firecracker's host side: the guest's sockets reach host programs
//! through Unix sockets.
//!
//! - Host to guest: a host program connects to the Unix socket `PATH` and writes
//!   `CONNECT <port>\n`; once a guest program listening on that vsock port accepts, it reads
//!   `OK <host port>\n` and the stream is the connection.
//! - Guest to host: a guest connection to CID 2 (the host) port P is connected to the Unix
//!   socket `PATH_P`; the guest sees a reset when nothing listens there.
//!
//! Queues: receive (0), transmit (1), event (2, unused). Stream sockets only.
//!
//! Packets are read and written through [`crate::queue`]'s validated chains like every other
//! device here, so the 44-byte header is decoded in [`Hdr`] rather than with rust-vmm's
//! `virtio-vsock` crate (which walks virtio-queue descriptor chains itself, with its own
//! rules for where header and data may lie).

mod device;
mod muxer;
mod packet;

pub use device::{Vsock, VsockConfig, HOST_CID, QUEUE_SIZE};
pub use muxer::{BUF_ALLOC, MAX_CONNS, MAX_PENDING_RST, MAX_PKT_DATA};
pub use packet::*;

#[cfg(test)]
mod tests;
