//! The transport-independent virtio state as plain data: negotiated features, device status,
//! selectors and every queue with its ring addresses and position.
//!
//! Saving first quiesces the device: its worker thread finishes the request it is on and
//! stops, so no request is in flight and guest memory no longer changes under the snapshot.
//! Every kvmbox device completes each descriptor chain it takes before it waits again, so a
//! quiesced queue's position is the used ring's index in guest memory.

use super::*;
use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;
use vm_memory::{Bytes, GuestAddress};

/// One virtqueue: its setup and position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    max_size: u16,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    next_avail: u16,
    next_used: u16,
}

/// A virtio device's transport-independent state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioState {
    device_type: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u16,
    status: u8,
    config_generation: u8,
    needs_reset: bool,
    queues: Vec<QueueSnapshot>,
}

impl VirtioCommon {
    /// Stop the device's worker (it finishes the request in hand) and record where each
    /// queue stands, so that [`VirtioCommon::save_state`] sees a still queue and a later
    /// [`VirtioCommon::resume`] continues from there.
    pub(crate) fn quiesce(&mut self) {
        if !self.active {
            return;
        }
        self.device.reset();
        self.active = false;
        for q in self.queues.iter_mut().filter(|q| q.ready()) {
            let used_idx = self
                .mem
                .read_obj::<u16>(GuestAddress(q.used_ring().wrapping_add(2)))
                .unwrap_or(0);
            q.set_next_avail(used_idx);
            q.set_next_used(used_idx);
        }
    }

    /// Start the device again after [`VirtioCommon::quiesce`] or a restore, if the driver
    /// had it running; every queue is looked at once for requests that arrived meanwhile.
    pub(crate) fn resume(&mut self, interrupt: Arc<dyn VirtioInterrupt>) -> Result<()> {
        if self.active
            || self.status & STATUS_DRIVER_OK == 0
            || self.status & STATUS_FAILED != 0
            || self.needs_reset.load(Ordering::Acquire)
        {
            return Ok(());
        }
        self.activate(interrupt)?;
        self.active = true;
        for evt in &self.evts {
            evt.write(1).map_err(os("eventfd write"))?;
        }
        Ok(())
    }

    /// The state of a quiesced device (call [`VirtioCommon::quiesce`] first).
    pub(crate) fn save_state(&self) -> VirtioState {
        VirtioState {
            device_type: self.device.device_type(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
            needs_reset: self.needs_reset.load(Ordering::Acquire),
            queues: self
                .queues
                .iter()
                .map(|q| {
                    let s = q.state();
                    QueueSnapshot {
                        max_size: s.max_size,
                        size: s.size,
                        ready: s.ready,
                        desc_table: s.desc_table,
                        avail_ring: s.avail_ring,
                        used_ring: s.used_ring,
                        next_avail: s.next_avail,
                        next_used: s.next_used,
                    }
                })
                .collect(),
        }
    }

    /// Load a saved state into this (inactive) device of the same type and queue layout;
    /// [`VirtioCommon::resume`] then starts it. Nothing changes if the state is refused.
    pub(crate) fn restore_state(&mut self, s: &VirtioState) -> Result<()> {
        let refuse = |why: String| Err(Error::State(why));
        if s.device_type != self.device.device_type() {
            return refuse(format!(
                "saved virtio device type {} where this VM has type {}",
                s.device_type,
                self.device.device_type()
            ));
        }
        if s.queues.len() != self.queues.len() {
            return refuse(format!(
                "{} queues saved, the device has {}",
                s.queues.len(),
                self.queues.len()
            ));
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for (i, (q, cur)) in s.queues.iter().zip(&self.queues).enumerate() {
            if q.max_size != cur.max_size() {
                return refuse(format!(
                    "queue {i}: saved maximum size {}, the device has {}",
                    q.max_size,
                    cur.max_size()
                ));
            }
            let state = QueueState {
                max_size: q.max_size,
                next_avail: q.next_avail,
                next_used: q.next_used,
                event_idx_enabled: false,
                size: q.size,
                ready: q.ready,
                desc_table: q.desc_table,
                avail_ring: q.avail_ring,
                used_ring: q.used_ring,
            };
            match Queue::try_from(state) {
                Ok(q) => queues.push(q),
                Err(e) => return refuse(format!("queue {i}: {e}")),
            }
        }
        self.device.reset();
        self.active = false;
        self.queues = queues;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.status = s.status;
        self.config_generation = s.config_generation;
        self.needs_reset.store(s.needs_reset, Ordering::Release);
        Ok(())
    }
}
