//! Driver-side helpers for the unit tests: guest memory, a split virtqueue as the guest
//! driver lays it out, and interrupt lines that count what they were asked to do.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kvmbox_cpu::GuestMemoryMmap;
use kvmbox_cpu::{IrqLine, MsiLine};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

pub(crate) const F_NEXT: u16 = 1;
pub(crate) const F_WRITE: u16 = 2;
pub(crate) const F_INDIRECT: u16 = 4;

pub(crate) const MEM_SIZE: usize = 16 << 20;

pub(crate) fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A split virtqueue in guest memory, written the way a driver writes it.
pub(crate) struct Ring {
    pub(crate) desc: u64,
    pub(crate) avail: u64,
    pub(crate) used: u64,
    pub(crate) size: u16,
    pub(crate) next_avail: u16,
}

impl Ring {
    /// Rings at `base` (desc), `base + 0x1000` (avail), `base + 0x2000` (used).
    pub(crate) fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> Self {
        let r = Self {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            size,
            next_avail: 0,
        };
        mem.write_slice(&[0u8; 0x3000], GuestAddress(base)).unwrap();
        r
    }

    /// A device-side queue set up on this ring.
    pub(crate) fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    pub(crate) fn set_desc(
        &self,
        mem: &GuestMemoryMmap,
        idx: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        write_desc(mem, self.desc, idx, addr, len, flags, next);
    }

    /// Put descriptors `first..first + bufs.len()` in a chain and make it available.
    pub(crate) fn add_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        first: u16,
        bufs: &[(u64, u32, bool)],
    ) {
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = first + i as u16;
            let mut flags = if write { F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            self.set_desc(mem, idx, addr, len, flags, idx + 1);
        }
        self.publish(mem, first);
    }

    pub(crate) fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.next_avail % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.next_avail = self.next_avail.wrapping_add(1);
        self.set_avail_idx(mem, self.next_avail);
    }

    pub(crate) fn set_avail_idx(&self, mem: &GuestMemoryMmap, idx: u16) {
        std::sync::atomic::fence(Ordering::SeqCst);
        mem.write_obj(idx, GuestAddress(self.avail + 2)).unwrap();
    }

    pub(crate) fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// (id, len) of used element `i`.
    pub(crate) fn used_elem(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        let a = self.used + 4 + 8 * u64::from(i % self.size);
        (
            mem.read_obj(GuestAddress(a)).unwrap(),
            mem.read_obj(GuestAddress(a + 4)).unwrap(),
        )
    }
}

pub(crate) fn write_desc(
    mem: &GuestMemoryMmap,
    table: u64,
    idx: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    let a = GuestAddress(table + 16 * u64::from(idx));
    mem.write_obj(addr, a).unwrap();
    mem.write_obj(len, a.unchecked_add(8)).unwrap();
    mem.write_obj(flags, a.unchecked_add(12)).unwrap();
    mem.write_obj(next, a.unchecked_add(14)).unwrap();
}

/// An interrupt line that counts edges and remembers its level (what KVM's irqfd or IOAPIC
/// pin would receive).
#[derive(Default)]
pub(crate) struct TestIrq {
    pub(crate) edges: AtomicUsize,
    pub(crate) level: AtomicBool,
}

impl IrqLine for TestIrq {
    fn trigger(&self) -> std::io::Result<()> {
        self.edges.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn set_level(&self, high: bool) -> std::io::Result<()> {
        if high {
            self.edges.fetch_add(1, Ordering::SeqCst);
        }
        self.level.store(high, Ordering::SeqCst);
        Ok(())
    }
}

/// An MSI line that records its programmed message and counts sends.
#[derive(Default)]
pub(crate) struct TestMsi {
    pub(crate) fired: AtomicUsize,
    pub(crate) msg: Mutex<Option<(u64, u32)>>,
}

impl MsiLine for TestMsi {
    fn set_message(&self, addr: u64, data: u32) -> std::io::Result<()> {
        *self.msg.lock().unwrap() = Some((addr, data));
        Ok(())
    }
    fn trigger(&self) -> std::io::Result<()> {
        self.fired.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Poll `f` for up to 5 s.
pub(crate) fn wait_for(f: impl Fn() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    f()
}

/// A scratch image file, removed on drop.
pub(crate) struct TempImage {
    pub(crate) path: PathBuf,
}

impl TempImage {
    pub(crate) fn new(len: u64, fill: impl Fn(u64) -> u8) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "kvmbox-virtio-test-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let data: Vec<u8> = (0..len).map(&fill).collect();
        std::fs::write(&path, data).unwrap();
        Self { path }
    }

    pub(crate) fn read(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }

    pub(crate) fn open(&self) -> File {
        File::options()
            .read(true)
            .write(true)
            .open(&self.path)
            .unwrap()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
