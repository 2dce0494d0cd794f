//! Per-device counters, shared between a device's worker and whoever reports them.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one device. Workers add to them; read them at any time.
#[derive(Debug, Default)]
pub struct DeviceMetrics {
    /// Descriptor chains completed, rejected ones included.
    pub requests: AtomicU64,
    /// Chains rejected as malformed (returned to the guest with nothing written).
    pub rejected: AtomicU64,
    /// Requests the backend failed (I/O error status, frame the tap refused or dropped).
    pub errors: AtomicU64,
    /// Bytes moved from the guest to the backend (disk writes, transmitted frames).
    pub bytes_out: AtomicU64,
    /// Bytes moved from the backend into the guest (disk reads, received frames, entropy).
    pub bytes_in: AtomicU64,
    /// Times the device stopped because the guest broke a queue (DEVICE_NEEDS_RESET).
    pub broken: AtomicU64,
}

impl DeviceMetrics {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A snapshot: (requests, rejected, errors, bytes_out, bytes_in, broken).
    pub fn snapshot(&self) -> [u64; 6] {
        [
            &self.requests,
            &self.rejected,
            &self.errors,
            &self.bytes_out,
            &self.bytes_in,
            &self.broken,
        ]
        .map(|c| c.load(Ordering::Relaxed))
    }
}
