//! A device's rate limiter, shared between its worker (which consumes tokens and waits on the
//! limiter's timer) and the VMM (which changes the buckets live, `PATCH /drives/{id}`).

use std::sync::{Arc, Mutex, MutexGuard};

use kvmbox_ratelimit::{RateLimiter, RateLimiterConfig, RateLimiterState};

use crate::{os, Result};

/// One direction's limiter of one device. The worker holds the lock for one pass over its
/// queue; an update waits at most that long.
#[derive(Debug, Clone)]
pub struct SharedLimiter(Arc<Mutex<RateLimiter>>);

impl SharedLimiter {
    /// A limiter with `cfg`'s buckets (its timer descriptor is made now, before any sandbox).
    pub fn new(cfg: &RateLimiterConfig) -> Result<Self> {
        Ok(Self(Arc::new(Mutex::new(
            RateLimiter::new(cfg).map_err(os("timerfd_create"))?,
        ))))
    }

    /// The limiter, for a pass over the queue.
    pub fn lock(&self) -> MutexGuard<'_, RateLimiter> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Change the buckets by Firecracker's PATCH rule; the worker retries at once under them.
    pub fn update(&self, update: &RateLimiterConfig) {
        self.lock().update(update);
    }

    /// The buckets now in force.
    pub fn config(&self) -> RateLimiterConfig {
        self.lock().config()
    }

    /// The buckets' configuration and what they hold now, for a snapshot.
    pub fn save_state(&self) -> RateLimiterState {
        self.lock().save_state()
    }

    /// Put a snapshot's buckets in force, as they were saved; the worker retries under them.
    pub fn restore_state(&self, state: &RateLimiterState) {
        self.lock().restore_state(state);
    }
}
