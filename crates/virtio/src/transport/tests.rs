//! End-to-end tests that play the guest driver: registers through the bus, descriptors in
//! real guest memory, the device's worker thread, a real image file, and the interrupt lines.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use kvmbox_cpu::GuestMemoryMmap;
use kvmbox_cpu::{IoHandler, IrqLine, MsiLine};
use kvmbox_devices::IoBus;
use kvmbox_pci::{PciConfigMmio, PciRoot};
use vm_memory::{Bytes, GuestAddress};

use super::pci::{NOTIFY_MULTIPLIER, NO_VECTOR};
use super::{MmioTransport, VirtioPciDevice};
use crate::block::{Block, DiskConfig};
use crate::rng::Rng;
use crate::test_util::*;
use crate::*;

const MMIO_BASE: u64 = 0xd000_0000;
const ECAM: u64 = 0xe000_0000;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;

struct Mmio {
    io: IoBus,
    t: Arc<Mutex<MmioTransport>>,
}

impl Mmio {
    fn new(dev: Box<dyn VirtioDevice>, m: &GuestMemoryMmap, irq: Arc<TestIrq>) -> Self {
        let t = Arc::new(Mutex::new(MmioTransport::new(dev, m.clone(), irq).unwrap()));
        let io = IoBus::default();
        io.mmio.insert(t.clone(), MMIO_BASE, 0x1000).unwrap();
        Self { io, t }
    }
    fn r(&self, off: u64) -> u32 {
        let mut d = [0u8; 4];
        self.io.mmio_read(MMIO_BASE + off, &mut d);
        u32::from_le_bytes(d)
    }
    fn w(&self, off: u64, v: u32) {
        self.io.mmio_write(MMIO_BASE + off, &v.to_le_bytes());
    }
    /// Negotiate `features` and set up `rings`; returns the final status.
    fn init(&self, features: u64, rings: &[(u32, &Ring)]) -> u32 {
        self.w(0x70, 0);
        self.w(0x70, 1);
        self.w(0x70, 3);
        self.w(0x14, 0);
        let lo = self.r(0x10);
        self.w(0x14, 1);
        let hi = self.r(0x10);
        let offered = u64::from(hi) << 32 | u64::from(lo);
        let want = features & offered;
        self.w(0x24, 0);
        self.w(0x20, want as u32);
        self.w(0x24, 1);
        self.w(0x20, (want >> 32) as u32);
        self.w(0x70, 3 | 8);
        if self.r(0x70) & 8 == 0 {
            return self.r(0x70);
        }
        for &(q, ring) in rings {
            self.w(0x30, q);
            assert!(self.r(0x34) >= u32::from(ring.size));
            self.w(0x38, u32::from(ring.size));
            self.w(0x80, ring.desc as u32);
            self.w(0x84, (ring.desc >> 32) as u32);
            self.w(0x90, ring.avail as u32);
            self.w(0x94, 0);
            self.w(0xa0, ring.used as u32);
            self.w(0xa4, 0);
            self.w(0x44, 1);
        }
        self.w(0x70, 3 | 8 | 4);
        self.r(0x70)
    }
}

/// A virtio-blk device on `img`, unlocked: some tests open one image twice in this process.
fn blk(img: &TempImage, ro: bool) -> Box<dyn VirtioDevice> {
    Box::new(
        Block::new(&DiskConfig {
            read_only: ro,
            lock: false,
            serial: Some("kvmbox0".into()),
            ..DiskConfig::new(img.path.clone())
        })
        .unwrap(),
    )
}

fn write_request(m: &GuestMemoryMmap, ring: &mut Ring, sector: u64, byte: u8) {
    m.write_obj(1u32, GuestAddress(HDR)).unwrap();
    m.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    m.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    m.write_slice(&[byte; 512], GuestAddress(DATA)).unwrap();
    m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let first = (ring.next_avail * 3) % ring.size;
    ring.add_chain(
        m,
        first,
        &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
    );
}

fn status_byte(m: &GuestMemoryMmap) -> u8 {
    m.read_obj(GuestAddress(STATUS)).unwrap()
}

const ALL: u64 = u64::MAX;

#[test]
fn mmio_block_end_to_end() {
    let m = mem();
    let img = TempImage::new(1 << 20, |_| 0);
    let irq = Arc::new(TestIrq::default());
    let d = Mmio::new(blk(&img, false), &m, irq.clone());
    assert_eq!(d.r(0), 0x7472_6976, "magic");
    assert_eq!(d.r(4), 2, "version 2");
    assert_eq!(d.r(8), TYPE_BLOCK);
    assert_eq!(d.r(0x100), (1 << 20) / 512, "capacity");
    let mut ring = Ring::new(&m, 0x1_0000, 16);
    assert_eq!(d.init(ALL, &[(0, &ring)]), 15);

    write_request(&m, &mut ring, 3, 0xcd);
    d.w(0x50, 0); // QueueNotify through the bus (no ioeventfd here)
    assert!(wait_for(|| ring.used_idx(&m) == 1));
    assert_eq!(ring.used_elem(&m, 0), (0, 1));
    assert_eq!(status_byte(&m), 0);
    let f = img.read();
    assert!(f[3 * 512..4 * 512].iter().all(|&x| x == 0xcd));
    assert!(wait_for(|| irq.edges.load(Ordering::SeqCst) >= 1));
    assert_eq!(d.r(0x60) & 1, 1, "used-ring interrupt status");
    d.w(0x64, 1);
    assert_eq!(d.r(0x60), 0);

    // Flush, then a read of what was written.
    m.write_obj(4u32, GuestAddress(HDR)).unwrap();
    ring.add_chain(&m, 3, &[(HDR, 16, false), (STATUS, 1, true)]);
    m.write_obj(0u32, GuestAddress(HDR + 0x100)).unwrap();
    m.write_obj(0u32, GuestAddress(HDR + 0x104)).unwrap();
    m.write_obj(3u64, GuestAddress(HDR + 0x108)).unwrap();
    ring.add_chain(
        &m,
        5,
        &[
            (HDR + 0x100, 16, false),
            (DATA + 0x1000, 512, true),
            (STATUS + 1, 1, true),
        ],
    );
    d.w(0x50, 0);
    assert!(wait_for(|| ring.used_idx(&m) == 3));
    assert_eq!(ring.used_elem(&m, 2), (5, 513));
    let mut b = [0u8; 512];
    m.read_slice(&mut b, GuestAddress(DATA + 0x1000)).unwrap();
    assert!(b.iter().all(|&x| x == 0xcd));

    // Reset stops the worker; the device comes back after a new init.
    d.w(0x70, 0);
    assert_eq!(d.r(0x70), 0);
    let mut ring = Ring::new(&m, 0x8_0000, 8);
    assert_eq!(d.init(ALL, &[(0, &ring)]), 15);
    write_request(&m, &mut ring, 0, 0x11);
    d.w(0x50, 0);
    assert!(wait_for(|| ring.used_idx(&m) == 1));
    assert!(img.read()[..512].iter().all(|&x| x == 0x11));
}

#[test]
fn mmio_rng_end_to_end() {
    let m = mem();
    let irq = Arc::new(TestIrq::default());
    let rng = Rng::new();
    let metrics = rng.metrics();
    let d = Mmio::new(Box::new(rng), &m, irq.clone());
    assert_eq!(d.r(8), TYPE_RNG);
    let mut ring = Ring::new(&m, 0x1_0000, 8);
    assert_eq!(d.init(ALL, &[(0, &ring)]), 15);
    ring.add_chain(&m, 0, &[(DATA, 64, true), (DATA + 0x1000, 4096, true)]);
    // A chain with a device-readable buffer is the wrong direction: nothing written.
    m.write_slice(&[0u8; 16], GuestAddress(DATA + 0x4000))
        .unwrap();
    ring.add_chain(&m, 2, &[(DATA + 0x4000, 16, false)]);
    d.w(0x50, 0);
    assert!(wait_for(|| ring.used_idx(&m) == 2));
    assert_eq!(ring.used_elem(&m, 0), (0, 4160));
    assert_eq!(ring.used_elem(&m, 1), (2, 0));
    let mut b = vec![0u8; 4096];
    m.read_slice(&mut b, GuestAddress(DATA + 0x1000)).unwrap();
    assert!(
        b.iter().filter(|&&x| x == 0).count() < 64,
        "random, not zeros"
    );
    assert!(irq.edges.load(Ordering::SeqCst) >= 1);
    assert_eq!(metrics.snapshot(), [2, 1, 0, 0, 4160, 0]);
}

#[test]
fn feature_negotiation_needs_version_1_and_offered_bits() {
    let m = mem();
    let img = TempImage::new(4096, |_| 0);
    let d = Mmio::new(blk(&img, false), &m, Arc::new(TestIrq::default()));
    let ring = Ring::new(&m, 0x1_0000, 8);
    // Legacy driver: no VERSION_1.
    let s = d.init(ALL & !(1 << F_VERSION_1), &[(0, &ring)]);
    assert_eq!(s & u32::from(STATUS_FEATURES_OK), 0);
    // A feature the device never offered.
    d.w(0x70, 0);
    d.w(0x70, 3);
    d.w(0x24, 1);
    d.w(0x20, 1 | 1 << 20);
    d.w(0x70, 11);
    assert_eq!(d.r(0x70), 3);
    // DRIVER_OK without FEATURES_OK does not activate.
    d.w(0x70, 7);
    assert_eq!(d.r(0x70) & 4, 0);
    // Config space past its end reads as all ones, odd register widths as zero.
    let mut b = [0u8; 2];
    d.io.mmio_read(MMIO_BASE + 0x100 + 200, &mut b);
    assert_eq!(b, [0xff, 0xff]);
    d.io.mmio_read(MMIO_BASE + 0x70, &mut b);
    assert_eq!(b, [0, 0]);
}

#[test]
fn avail_index_past_queue_size_marks_device_broken() {
    let m = mem();
    let img = TempImage::new(4096, |_| 0);
    let irq = Arc::new(TestIrq::default());
    let dev = blk(&img, false);
    let metrics = dev.metrics();
    let d = Mmio::new(dev, &m, irq.clone());
    let mut ring = Ring::new(&m, 0x1_0000, 8);
    assert_eq!(d.init(ALL, &[(0, &ring)]), 15);
    write_request(&m, &mut ring, 0, 1);
    ring.set_avail_idx(&m, 100);
    d.w(0x50, 0);
    assert!(wait_for(|| d.r(0x70)
        & u32::from(STATUS_DEVICE_NEEDS_RESET)
        != 0));
    assert_eq!(d.r(0x60) & 2, 2, "configuration interrupt");
    assert_eq!(ring.used_idx(&m), 0, "nothing processed");
    assert_eq!(metrics.broken.load(Ordering::SeqCst), 1);
    // Further notifies are harmless; a reset clears the condition.
    d.w(0x50, 0);
    d.w(0x70, 0);
    assert_eq!(d.r(0x70), 0);
}

#[test]
fn queue_outside_guest_memory_fails_activation() {
    let m = mem();
    let img = TempImage::new(4096, |_| 0);
    let d = Mmio::new(blk(&img, false), &m, Arc::new(TestIrq::default()));
    let mut ring = Ring::new(&m, 0x1_0000, 8);
    ring.used = MEM_SIZE as u64 - 16;
    let s = d.init(ALL, &[(0, &ring)]);
    assert_ne!(s & u32::from(STATUS_DEVICE_NEEDS_RESET), 0);
    // Misaligned descriptor table: ignored, the queue keeps its (reset) address.
    d.w(0x70, 0);
    let mut ring = Ring::new(&m, 0x1_0000, 8);
    ring.desc = 0x1_0003;
    d.init(ALL, &[(0, &ring)]);
    d.w(0x30, 0);
    assert_eq!(d.r(0x44), 1);
    // Notifying a queue the device does not have, and a huge queue number, are ignored.
    d.w(0x50, 7);
    d.w(0x30, 0xffff_ffff);
    assert_eq!(d.r(0x34), 0);
}

#[test]
fn looping_chain_fails_only_that_request() {
    let m = mem();
    let img = TempImage::new(4096, |_| 0);
    let dev = blk(&img, false);
    let metrics = dev.metrics();
    let d = Mmio::new(dev, &m, Arc::new(TestIrq::default()));
    let mut ring = Ring::new(&m, 0x1_0000, 8);
    assert_eq!(d.init(ALL, &[(0, &ring)]), 15);
    ring.set_desc(&m, 6, HDR, 16, F_NEXT, 7);
    ring.set_desc(&m, 7, DATA, 16, F_NEXT, 6);
    ring.publish(&m, 6);
    write_request(&m, &mut ring, 1, 0x77);
    d.w(0x50, 0);
    assert!(wait_for(|| ring.used_idx(&m) == 2));
    assert_eq!(ring.used_elem(&m, 0), (6, 0));
    assert_eq!(ring.used_elem(&m, 1).1, 1);
    assert!(img.read()[512..1024].iter().all(|&x| x == 0x77));
    assert_eq!(d.r(0x70), 15);
    // requests, rejected, errors, bytes_out, bytes_in, broken
    assert_eq!(metrics.snapshot(), [2, 1, 0, 512, 0, 0]);
}

/// Randomized register traffic must never panic or hang the VMM.
#[test]
fn random_register_writes_are_harmless() {
    let m = mem();
    let img = TempImage::new(4096, |_| 0);
    let d = Mmio::new(blk(&img, false), &m, Arc::new(TestIrq::default()));
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..20000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = ((x >> 8) % 0x110) & !3;
        let v = (x >> 32) as u32;
        if x & 3 == 0 {
            d.r(off);
        } else {
            // Bias towards the status register and queue setup so activation happens.
            let off = if x & 4 == 0 { 0x70 } else { off };
            d.w(off, v & if off == 0x70 { 0xf } else { u32::MAX });
        }
    }
    d.w(0x70, 0);
}

// ---------------------------------------------------------------------------------------
// virtio-pci through the PCI root, ECAM and the MMIO bus.

struct Pci {
    io: Arc<IoBus>,
    bar: u64,
    nvec: usize,
    msi: Vec<Arc<TestMsi>>,
    intx: Arc<TestIrq>,
    common: u64,
    notify: u64,
    isr: u64,
    device: u64,
    pci_cfg: u64,
    msix_cap: u64,
}

impl Pci {
    fn new(dev: Box<dyn VirtioDevice>, m: &GuestMemoryMmap, nq: usize) -> Self {
        let msi: Vec<Arc<TestMsi>> = (0..=nq).map(|_| Arc::new(TestMsi::default())).collect();
        let lines = msi.iter().map(|l| l.clone() as Arc<dyn MsiLine>).collect();
        let intx = Arc::new(TestIrq::default());
        Self::build(dev, m, lines, intx.clone(), msi, intx).0
    }

    fn build(
        dev: Box<dyn VirtioDevice>,
        m: &GuestMemoryMmap,
        lines: Vec<Arc<dyn MsiLine>>,
        intx_line: Arc<dyn IrqLine>,
        msi: Vec<Arc<TestMsi>>,
        intx: Arc<TestIrq>,
    ) -> (Self, Arc<Mutex<VirtioPciDevice>>) {
        let io = Arc::new(IoBus::default());
        let root = Arc::new(Mutex::new(PciRoot::new(Arc::downgrade(&io))));
        io.mmio
            .insert(
                Arc::new(Mutex::new(PciConfigMmio::new(root.clone()))),
                ECAM,
                0x1000_0000,
            )
            .unwrap();
        let nvec = lines.len();
        let vdev = Arc::new(Mutex::new(
            VirtioPciDevice::new(dev, m.clone(), lines, Some(intx_line)).unwrap(),
        ));
        let slot = root.lock().unwrap().add_device(vdev.clone()).unwrap();
        assert_eq!(slot, 1);
        (Self::probe(io, nvec, msi, intx), vdev)
    }

    /// Find device 1's BAR and capabilities the way Linux's virtio_pci_modern does.
    fn probe(io: Arc<IoBus>, nvec: usize, msi: Vec<Arc<TestMsi>>, intx: Arc<TestIrq>) -> Self {
        let mut p = Self {
            io,
            bar: 0,
            nvec,
            msi,
            intx,
            common: 0,
            notify: 0,
            isr: 0,
            device: 0,
            pci_cfg: 0,
            msix_cap: 0,
        };
        p.bar = u64::from(p.cfg(0x10) & !0xf);
        // Walk the capability list like Linux's virtio_pci_modern does.
        let mut cap = p.cfg(0x34) & 0xff;
        while cap != 0 {
            let h = p.cfg(u64::from(cap));
            match h & 0xff {
                0x09 => {
                    let off = u64::from(p.cfg(u64::from(cap) + 8));
                    assert_eq!(p.cfg(u64::from(cap) + 4) & 0xff, 0, "BAR 0");
                    match (h >> 24) & 0xff {
                        1 => p.common = off,
                        2 => {
                            p.notify = off;
                            assert_eq!(p.cfg(u64::from(cap) + 16), NOTIFY_MULTIPLIER);
                        }
                        3 => p.isr = off,
                        4 => p.device = off,
                        5 => p.pci_cfg = u64::from(cap),
                        t => panic!("unexpected virtio cap type {t}"),
                    }
                }
                0x11 => p.msix_cap = u64::from(cap),
                id => panic!("unexpected cap {id:#x}"),
            }
            cap = (h >> 8) & 0xff;
        }
        assert!(p.common != p.isr && p.msix_cap != 0);
        p
    }
    fn cfg(&self, reg: u64) -> u32 {
        let mut d = [0u8; 4];
        self.io.mmio_read(ECAM + (1 << 15) + reg, &mut d);
        u32::from_le_bytes(d)
    }
    fn set_cfg(&self, reg: u64, v: u32) {
        self.io.mmio_write(ECAM + (1 << 15) + reg, &v.to_le_bytes());
    }
    fn r(&self, off: u64, len: usize) -> u32 {
        let mut d = [0u8; 4];
        self.io.mmio_read(self.bar + off, &mut d[..len]);
        u32::from_le_bytes(d)
    }
    fn w(&self, off: u64, len: usize, v: u32) {
        self.io.mmio_write(self.bar + off, &v.to_le_bytes()[..len]);
    }
    /// Driver init with MSI-X (config vector 0, queue n on vector n + 1) or INTx.
    fn init(&self, rings: &[&Ring], msix: bool) -> u8 {
        let c = self.common;
        if msix {
            let ctl = self.cfg(self.msix_cap);
            self.set_cfg(self.msix_cap, ctl | 1 << 31);
            for v in 0..self.nvec as u64 {
                let t = 0x4000 + v * 16;
                self.w(t, 4, 0xfee0_0000);
                self.w(t + 4, 4, 0);
                self.w(t + 8, 4, 0x30 + v as u32);
                self.w(t + 12, 4, 0);
            }
        }
        self.w(c + 0x14, 1, 0);
        self.w(c + 0x14, 1, 3);
        self.w(c, 4, 1);
        assert_eq!(self.r(c + 4, 4) & 1, 1, "VERSION_1 offered");
        self.w(c, 4, 0);
        self.w(c + 8, 4, 0);
        self.w(c + 0xc, 4, self.r(c + 4, 4) & !(1 << (F_RING_EVENT_IDX)));
        self.w(c + 8, 4, 1);
        self.w(c + 0xc, 4, 1);
        self.w(c + 0x14, 1, 11);
        assert_eq!(self.r(c + 0x14, 1), 11);
        if msix {
            self.w(c + 0x10, 2, 0);
            assert_eq!(self.r(c + 0x10, 2), 0);
        }
        assert_eq!(self.r(c + 0x12, 2) as usize, self.nvec - 1);
        for (q, ring) in rings.iter().enumerate() {
            self.w(c + 0x16, 2, q as u32);
            assert!(self.r(c + 0x18, 2) >= u32::from(ring.size));
            self.w(c + 0x18, 2, u32::from(ring.size));
            if msix {
                self.w(c + 0x1a, 2, q as u32 + 1);
                assert_eq!(self.r(c + 0x1a, 2), q as u32 + 1);
            }
            for (off, a) in [(0x20, ring.desc), (0x28, ring.avail), (0x30, ring.used)] {
                self.w(c + off, 4, a as u32);
                self.w(c + off + 4, 4, (a >> 32) as u32);
            }
            self.w(c + 0x1c, 2, 1);
        }
        self.w(c + 0x14, 1, 15);
        self.r(c + 0x14, 1) as u8
    }
    fn notify(&self, q: u16) {
        self.w(c_notify(self, q), 2, u32::from(q));
    }
}

fn c_notify(p: &Pci, q: u16) -> u64 {
    p.w(p.common + 0x16, 2, u32::from(q));
    p.notify + u64::from(p.r(p.common + 0x1e, 2)) * u64::from(NOTIFY_MULTIPLIER)
}

#[test]
fn pci_block_end_to_end_with_msix() {
    let m = mem();
    let img = TempImage::new(1 << 20, |_| 0);
    let p = Pci::new(blk(&img, false), &m, 1);
    assert_eq!(p.cfg(0), 0x1042_1af4, "virtio-blk modern IDs");
    assert_eq!(p.cfg(8) >> 8, 0x01_8000, "mass storage class");
    assert_eq!(
        p.r(p.device, 4),
        (1 << 20) / 512,
        "capacity through device cfg"
    );
    let mut ring = Ring::new(&m, 0x1_0000, 16);
    assert_eq!(p.init(&[&ring], true), 15);
    write_request(&m, &mut ring, 7, 0x42);
    p.notify(0);
    assert!(wait_for(|| ring.used_idx(&m) == 1));
    assert_eq!(status_byte(&m), 0);
    assert!(img.read()[7 * 512..8 * 512].iter().all(|&x| x == 0x42));
    assert!(wait_for(|| p.msi[1].fired.load(Ordering::SeqCst) == 1));
    assert_eq!(*p.msi[1].msg.lock().unwrap(), Some((0xfee0_0000, 0x31)));
    assert_eq!(p.msi[0].fired.load(Ordering::SeqCst), 0);
    assert_eq!(
        p.intx.edges.load(Ordering::SeqCst),
        0,
        "no INTx with MSI-X on"
    );
    // Masked vector: the message waits in the PBA until unmasked.
    p.w(0x4000 + 16 + 12, 4, 1);
    write_request(&m, &mut ring, 8, 0x43);
    p.notify(0);
    assert!(wait_for(|| ring.used_idx(&m) == 2));
    assert!(wait_for(|| p.r(0x6000, 4) == 2));
    assert_eq!(p.msi[1].fired.load(Ordering::SeqCst), 1);
    p.w(0x4000 + 16 + 12, 4, 0);
    assert_eq!(p.msi[1].fired.load(Ordering::SeqCst), 2);
    assert_eq!(p.r(0x6000, 4), 0);
    // Out-of-range vector numbers read back as NO_VECTOR.
    p.w(p.common + 0x10, 2, 9);
    assert_eq!(p.r(p.common + 0x10, 2), u32::from(NO_VECTOR));
}

#[test]
fn pci_block_with_intx_and_isr() {
    let m = mem();
    let img = TempImage::new(1 << 20, |_| 0);
    let p = Pci::new(blk(&img, false), &m, 1);
    assert_eq!(p.cfg(0x3c) >> 8 & 0xff, 1, "INTA#");
    let mut ring = Ring::new(&m, 0x1_0000, 16);
    assert_eq!(p.init(&[&ring], false), 15);
    write_request(&m, &mut ring, 1, 0x99);
    p.notify(0);
    assert!(wait_for(|| ring.used_idx(&m) == 1));
    assert!(wait_for(|| p.intx.level.load(Ordering::SeqCst)));
    assert_eq!(p.r(p.isr, 1), 1, "queue interrupt");
    assert!(!p.intx.level.load(Ordering::SeqCst), "ISR read lowers INTx");
    assert_eq!(p.r(p.isr, 1), 0, "read clears");
}

#[test]
fn pci_bar_move_keeps_the_device_working() {
    let m = mem();
    let img = TempImage::new(1 << 20, |_| 0);
    let mut p = Pci::new(blk(&img, false), &m, 1);
    let old = p.bar;
    let new = old + 0x10_0000;
    p.set_cfg(4, 0);
    p.set_cfg(0x10, u32::MAX);
    assert_eq!(p.cfg(0x10), !(super::pci::BAR0_SIZE as u32 - 1));
    p.set_cfg(0x10, new as u32);
    p.set_cfg(4, 6);
    p.bar = new;
    let mut ring = Ring::new(&m, 0x1_0000, 16);
    assert_eq!(p.init(&[&ring], true), 15);
    write_request(&m, &mut ring, 2, 0x24);
    p.notify(0);
    assert!(wait_for(|| ring.used_idx(&m) == 1));
    assert!(img.read()[1024..1536].iter().all(|&x| x == 0x24));
    assert_eq!(
        {
            let mut d = [0u8; 4];
            p.io.mmio_read(old, &mut d);
            d
        },
        [0xff; 4],
        "old BAR address is gone"
    );
}

#[test]
fn pci_needs_reset_sends_config_vector() {
    let m = mem();
    let p = Pci::new(Box::new(Rng::new()), &m, 1);
    let mut ring = Ring::new(&m, 0x1_0000, 8);
    assert_eq!(p.init(&[&ring], true), 15);
    ring.add_chain(&m, 0, &[(DATA, 16, true)]);
    ring.set_avail_idx(&m, 50);
    p.notify(0);
    assert!(wait_for(|| p.msi[0].fired.load(Ordering::SeqCst) == 1));
    assert_ne!(
        p.r(p.common + 0x14, 1) & u32::from(STATUS_DEVICE_NEEDS_RESET),
        0
    );
    assert_eq!(p.msi[1].fired.load(Ordering::SeqCst), 0);
    p.w(p.common + 0x14, 1, 0);
    assert_eq!(p.r(p.common + 0x14, 1), 0);
}

#[test]
fn pci_wrong_msix_line_count_is_an_error() {
    let m = mem();
    let e = VirtioPciDevice::new(Box::new(Rng::new()), m, Vec::new(), None)
        .err()
        .unwrap()
        .to_string();
    assert_eq!(e, "device needs 2 MSI-X vectors, got 0");
}

#[test]
fn cmdline_announces_the_window() {
    assert_eq!(
        super::cmdline_arg(0xd000_1000, 5),
        "virtio_mmio.device=4K@0xd0001000:5"
    );
}

/// The same transports on a real KVM VM, wired with the `attach_*` helpers: KVM accepts the
/// ioeventfd registrations (QueueNotify with datamatch, PCI notify addresses), the irqfd lines
/// and the MSI routes the guest programs, and the devices complete requests notified through
/// the bus (the path a vCPU exit takes).
#[test]
fn kvm_attach_helpers_ioeventfds_and_msi_routes() {
    if !kvmbox_cpu::kvm::available_or_skip("kvm_attach_helpers_ioeventfds_and_msi_routes") {
        return;
    }
    use super::{attach_mmio, attach_pci};
    let m = mem();
    let vm = kvmbox_cpu::kvm::KvmVm::new(&m).expect("KVM VM (needs /dev/kvm)");
    let clock = Arc::new(kvmbox_devices::legacy::pit::HostClock::new());
    let chip = kvmbox_irqchip::IrqChip::with_lapic_bus(clock, vm.lapic_bus());
    vm.set_platform_irq(Arc::new(chip)).unwrap();
    let img = TempImage::new(1 << 20, |_| 0);
    let io = Arc::new(IoBus::default());
    let root = Arc::new(Mutex::new(PciRoot::new(Arc::downgrade(&io))));
    io.mmio
        .insert(
            Arc::new(Mutex::new(PciConfigMmio::new(root.clone()))),
            ECAM,
            0x1000_0000,
        )
        .unwrap();

    let (arg, _t) = attach_mmio(&io, &vm, &m, blk(&img, false), MMIO_BASE, 5).unwrap();
    assert_eq!(arg, "virtio_mmio.device=4K@0xd0000000:5");
    let r = |off: u64| {
        let mut d = [0u8; 4];
        io.mmio_read(MMIO_BASE + off, &mut d);
        u32::from_le_bytes(d)
    };
    assert_eq!(r(0), 0x7472_6976);
    assert_eq!(r(8), TYPE_BLOCK);

    let (slot, _dev) = attach_pci(&root, &vm, &m, blk(&img, false), Some(10)).unwrap();
    assert_eq!(slot, 1);
    let p = Pci::probe(io.clone(), 2, Vec::new(), Arc::new(TestIrq::default()));
    assert_eq!(p.cfg(0x3c) & 0xff, 10, "interrupt line");
    let mut ring = Ring::new(&m, 0x1_0000, 16);
    assert_eq!(p.init(&[&ring], true), 15, "MSI routes committed to KVM");
    write_request(&m, &mut ring, 9, 0x5a);
    p.notify(0);
    assert!(wait_for(|| ring.used_idx(&m) == 1));
    assert_eq!(status_byte(&m), 0);
    assert!(img.read()[9 * 512..10 * 512].iter().all(|&x| x == 0x5a));
    // A second mmio device on the same window is a bus error, not a panic.
    let e = attach_mmio(&io, &vm, &m, Box::new(Rng::new()), MMIO_BASE, 6)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.starts_with("MMIO bus: bus range 0xd0000000+0x1000 overlaps"),
        "{e}"
    );
}

struct NullInt;
impl VirtioInterrupt for NullInt {
    fn trigger(&self, _kind: VirtioInterruptType) -> std::io::Result<()> {
        Ok(())
    }
    fn set_needs_reset(&self) {}
}

/// Request latency and throughput of virtio-blk over virtio-mmio with the per-device worker
/// thread (bus notify -> eventfd -> worker -> pread -> used ring). Run with
/// `cargo test -p kvmbox-virtio --release bench_ -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_blk_mmio_worker_thread() {
    use std::time::Instant;
    let m = mem();
    let img = TempImage::new(16 << 20, |i| i as u8);
    let d = Mmio::new(blk(&img, false), &m, Arc::new(TestIrq::default()));
    let mut ring = Ring::new(&m, 0x1_0000, 256);
    assert_eq!(d.init(ALL & !(1 << F_RING_EVENT_IDX), &[(0, &ring)]), 15);
    // QD1: one 4 KiB read at a time.
    let n = 5000u16;
    let start = Instant::now();
    for i in 0..n {
        let h = HDR + u64::from(i % 64) * 16;
        m.write_obj(0u32, GuestAddress(h)).unwrap();
        m.write_obj(0u32, GuestAddress(h + 4)).unwrap();
        m.write_obj(u64::from(i % 4000) * 8, GuestAddress(h + 8))
            .unwrap();
        let first = (i % 85) * 3;
        ring.add_chain(
            &m,
            first,
            &[(h, 16, false), (DATA, 4096, true), (STATUS, 1, true)],
        );
        d.w(0x50, 0);
        while ring.used_idx(&m) != i.wrapping_add(1) {
            std::hint::spin_loop();
        }
    }
    let qd1 = start.elapsed();
    // QD64: 64 requests per notify.
    let batches = 200u32;
    let start = Instant::now();
    let mut done = ring.used_idx(&m);
    for _ in 0..batches {
        for j in 0..64u16 {
            let h = HDR + u64::from(j) * 16;
            let first = (ring.next_avail % 85) * 3;
            ring.add_chain(
                &m,
                first,
                &[
                    (h, 16, false),
                    (DATA + u64::from(j) * 4096, 4096, true),
                    (STATUS + u64::from(j), 1, true),
                ],
            );
        }
        d.w(0x50, 0);
        done = done.wrapping_add(64);
        while ring.used_idx(&m) != done {
            std::hint::spin_loop();
        }
    }
    let qd64 = start.elapsed();
    // The same QD1 requests run inline (no thread hop): the device work alone.
    let disk = crate::block::request::Disk {
        backend: std::sync::Arc::new(kvmbox_block::RawBackend::new(
            img.open(),
            16 << 20,
            false,
            false,
        )),
        capacity: (16 << 20) / 512,
        read_only: false,
        id: [0; 20],
    };
    let mut r2 = Ring::new(&m, 0x8_0000, 256);
    let mut q = r2.queue();
    let int = NullInt;
    let start = Instant::now();
    for i in 0..n {
        let first = (i % 85) * 3;
        r2.add_chain(
            &m,
            first,
            &[(HDR, 16, false), (DATA, 4096, true), (STATUS, 1, true)],
        );
        crate::queue::process_queue(&mut q, &m, &int, 0, |c| {
            crate::block::request::Request::parse(&c.unwrap(), &m)
                .unwrap()
                .execute(&disk)
                .used
        })
        .unwrap();
    }
    let inline = start.elapsed();
    println!(
        "virtio-blk inline (no worker hop): QD1 4K read {:.1} us/request",
        inline.as_secs_f64() * 1e6 / f64::from(n)
    );
    println!(
        "virtio-blk mmio, worker thread: QD1 4K read {:.1} us/request; QD64 {:.0} requests/s ({:.0} MiB/s)",
        qd1.as_secs_f64() * 1e6 / f64::from(n),
        f64::from(batches * 64) / qd64.as_secs_f64(),
        f64::from(batches * 64) * 4096.0 / qd64.as_secs_f64() / (1 << 20) as f64
    );
}

#[test]
fn mmio_block_indirect_descriptors() {
    let m = mem();
    let img = TempImage::new(1 << 20, |_| 0);
    let d = Mmio::new(blk(&img, false), &m, Arc::new(TestIrq::default()));
    assert_ne!(d.r(0x10) & 1 << F_RING_INDIRECT_DESC, 0, "offered");
    let mut ring = Ring::new(&m, 0x1_0000, 8);
    assert_eq!(d.init(ALL, &[(0, &ring)]), 15);
    m.write_obj(1u32, GuestAddress(HDR)).unwrap();
    m.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    m.write_obj(4u64, GuestAddress(HDR + 8)).unwrap();
    m.write_slice(&[0x3c; 512], GuestAddress(DATA)).unwrap();
    let table = 0x5_0000;
    write_desc(&m, table, 0, HDR, 16, F_NEXT, 1);
    write_desc(&m, table, 1, DATA, 512, F_NEXT, 2);
    write_desc(&m, table, 2, STATUS, 1, F_WRITE, 0);
    ring.set_desc(&m, 0, table, 48, F_INDIRECT, 0);
    ring.publish(&m, 0);
    d.w(0x50, 0);
    assert!(wait_for(|| ring.used_idx(&m) == 1));
    assert_eq!(ring.used_elem(&m, 0), (0, 1));
    assert_eq!(status_byte(&m), 0);
    assert!(img.read()[4 * 512..5 * 512].iter().all(|&x| x == 0x3c));
}

#[test]
fn pci_cfg_capability_is_a_window_onto_bar0() {
    let m = mem();
    let img = TempImage::new(1 << 20, |_| 0);
    let p = Pci::new(blk(&img, false), &m, 1);
    assert_ne!(p.pci_cfg, 0);
    let cap = p.pci_cfg;
    assert_eq!(p.cfg(cap) >> 16 & 0xff, 20, "cap_len");
    // Read the capacity (device config, offset 0) through the window.
    p.set_cfg(cap + 4, 0);
    p.set_cfg(cap + 8, super::pci::DEVICE_CFG_OFFSET as u32);
    p.set_cfg(cap + 12, 4);
    assert_eq!(p.cfg(cap + 16), (1 << 20) / 512);
    // Write device status through it.
    p.set_cfg(cap + 8, p.common as u32 + 0x14);
    p.set_cfg(cap + 12, 1);
    p.set_cfg(cap + 16, 1);
    assert_eq!(p.r(p.common + 0x14, 1), 1);
    // Bad windows (other BAR, misaligned, too long, past the BAR) do nothing.
    for (bar, off, len) in [(1u32, 0u32, 4u32), (0, 1, 4), (0, 0, 8), (0, 0x8000, 1)] {
        p.set_cfg(cap + 4, bar);
        p.set_cfg(cap + 8, off);
        p.set_cfg(cap + 12, len);
        p.set_cfg(cap + 16, 0);
        p.cfg(cap + 16);
    }
    assert_eq!(p.r(p.common + 0x14, 1), 1);
}

/// Randomized configuration-space and BAR traffic (any offset, 1/2/4/8 bytes) against a
/// virtio-pci device behind the root: no panic, no hang, and ECAM keeps answering.
#[test]
fn random_pci_config_and_bar_traffic_is_harmless() {
    let m = mem();
    let img = TempImage::new(1 << 16, |_| 0);
    let p = Pci::new(blk(&img, false), &m, 1);
    let bar = p.bar;
    let mut x = 0x1234_5678_9abc_def1u64;
    for _ in 0..30000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = [1usize, 2, 4, 8][(x & 3) as usize];
        let v = (x >> 16).to_le_bytes();
        let mut buf = [0u8; 8];
        if x & 0x30 == 0 {
            // Configuration space of device 1 (BAR and command writes move it around).
            let off = (x >> 40) % 0x1000;
            let a = ECAM + (1 << 15) + off;
            if x & 0x40 == 0 {
                p.io.mmio_read(a, &mut buf[..len]);
            } else {
                p.io.mmio_write(a, &v[..len]);
            }
        } else {
            let off = (x >> 40) % 0x8000;
            if x & 0x40 == 0 {
                p.io.mmio_read(bar + off, &mut buf[..len]);
            } else {
                p.io.mmio_write(bar + off, &v[..len]);
            }
        }
    }
    assert_eq!(p.cfg(0), 0x1042_1af4, "ECAM still answers");
}

#[test]
fn mmio_block_state_moves_to_a_new_device_mid_stream() {
    let m = mem();
    let img = TempImage::new(1 << 20, |_| 0);
    let irq = Arc::new(TestIrq::default());
    let a = Mmio::new(blk(&img, false), &m, irq.clone());
    let mut ring = Ring::new(&m, 0x1_0000, 16);
    assert_eq!(a.init(ALL, &[(0, &ring)]), 15);
    write_request(&m, &mut ring, 1, 0xa1);
    a.w(0x50, 0);
    assert!(wait_for(|| ring.used_idx(&m) == 1));

    // Quiesce and save; a request the driver makes meanwhile waits for the new device.
    let saved = {
        let mut t = a.t.lock().unwrap();
        t.quiesce();
        t.save_state()
    };
    write_request(&m, &mut ring, 2, 0xb2);
    a.w(0x50, 0);
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(ring.used_idx(&m), 1, "a quiesced device takes no request");

    // The same disk and memory behind a freshly built device: restore, resume.
    let b = Mmio::new(blk(&img, false), &m, irq.clone());
    {
        let mut t = b.t.lock().unwrap();
        t.restore_state(&saved).unwrap();
        assert_eq!(t.save_state(), saved);
        t.resume().unwrap();
    }
    assert_eq!(b.r(0x70), 15, "the driver's status survives");
    assert!(
        wait_for(|| ring.used_idx(&m) == 2),
        "resume looks at the queue"
    );
    write_request(&m, &mut ring, 3, 0xc3);
    b.w(0x50, 0);
    assert!(wait_for(|| ring.used_idx(&m) == 3));
    let f = img.read();
    for (sector, byte) in [(1, 0xa1), (2, 0xb2), (3, 0xc3)] {
        assert!(f[sector * 512..(sector + 1) * 512]
            .iter()
            .all(|&x| x == byte));
    }
    drop(a);

    // A state from another device type is refused and changes nothing.
    let r = Mmio::new(Box::new(crate::rng::Rng::new()), &m, irq);
    let err = r.t.lock().unwrap().restore_state(&saved).unwrap_err();
    assert!(err.to_string().contains("device type"), "{err}");
    assert_eq!(r.r(0x70), 0);
}

#[test]
fn mmio_block_quiesced_with_large_reads_in_flight_answers_each_once() {
    // 32 reads of 256 KiB (the I/O threads' kind of request) made available at once, and the
    // device quiesced right after the notification, while some are on the I/O threads. The
    // quiesce must return every read it took (data and status written) before the state is
    // saved; a new device restored from it answers the rest, and no read is answered twice.
    const N: u16 = 32;
    const LEN: u32 = 256 << 10;
    const BUFS: u64 = 0x40_0000;
    let m = mem();
    let img = TempImage::new(8 << 20, |i| ((i / 512) as u8) ^ (i as u8).rotate_left(3));
    let irq = Arc::new(TestIrq::default());
    let a = Mmio::new(blk(&img, false), &m, irq.clone());
    let mut ring = Ring::new(&m, 0x1_0000, 128);
    assert_eq!(a.init(ALL, &[(0, &ring)]), 15);
    for i in 0..N {
        let (h, s) = (HDR + 16 * u64::from(i), STATUS + u64::from(i));
        m.write_obj(0u32, GuestAddress(h)).unwrap();
        m.write_obj(0u32, GuestAddress(h + 4)).unwrap();
        m.write_obj(u64::from(i) * 512, GuestAddress(h + 8))
            .unwrap();
        m.write_obj(0xffu8, GuestAddress(s)).unwrap();
        let d = BUFS + u64::from(i) * u64::from(LEN);
        ring.add_chain(&m, 3 * i, &[(h, 16, false), (d, LEN, true), (s, 1, true)]);
    }
    a.w(0x50, 0);
    let saved = {
        let mut t = a.t.lock().unwrap();
        t.quiesce();
        t.save_state()
    };
    let answered = |upto: u16| {
        let mut heads = Vec::new();
        for e in 0..upto {
            let (head, len) = ring.used_elem(&m, e);
            assert_eq!(len, LEN + 1, "used length of read {}", head / 3);
            heads.push(head);
        }
        heads.sort();
        heads.dedup();
        assert_eq!(heads.len(), usize::from(upto), "a read answered twice");
        for &head in &heads {
            let i = head / 3;
            let st: u8 = m.read_obj(GuestAddress(STATUS + u64::from(i))).unwrap();
            assert_eq!(st, 0, "read {i} answered without its status");
            let mut got = vec![0u8; LEN as usize];
            m.read_slice(&mut got, GuestAddress(BUFS + u64::from(i) * u64::from(LEN)))
                .unwrap();
            let at = i as usize * 512 * 512;
            assert!(got == img.read()[at..at + LEN as usize], "read {i}'s data");
        }
    };
    let after_quiesce = ring.used_idx(&m);
    answered(after_quiesce);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(
        ring.used_idx(&m),
        after_quiesce,
        "nothing answered after the quiesce"
    );

    let b = Mmio::new(blk(&img, false), &m, irq);
    {
        let mut t = b.t.lock().unwrap();
        t.restore_state(&saved).unwrap();
        t.resume().unwrap();
    }
    assert!(wait_for(|| ring.used_idx(&m) == N), "the rest after resume");
    answered(N);
    drop(a);
}
