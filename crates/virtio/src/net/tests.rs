//! virtio-net tests. The TAP test runs inside a network namespace it creates (needs root).

use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::{Arc, Mutex};

use kvmbox_cpu::GuestMemoryMmap;
use kvmbox_cpu::IoHandler;
use kvmbox_devices::IoBus;
use vm_memory::{Bytes, GuestAddress};

use super::event_handler::{fill_rx_chain, place_frame, Placed};
use super::{parse_tx_frame, Net, NetBackendConfig, NetConfig, MAX_FRAME, VNET_HDR_LEN};
use crate::queue::{pop_chain, ChainError};
use crate::test_util::*;
use crate::transport::MmioTransport;

/// Where the tests put the device's MMIO transport.
const BASE: u64 = 0xd000_0000;

/// `net` on an MMIO transport at [`BASE`] of a new bus.
fn mmio_bus(net: Net, m: &GuestMemoryMmap, irq: Arc<TestIrq>) -> IoBus {
    let t = MmioTransport::new(Box::new(net), m.clone(), irq).unwrap();
    let io = IoBus::default();
    io.mmio
        .insert(Arc::new(Mutex::new(t)), BASE, 0x1000)
        .unwrap();
    io
}

/// The transport register at `off`.
fn mmio_r(io: &IoBus, off: u64) -> u32 {
    let mut d = [0u8; 4];
    io.mmio_read(BASE + off, &mut d);
    u32::from_le_bytes(d)
}

/// Drive the device as a guest driver does: ACKNOWLEDGE|DRIVER, every offered feature,
/// FEATURES_OK (checked), the receive and transmit queues on `rx` and `tx`, DRIVER_OK.
/// Returns the status the device shows then.
fn activate(io: &IoBus, rx: &Ring, tx: &Ring) -> u32 {
    let w = |off: u64, v: u32| io.mmio_write(BASE + off, &v.to_le_bytes());
    w(0x70, 3);
    for sel in 0..2 {
        w(0x14, sel);
        let v = mmio_r(io, 0x10);
        w(0x24, sel);
        w(0x20, v);
    }
    w(0x70, 11);
    assert_eq!(mmio_r(io, 0x70), 11, "FEATURES_OK kept");
    for (q, ring) in [(0u32, rx), (1, tx)] {
        w(0x30, q);
        w(0x38, u32::from(ring.size));
        w(0x80, ring.desc as u32);
        w(0x90, ring.avail as u32);
        w(0xa0, ring.used as u32);
        w(0x44, 1);
    }
    w(0x70, 15);
    mmio_r(io, 0x70)
}

#[test]
fn transmit_and_receive_chain_shapes() {
    let m = mem();
    let mut r = Ring::new(&m, 0x1_0000, 8);
    let mut q = r.queue();
    m.write_slice(&[7u8; 100], GuestAddress(0x3_0000)).unwrap();
    r.add_chain(&m, 0, &[(0x3_0000, 10, false), (0x3_0010, 50, false)]);
    r.add_chain(&m, 2, &[(0x3_0000, 8, false)]);
    r.add_chain(&m, 3, &[(0x3_0000, 20, false), (0x3_1000, 20, true)]);
    r.add_chain(&m, 5, &[(0x3_0000, MAX_FRAME as u32 + 1, false)]);
    let mut buf = vec![0u8; MAX_FRAME];
    let mut next = || pop_chain(&mut q, &m).unwrap().unwrap().1.unwrap();
    assert_eq!(parse_tx_frame(&next(), &m, &mut buf), Ok(60));
    assert!(matches!(
        parse_tx_frame(&next(), &m, &mut buf),
        Err(ChainError::Malformed(_))
    ));
    assert!(matches!(
        parse_tx_frame(&next(), &m, &mut buf),
        Err(ChainError::Malformed(_))
    ));
    assert!(matches!(
        parse_tx_frame(&next(), &m, &mut buf),
        Err(ChainError::Malformed(_))
    ));

    let mut r = Ring::new(&m, 0x1_0000, 8);
    let mut q = r.queue();
    r.add_chain(&m, 0, &[(0x4_0000, 30, true), (0x4_1000, 30, true)]);
    r.add_chain(&m, 2, &[(0x4_0000, 30, true)]);
    r.add_chain(&m, 3, &[(0x4_0000, 10, false), (0x4_1000, 100, true)]);
    let frame: Vec<u8> = (0..50).collect();
    let mut next = || pop_chain(&mut q, &m).unwrap().unwrap().1.unwrap();
    assert_eq!(fill_rx_chain(&next(), &m, &frame), Ok(50));
    let mut b = [0u8; 20];
    m.read_slice(&mut b, GuestAddress(0x4_1000)).unwrap();
    assert_eq!(b[0], 30);
    assert!(fill_rx_chain(&next(), &m, &frame).is_err(), "too small");
    assert!(fill_rx_chain(&next(), &m, &frame).is_err(), "readable part");
}

struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("kvmbox-vt{tag}-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(
            ok.success(),
            "ip netns add {name} (the TAP test needs root)"
        );
        Self(name)
    }
    fn ip(&self, args: &[&str]) {
        let ok = Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .status()
            .unwrap();
        assert!(ok.success(), "ip -n {} {args:?}", self.0);
    }
    /// Open the TAP from a thread that entered the namespace, so it is created there.
    fn open_net(&self, cfg: NetConfig) -> Net {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let f = std::fs::File::open(path).unwrap();
            // SAFETY: setns on this thread only, with a namespace fd we own.
            let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            Net::new(&cfg).unwrap()
        })
        .join()
        .unwrap()
    }
}

impl Netns {
    /// Bytes the kernel received on interface `dev` (frames the device wrote into the tap).
    fn rx_bytes(&self, dev: &str) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "cat"])
            .arg(format!("/sys/class/net/{dev}/statistics/rx_bytes"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn arp_request(mac: [u8; 6], spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&spa);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&tpa);
    f
}

#[test]
fn tap_arp_round_trip_in_a_network_namespace() {
    let ns = Netns::new("");
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    let net = ns.open_net(NetConfig {
        backend: NetBackendConfig::Tap("kvbtap0".into()),
        mac: Some(mac),
        rx_limiter: Default::default(),
        tx_limiter: Default::default(),
    });
    assert_eq!(net.backend_label(), "tap 'kvbtap0'");
    ns.ip(&["link", "set", "kvbtap0", "up"]);
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", "kvbtap0"]);

    let m: GuestMemoryMmap = mem();
    let irq = Arc::new(TestIrq::default());
    let metrics = crate::VirtioDevice::metrics(&net);
    let io = mmio_bus(net, &m, irq.clone());
    let r = |off: u64| mmio_r(&io, off);
    let w = |off: u64, v: u32| io.mmio_write(BASE + off, &v.to_le_bytes());
    assert_eq!(r(8), crate::TYPE_NET);
    let mut cfg = [0u8; 6];
    for (i, b) in cfg.iter_mut().enumerate() {
        let mut d = [0u8; 1];
        io.mmio_read(BASE + 0x100 + i as u64, &mut d);
        *b = d[0];
    }
    assert_eq!(cfg, mac);

    let mut rx = Ring::new(&m, 0x1_0000, 16);
    let mut tx = Ring::new(&m, 0x2_0000, 16);
    assert_eq!(
        activate(&io, &rx, &tx),
        15,
        "activated (TUNSETOFFLOAD with CSUM/TSO accepted)"
    );

    // Eight receive buffers big enough for TSO frames.
    for i in 0..8u16 {
        rx.add_chain(
            &m,
            i,
            &[(0x10_0000 + u64::from(i) * 0x1_0000, MAX_FRAME as u32, true)],
        );
    }
    w(0x50, 0);
    let arp = arp_request(mac, [10, 77, 0, 2], [10, 77, 0, 1]);
    m.write_slice(&arp, GuestAddress(0x9_0000)).unwrap();
    tx.add_chain(
        &m,
        0,
        &[
            (0x9_0000, 12, false),
            (0x9_0000 + 12, arp.len() as u32 - 12, false),
        ],
    );
    w(0x50, 1);
    assert!(wait_for(|| tx.used_idx(&m) == 1), "transmit completed");

    // Look for the kernel's ARP reply among received frames (IPv6 chatter may come too).
    let found = wait_for(|| {
        (0..rx.used_idx(&m)).any(|i| {
            let (id, len) = rx.used_elem(&m, i);
            let mut f = vec![0u8; len as usize];
            m.read_slice(&mut f, GuestAddress(0x10_0000 + u64::from(id) * 0x1_0000))
                .unwrap();
            let e = &f[VNET_HDR_LEN.min(f.len())..];
            e.len() >= 42
                && e[..6] == mac
                && e[12..14] == [0x08, 0x06]
                && e[20..22] == [0, 2]
                && e[28..32] == [10, 77, 0, 1]
        })
    });
    assert!(
        found,
        "ARP reply from the namespace's kvbtap0 reached the guest"
    );
    assert!(irq.edges.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    let [requests, rejected, _, bytes_out, bytes_in, broken] = metrics.snapshot();
    assert_eq!(bytes_out, arp.len() as u64);
    assert!(bytes_in >= 42 + VNET_HDR_LEN as u64);
    assert!(requests >= 2);
    assert_eq!((rejected, broken), (0, 0));

    // The interface disappears under the running device: the worker must not spin on it.
    ns.ip(&["link", "del", "kvbtap0"]);
    assert!(wait_for(|| metrics
        .errors
        .load(std::sync::atomic::Ordering::Relaxed)
        >= 1));
    let before = worker_cpu_ticks();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let spent = worker_cpu_ticks() - before;
    assert!(
        spent < 10,
        "virtio-net worker used {spent} ticks in 300 ms after the tap died"
    );
    w(0x70, 0);
    assert_eq!(r(0x70), 0);
}

/// This process's /proc/self/task directories. One listing stops early when the thread it has
/// reached ends during the listing (the kernel walks on from that thread), and the other tests
/// start and end threads all the time: list until two listings in a row agree.
fn task_dirs() -> Vec<std::path::PathBuf> {
    let list = || -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        v.sort();
        v
    };
    let mut last = list();
    loop {
        let next = list();
        if next == last {
            return next;
        }
        last = next;
    }
}

/// utime + stime (clock ticks) of this process's "virtio-net" thread.
fn worker_cpu_ticks() -> u64 {
    for dir in task_dirs() {
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() == "virtio-net" {
            let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            return f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        }
    }
    panic!("no virtio-net worker thread");
}

#[test]
fn receive_frames_spread_over_mergeable_buffers() {
    let m = mem();
    let metrics = crate::DeviceMetrics::default();
    let mut r = Ring::new(&m, 0x1_0000, 8);
    let mut q = r.queue();
    let mut frame: Vec<u8> = (0..100u8).collect();
    // Only two 32-byte buffers: not enough, nothing consumed.
    r.add_chain(&m, 0, &[(0x4_0000, 32, true)]);
    r.add_chain(&m, 1, &[(0x4_1000, 32, true)]);
    assert_eq!(
        place_frame(&mut q, &m, &mut frame, true, &metrics).unwrap(),
        Placed::NoBuffers
    );
    assert_eq!(r.used_idx(&m), 0);
    // A malformed chain (device-readable) and two more buffers: 4 buffers carry 100 bytes.
    r.add_chain(&m, 2, &[(0x4_2000, 32, false)]);
    r.add_chain(&m, 3, &[(0x4_3000, 32, true)]);
    r.add_chain(&m, 4, &[(0x4_4000, 16, true), (0x4_5000, 16, true)]);
    assert_eq!(
        place_frame(&mut q, &m, &mut frame, true, &metrics).unwrap(),
        Placed::Done { chains: 5 }
    );
    let used: Vec<_> = (0..5).map(|i| r.used_elem(&m, i)).collect();
    assert_eq!(used, vec![(0, 32), (1, 32), (3, 32), (4, 4), (2, 0)]);
    let mut hdr = [0u8; 12];
    m.read_slice(&mut hdr, GuestAddress(0x4_0000)).unwrap();
    assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 4, "num_buffers");
    let mut tail = [0u8; 4];
    m.read_slice(&mut tail, GuestAddress(0x4_4000)).unwrap();
    assert_eq!(tail, [96, 97, 98, 99]);
    assert_eq!(metrics.snapshot(), [5, 1, 0, 0, 100, 0]);

    // Without mergeable buffers a too-small chain drops the frame.
    let mut r = Ring::new(&m, 0x1_0000, 8);
    let mut q = r.queue();
    r.add_chain(&m, 0, &[(0x4_0000, 32, true)]);
    assert_eq!(
        place_frame(&mut q, &m, &mut frame, false, &metrics).unwrap(),
        Placed::Done { chains: 1 }
    );
    assert_eq!(r.used_elem(&m, 0), (0, 0));

    // A ring that can never hold the frame drops it instead of waiting forever.
    let mut r = Ring::new(&m, 0x1_0000, 2);
    let mut q = r.queue();
    r.add_chain(&m, 0, &[(0x4_0000, 16, true)]);
    r.add_chain(&m, 1, &[(0x4_1000, 16, true)]);
    assert_eq!(
        place_frame(&mut q, &m, &mut frame, true, &metrics).unwrap(),
        Placed::Done { chains: 2 }
    );
    assert_eq!(r.used_elem(&m, 0), (0, 0));
    assert_eq!(r.used_elem(&m, 1), (1, 0));
}

fn csum(data: &[u8], mut sum: u32) -> u32 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// A TCP/IPv4 frame with a virtio-net header asking for checksum offload and, when the
/// payload exceeds one MSS, TCP segmentation offload (gso_size 1448).
fn tcp_frame(src_mac: [u8; 6], dst_mac: [u8; 6], payload: usize) -> Vec<u8> {
    let tso = payload > 1448;
    let mut f = vec![0u8; VNET_HDR_LEN];
    f[0] = 1; // NEEDS_CSUM
    f[1] = if tso { 1 } else { 0 }; // GSO_TCPV4
    f[2..4].copy_from_slice(&54u16.to_le_bytes()); // hdr_len
    f[4..6].copy_from_slice(&(if tso { 1448u16 } else { 0 }).to_le_bytes());
    f[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
    f[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 20 + payload) as u16;
    let mut ip = vec![
        0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 77, 0, 2, 10, 77, 0, 1,
    ];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    let c = !fold(csum(&ip, 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5001u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // PSH, ACK
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    // Partial checksum: the pseudo-header sum, as a guest with CSUM offload leaves it.
    let mut pseudo = vec![10, 77, 0, 2, 10, 77, 0, 1, 0, 6];
    pseudo.extend_from_slice(&((20 + payload) as u16).to_be_bytes());
    tcp[16..18].copy_from_slice(&fold(csum(&pseudo, 0)).to_be_bytes());
    f.extend_from_slice(&tcp);
    f.resize(f.len() + payload, 0x61);
    f
}

/// Transmit throughput into a TAP (in a private network namespace) with 1500-byte frames and
/// with 64 KiB TSO frames: the offloads are what lets the guest send more than one MTU per
/// frame. Run with `cargo test -p kvmbox-virtio --release bench_tap -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_tap_tx_mtu_vs_tso() {
    use std::time::{Duration, Instant};
    let ns = Netns::new("b");
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x57];
    let net = ns.open_net(NetConfig {
        backend: NetBackendConfig::Tap("kvbtapb".into()),
        mac: Some(mac),
        rx_limiter: Default::default(),
        tx_limiter: Default::default(),
    });
    ns.ip(&["link", "set", "kvbtapb", "up"]);
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", "kvbtapb"]);
    let out = Command::new("ip")
        .args(["-n", &ns.0, "-o", "link", "show", "kvbtapb"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let tap_mac_s = text
        .split("link/ether ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    let mut tap_mac = [0u8; 6];
    for (b, p) in tap_mac.iter_mut().zip(tap_mac_s.split(':')) {
        *b = u8::from_str_radix(p, 16).unwrap();
    }
    let metrics = crate::VirtioDevice::metrics(&net);
    let m = mem();
    let io = mmio_bus(net, &m, Arc::new(TestIrq::default()));
    let w = |off: u64, v: u32| io.mmio_write(BASE + off, &v.to_le_bytes());
    let rx = Ring::new(&m, 0x1_0000, 256);
    let mut tx = Ring::new(&m, 0x4_0000, 256);
    assert_eq!(activate(&io, &rx, &tx), 15);
    for (name, payload) in [
        ("1500-byte frames", 1460usize),
        ("64 KiB TSO frames", 65000),
    ] {
        let frame = tcp_frame(mac, tap_mac, payload);
        m.write_slice(&frame, GuestAddress(0x10_0000)).unwrap();
        let before = metrics.snapshot();
        let kernel_before = ns.rx_bytes("kvbtapb");
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < Duration::from_secs(1) {
            for _ in 0..64 {
                let d = tx.next_avail % 256;
                tx.add_chain(&m, d, &[(0x10_0000, frame.len() as u32, false)]);
            }
            w(0x50, 1);
            let target = tx.next_avail;
            assert!(wait_for(|| tx.used_idx(&m) == target));
            sent += 64;
        }
        let secs = start.elapsed().as_secs_f64();
        let after = metrics.snapshot();
        let bytes = after[3] - before[3];
        let kernel = ns.rx_bytes("kvbtapb") - kernel_before;
        println!(
            "virtio-net tx {name}: {:.0} frames/s, {:.2} Gbit/s written to the tap, \
             {:.2} Gbit/s counted by the kernel ({} errors)",
            sent as f64 / secs,
            bytes as f64 * 8.0 / secs / 1e9,
            kernel as f64 * 8.0 / secs / 1e9,
            after[2] - before[2]
        );
        assert!(
            kernel * 10 >= bytes * 9,
            "the kernel received what the device wrote"
        );
    }
    w(0x70, 0);
}

/// A DHCP DISCOVER from `mac`, with a virtio-net header.
fn dhcp_discover(mac: [u8; 6]) -> Vec<u8> {
    let mut bootp = vec![0u8; 236];
    bootp[..4].copy_from_slice(&[1, 1, 6, 0]);
    bootp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    bootp[10] = 0x80; // broadcast reply
    bootp[28..34].copy_from_slice(&mac);
    bootp.extend_from_slice(&[0x63, 0x82, 0x53, 0x63, 53, 1, 1, 55, 3, 1, 3, 26, 255]);
    let udp_len = (8 + bootp.len()) as u16;
    let mut ip = vec![
        0x45, 0, 0, 0, 0, 1, 0, 0, 64, 17, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255,
    ];
    ip[2..4].copy_from_slice(&(20 + udp_len).to_be_bytes());
    let c = !fold(csum(&ip, 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&68u16.to_be_bytes());
    f.extend_from_slice(&67u16.to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum (allowed over IPv4)
    f.extend_from_slice(&bootp);
    f
}

/// The passt processes this test process started.
fn passt_children() -> Vec<i32> {
    let mut pids = Vec::new();
    for t in task_dirs() {
        let kids = std::fs::read_to_string(t.join("children")).unwrap_or_default();
        for p in kids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
            if comm.starts_with("passt") {
                pids.push(p);
            }
        }
    }
    pids
}

/// The user network end to end below the guest: a real passt behind the device, a DHCP
/// DISCOVER sent through the transmit queue and passt's OFFER (10.0.2.15, router 10.0.2.2)
/// read from the receive queue, marked checksum-valid; then passt is killed and the link
/// status in configuration space goes down with a configuration interrupt. No privileges.
#[test]
fn user_network_dhcp_through_passt_and_link_down_when_it_dies() {
    if Command::new("passt").arg("--version").output().is_err() {
        kvmbox_cpu::kvm::report_skip(
            "user_network_dhcp_through_passt_and_link_down_when_it_dies",
            "passt is not installed (scripts/setup.sh installs it)",
        );
        return;
    }
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x58];
    let before: Vec<i32> = passt_children();
    let net = Net::new(&"user,mac=52:54:00:12:34:58".parse().unwrap()).unwrap();
    assert_eq!(net.backend_label(), "user");
    let passt: Vec<i32> = passt_children()
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    assert_eq!(passt.len(), 1, "one passt started");
    let m: GuestMemoryMmap = mem();
    let irq = Arc::new(TestIrq::default());
    let metrics = crate::VirtioDevice::metrics(&net);
    let io = mmio_bus(net, &m, irq.clone());
    let r = |off: u64| mmio_r(&io, off);
    let w = |off: u64, v: u32| io.mmio_write(BASE + off, &v.to_le_bytes());
    let status = || {
        let mut d = [0u8; 2];
        io.mmio_read(BASE + 0x100 + 6, &mut d);
        u16::from_le_bytes(d)
    };
    assert_eq!(status(), 1, "link up");
    let mut rx = Ring::new(&m, 0x1_0000, 16);
    let mut tx = Ring::new(&m, 0x2_0000, 16);
    assert_eq!(activate(&io, &rx, &tx), 15);
    for i in 0..8u16 {
        rx.add_chain(
            &m,
            i,
            &[(0x10_0000 + u64::from(i) * 0x1_0000, MAX_FRAME as u32, true)],
        );
    }
    w(0x50, 0);
    let d = dhcp_discover(mac);
    m.write_slice(&d, GuestAddress(0x9_0000)).unwrap();
    tx.add_chain(&m, 0, &[(0x9_0000, d.len() as u32, false)]);
    w(0x50, 1);
    assert!(wait_for(|| tx.used_idx(&m) == 1), "transmitted");
    let offer = wait_for(|| {
        (0..rx.used_idx(&m)).any(|i| {
            let (id, len) = rx.used_elem(&m, i);
            let mut f = vec![0u8; len as usize];
            m.read_slice(&mut f, GuestAddress(0x10_0000 + u64::from(id) * 0x1_0000))
                .unwrap();
            let e = &f[VNET_HDR_LEN.min(f.len())..];
            f[0] == 2 // DATA_VALID
                && e.len() > 300
                && e[..6] == mac
                && e[12..14] == [0x08, 0x00]
                && e[34..36] == 67u16.to_be_bytes()
                && e[58..62] == [10, 0, 2, 15]
                && e.windows(6).any(|o| o == [3, 4, 10, 0, 2, 2])
        })
    });
    assert!(
        offer,
        "passt's DHCP offer of 10.0.2.15 via 10.0.2.2 reached the guest"
    );
    let config_irqs = irq.edges.load(std::sync::atomic::Ordering::SeqCst);

    // SAFETY: killing the passt this test's device started.
    assert_eq!(unsafe { libc::kill(passt[0], libc::SIGKILL) }, 0);
    assert!(wait_for(|| status() == 0), "link down after passt died");
    assert!(irq.edges.load(std::sync::atomic::Ordering::SeqCst) > config_irqs);
    assert!(metrics.errors.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    // Frames the guest still sends come back to it (dropped), never stall the queue.
    tx.add_chain(&m, 1, &[(0x9_0000, d.len() as u32, false)]);
    w(0x50, 1);
    assert!(wait_for(|| tx.used_idx(&m) == 2));
    w(0x70, 0);
    assert_eq!(r(0x70), 0);
}

/// Rate limiters hold frames back without dropping them, both ways, until a live update:
/// one frame each way per ten minutes lets the first ARP request out and its reply in; the
/// second request stays in the transmit queue and, once the transmit limit is lifted, its
/// reply waits in the device (not in the guest's buffers) until the receive limit is lifted.
#[test]
fn rate_limited_frames_wait_for_a_live_update_in_both_directions() {
    use kvmbox_ratelimit::{BucketConfig, RateLimiterConfig};
    let ns = Netns::new("rl");
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x57];
    let one_per_10_min = RateLimiterConfig {
        bandwidth: None,
        ops: Some(BucketConfig {
            size: 1,
            one_time_burst: 0,
            refill_time: 600_000,
        }),
    };
    let net = ns.open_net(NetConfig {
        backend: NetBackendConfig::Tap("kvbtapr".into()),
        mac: Some(mac),
        rx_limiter: one_per_10_min,
        tx_limiter: one_per_10_min,
    });
    let (rx_limit, tx_limit) = net.rate_limiters();
    // No IPv6 chatter (router solicitations, DAD) to take the receive token first.
    let ok = Command::new("ip")
        .args(["netns", "exec", &ns.0, "sysctl", "-qw"])
        .arg("net.ipv6.conf.kvbtapr.disable_ipv6=1")
        .status()
        .unwrap();
    assert!(ok.success(), "disabling IPv6 on kvbtapr");
    ns.ip(&["link", "set", "kvbtapr", "up"]);
    ns.ip(&["addr", "add", "10.78.0.1/24", "dev", "kvbtapr"]);

    let m: GuestMemoryMmap = mem();
    let io = mmio_bus(net, &m, Arc::new(TestIrq::default()));
    let w = |off: u64, v: u32| io.mmio_write(BASE + off, &v.to_le_bytes());
    let mut rx = Ring::new(&m, 0x1_0000, 16);
    let mut tx = Ring::new(&m, 0x2_0000, 16);
    assert_eq!(activate(&io, &rx, &tx), 15);
    for i in 0..8u16 {
        rx.add_chain(
            &m,
            i,
            &[(0x10_0000 + u64::from(i) * 0x1_0000, MAX_FRAME as u32, true)],
        );
    }
    w(0x50, 0);
    let replies = |rx: &Ring| {
        (0..rx.used_idx(&m))
            .filter(|&i| {
                let (id, len) = rx.used_elem(&m, i);
                let mut f = vec![0u8; len as usize];
                m.read_slice(&mut f, GuestAddress(0x10_0000 + u64::from(id) * 0x1_0000))
                    .unwrap();
                let e = &f[VNET_HDR_LEN.min(f.len())..];
                e.len() >= 42 && e[12..14] == [0x08, 0x06] && e[20..22] == [0, 2]
            })
            .count()
    };
    for (i, spa) in [[10, 78, 0, 2], [10, 78, 0, 3]].into_iter().enumerate() {
        let arp = arp_request(mac, spa, [10, 78, 0, 1]);
        let at = 0x9_0000 + i as u64 * 0x1000;
        m.write_slice(&arp, GuestAddress(at)).unwrap();
        tx.add_chain(&m, i as u16, &[(at, arp.len() as u32, false)]);
        w(0x50, 1);
    }
    assert!(
        wait_for(|| tx.used_idx(&m) == 1),
        "the first request went out"
    );
    assert!(wait_for(|| replies(&rx) == 1), "its reply came in");
    // Held, however long we look (the next token is ten minutes away).
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(tx.used_idx(&m), 1, "the second request stayed queued");
    let unlimited = RateLimiterConfig {
        bandwidth: None,
        ops: Some(BucketConfig {
            size: 0,
            one_time_burst: 0,
            refill_time: 0,
        }),
    };
    tx_limit.update(&unlimited);
    assert!(wait_for(|| tx.used_idx(&m) == 2), "sent after the update");
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(rx.used_idx(&m), 1, "the second reply is held back");
    rx_limit.update(&unlimited);
    assert!(wait_for(|| replies(&rx) == 2), "delivered after the update");
    assert!(rx_limit.config().is_unlimited() && tx_limit.config().is_unlimited());
    w(0x70, 0);
}
