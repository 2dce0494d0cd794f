//! virtio-vsock device tests: the device on an MMIO transport with its worker thread, real
//! guest memory and virtqueues, a guest driver written here, and host programs on real Unix
//! sockets.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use kvmbox_cpu::GuestMemoryMmap;
use kvmbox_cpu::IoHandler;
use kvmbox_devices::IoBus;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::test_util::*;
use crate::transport::MmioTransport;
use crate::DeviceMetrics;

const BASE: u64 = 0xd000_0000;
const GUEST_CID: u64 = 3;
const QSIZE: u16 = 64;
/// Receive buffers: one page each, by descriptor index.
const RX_BUF: u64 = 0x10_0000;
const RX_BUF_LEN: u32 = 4096;
/// Transmit buffers: room for a header and 64 KiB, by descriptor index.
const TX_BUF: u64 = 0x20_0000;
const TX_SLOT: u64 = 0x1_1000;

/// A scratch directory for the sockets, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "kvmbox-vsock-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The guest side: the device's three queues as a driver sets them up.
struct Guest {
    m: GuestMemoryMmap,
    io: IoBus,
    rx: Ring,
    tx: Ring,
    rx_seen: u16,
    tx_sent: u16,
    metrics: Arc<DeviceMetrics>,
    uds: PathBuf,
    _dir: Dir,
}

fn hdr(op: u16, src_port: u32, dst_port: u32) -> Hdr {
    Hdr {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 64 * 1024,
        ..Hdr::default()
    }
}

impl Guest {
    /// A device with `rx_bufs` receive buffers given, activated.
    fn new(rx_bufs: u16) -> Self {
        let dir = Dir::new();
        let uds = dir.0.join("v.sock");
        let cfg = VsockConfig::new(GUEST_CID, uds.clone()).unwrap();
        let dev = Vsock::new(&cfg).unwrap();
        let metrics = crate::VirtioDevice::metrics(&dev);
        let m = mem();
        let irq = Arc::new(TestIrq::default());
        let t = MmioTransport::new(Box::new(dev), m.clone(), irq).unwrap();
        let io = IoBus::default();
        io.mmio
            .insert(Arc::new(Mutex::new(t)), BASE, 0x1000)
            .unwrap();
        let rx = Ring::new(&m, 0x1_0000, QSIZE);
        let tx = Ring::new(&m, 0x4_0000, QSIZE);
        let ev = Ring::new(&m, 0x7_0000, QSIZE);
        let mut g = Self {
            m,
            io,
            rx,
            tx,
            rx_seen: 0,
            tx_sent: 0,
            metrics,
            uds,
            _dir: dir,
        };
        assert_eq!(g.reg(0x08), 19, "device id: socket");
        let w = |off: u64, v: u32| g.io.mmio_write(BASE + off, &v.to_le_bytes());
        w(0x70, 3);
        for sel in 0..2 {
            w(0x14, sel);
            let v = g.reg(0x10);
            w(0x24, sel);
            w(0x20, v);
        }
        w(0x70, 11);
        assert_eq!(g.reg(0x70), 11, "FEATURES_OK kept");
        for (q, ring) in [(0u32, &g.rx), (1, &g.tx), (2, &ev)] {
            w(0x30, q);
            w(0x38, u32::from(ring.size));
            w(0x80, ring.desc as u32);
            w(0x90, ring.avail as u32);
            w(0xa0, ring.used as u32);
            w(0x44, 1);
        }
        w(0x70, 15);
        assert_eq!(g.reg(0x70), 15, "DRIVER_OK without NEEDS_RESET");
        assert_eq!(g.reg(0x100), GUEST_CID as u32, "guest_cid low");
        assert_eq!(g.reg(0x104), 0, "guest_cid high");
        g.give_rx(rx_bufs);
        g
    }

    fn reg(&self, off: u64) -> u32 {
        let mut d = [0u8; 4];
        self.io.mmio_read(BASE + off, &mut d);
        u32::from_le_bytes(d)
    }

    fn notify(&self, q: u32) {
        self.io.mmio_write(BASE + 0x50, &q.to_le_bytes());
    }

    /// Make `n` more receive buffers available.
    fn give_rx(&mut self, n: u16) {
        for _ in 0..n {
            let idx = self.rx.next_avail % QSIZE;
            let addr = RX_BUF + u64::from(idx) * u64::from(RX_BUF_LEN);
            self.rx.add_chain(&self.m, idx, &[(addr, RX_BUF_LEN, true)]);
        }
        self.notify(0);
    }

    /// Transmit one packet (header and `data`, `len` set from it unless given).
    fn send_raw(&mut self, h: Hdr, data: &[u8]) {
        let idx = self.tx.next_avail % QSIZE;
        let addr = TX_BUF + u64::from(idx) * TX_SLOT;
        self.m
            .write_slice(&h.to_bytes(), GuestAddress(addr))
            .unwrap();
        self.m
            .write_slice(data, GuestAddress(addr + HDR_LEN as u64))
            .unwrap();
        let len = (HDR_LEN + data.len()) as u32;
        self.tx.add_chain(&self.m, idx, &[(addr, len, false)]);
        self.tx_sent = self.tx_sent.wrapping_add(1);
        self.notify(1);
        let want = self.tx_sent;
        assert!(
            wait_for(|| self.tx.used_idx(&self.m) == want),
            "transmitted"
        );
    }

    fn send(&mut self, mut h: Hdr, data: &[u8]) {
        h.len = data.len() as u32;
        self.send_raw(h, data);
    }

    /// The next packet the device put in a receive buffer, if one came within 5 s.
    fn recv(&mut self) -> Option<(Hdr, Vec<u8>)> {
        let seen = self.rx_seen;
        if !wait_for(|| self.rx.used_idx(&self.m) != seen) {
            return None;
        }
        let (id, len) = self.rx.used_elem(&self.m, seen);
        self.rx_seen = seen.wrapping_add(1);
        let addr = RX_BUF + u64::from(id) * u64::from(RX_BUF_LEN);
        let mut b = vec![0u8; len as usize];
        self.m.read_slice(&mut b, GuestAddress(addr)).unwrap();
        assert!(b.len() >= HDR_LEN, "used length {len} holds a header");
        let h = Hdr::from_bytes(b[..HDR_LEN].try_into().unwrap());
        assert_eq!(
            h.len as usize,
            b.len() - HDR_LEN,
            "len matches the used length"
        );
        assert_eq!(
            (h.src_cid, h.dst_cid, h.type_),
            (HOST_CID, GUEST_CID, TYPE_STREAM)
        );
        // The buffer goes straight back to the device.
        self.give_rx(1);
        Some((h, b.split_off(HDR_LEN)))
    }

    /// The next packet, which must be `op`.
    fn expect(&mut self, op: u16) -> (Hdr, Vec<u8>) {
        let p = self
            .recv()
            .unwrap_or_else(|| panic!("no packet (wanted op {op})"));
        assert_eq!(p.0.op, op, "{:?}", p.0);
        p
    }

    /// No packet within a short while (after everything sent so far was handled).
    fn expect_nothing(&mut self) {
        // The transmit queue was completed; a round trip through the worker (a credit
        // request on a port no connection uses gets an RST) shows it is idle.
        self.send(hdr(OP_CREDIT_REQUEST, 9999, 9999), &[]);
        let (h, _) = self.expect(OP_RST);
        assert_eq!(
            (h.src_port, h.dst_port),
            (9999, 9999),
            "nothing before the probe"
        );
    }

    fn rejected(&self) -> u64 {
        self.metrics.snapshot()[1]
    }
}

/// Host program: connect to the device's socket and ask for guest port `port`.
fn host_connect(uds: &PathBuf, port: u32) -> UnixStream {
    let mut s = UnixStream::connect(uds).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    s
}

/// The other side closed (EOF, or a reset when it closed with our bytes unread).
fn assert_closed(s: &mut UnixStream) {
    match s.read(&mut [0u8; 4]) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        r => panic!("expected the socket closed, got {r:?}"),
    }
}

/// Read exactly `n` bytes.
fn read_n(s: &mut impl Read, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap();
    b
}

#[test]
fn host_connects_to_a_guest_listener_and_data_flows_both_ways() {
    let mut g = Guest::new(8);
    let mut host = host_connect(&g.uds, 52);
    // Bytes written right after the CONNECT line wait for the connection.
    host.write_all(b"early").unwrap();
    let (req, _) = g.expect(OP_REQUEST);
    assert_eq!(req.dst_port, 52);
    assert_eq!(req.buf_alloc, BUF_ALLOC);
    let hp = req.src_port;
    assert!(hp >= 1 << 30, "host port {hp}");
    // The guest listener accepts.
    g.send(hdr(OP_RESPONSE, 52, hp), &[]);
    let mut line = String::new();
    let mut r = BufReader::new(host.try_clone().unwrap());
    r.read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {hp}\n"));
    let (d, data) = g.expect(OP_RW);
    assert_eq!((d.src_port, d.dst_port), (hp, 52));
    assert_eq!(data, b"early");

    // Guest to host.
    g.send(hdr(OP_RW, 52, hp), b"hello host");
    assert_eq!(read_n(&mut r, 10), b"hello host");
    // Host to guest, more than one receive buffer holds: split over packets.
    let big: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    host.write_all(&big).unwrap();
    let mut got = Vec::new();
    while got.len() < big.len() {
        let (h, d) = g.expect(OP_RW);
        assert!(d.len() <= RX_BUF_LEN as usize - HDR_LEN);
        assert_eq!(h.fwd_cnt, 10, "the host side forwarded the 10 bytes");
        got.extend(d);
    }
    assert_eq!(got, big);

    // The host shuts its writing side: the guest is told the host sends no more (it reads
    // EOF) and may still send.
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let (s, _) = g.expect(OP_SHUTDOWN);
    assert_eq!(s.flags, SHUTDOWN_SEND);
    g.send(hdr(OP_RW, 52, hp), b"after eof");
    assert_eq!(read_n(&mut r, 9), b"after eof");
    // The host closes for good: what the guest sends then resets the connection.
    drop(r);
    drop(host);
    g.send(hdr(OP_RW, 52, hp), b"lost");
    let (rst, _) = g.expect(OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (hp, 52));
    g.expect_nothing();
}

#[test]
fn guest_connects_to_host_port_through_path_p() {
    let mut g = Guest::new(8);
    let l = UnixListener::bind(format!("{}_1234", g.uds.display())).unwrap();
    g.send(hdr(OP_REQUEST, 5000, 1234), &[]);
    let (resp, _) = g.expect(OP_RESPONSE);
    assert_eq!((resp.src_port, resp.dst_port), (1234, 5000));
    let (mut s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    g.send(hdr(OP_RW, 5000, 1234), b"ping");
    assert_eq!(read_n(&mut s, 4), b"ping");
    s.write_all(b"pong").unwrap();
    let (_, d) = g.expect(OP_RW);
    assert_eq!(d, b"pong");
    // The guest shuts both directions: the host reads EOF and the device answers RST.
    g.send(
        Hdr {
            flags: SHUTDOWN_RCV | SHUTDOWN_SEND,
            ..hdr(OP_SHUTDOWN, 5000, 1234)
        },
        &[],
    );
    g.expect(OP_RST);
    assert_eq!(s.read(&mut [0u8; 8]).unwrap(), 0, "EOF on the host side");

    // Nothing listens on port 77: refused with RST.
    g.send(hdr(OP_REQUEST, 5001, 77), &[]);
    let (r, _) = g.expect(OP_RST);
    assert_eq!((r.src_port, r.dst_port), (77, 5001));
}

#[test]
fn credit_limits_both_directions() {
    let mut g = Guest::new(16);
    let l = UnixListener::bind(format!("{}_7", g.uds.display())).unwrap();
    // The guest offers only 100 bytes of buffer.
    g.send(
        Hdr {
            buf_alloc: 100,
            ..hdr(OP_REQUEST, 40, 7)
        },
        &[],
    );
    g.expect(OP_RESPONSE);
    let (mut s, _) = l.accept().unwrap();
    s.write_all(&[1u8; 300]).unwrap();
    let (_, d) = g.expect(OP_RW);
    assert_eq!(d.len(), 100, "no more than the guest's credit");
    g.expect_nothing();
    // The guest consumed 60: 60 more come.
    g.send(
        Hdr {
            buf_alloc: 100,
            fwd_cnt: 60,
            ..hdr(OP_CREDIT_UPDATE, 40, 7)
        },
        &[],
    );
    let (_, d) = g.expect(OP_RW);
    assert_eq!(d.len(), 60);

    // Guest to host: the host side advertises BUF_ALLOC and says how much it forwarded.
    g.send(
        Hdr {
            buf_alloc: 100,
            fwd_cnt: 60,
            ..hdr(OP_CREDIT_REQUEST, 40, 7)
        },
        &[],
    );
    let (c, _) = g.expect(OP_CREDIT_UPDATE);
    assert_eq!((c.buf_alloc, c.fwd_cnt), (BUF_ALLOC, 0));
    // The host program reads nothing: once its socket is full, guest data waits in the
    // device, up to BUF_ALLOC; the packet that overruns the credit resets the connection.
    let chunk = vec![7u8; MAX_PKT_DATA];
    let mut sent = 0u64;
    let mut fwd = 0u64;
    let rst = 'outer: loop {
        g.send(
            Hdr {
                buf_alloc: 100,
                fwd_cnt: 60,
                ..hdr(OP_RW, 40, 7)
            },
            &chunk,
        );
        sent += chunk.len() as u64;
        assert!(sent < 64 << 20, "no reset after {sent} bytes");
        while g.rx.used_idx(&g.m) != g.rx_seen {
            let (h, _) = g.recv().unwrap();
            match h.op {
                OP_CREDIT_UPDATE => fwd = u64::from(h.fwd_cnt),
                _ => break 'outer h,
            }
        }
    };
    assert_eq!(rst.op, OP_RST, "{rst:?}");
    let fwd_at_rst = u64::from(rst.fwd_cnt);
    assert!(fwd_at_rst >= fwd);
    assert!(
        sent - fwd_at_rst > u64::from(BUF_ALLOC),
        "reset only past the credit: sent {sent}, forwarded {fwd_at_rst}"
    );
    assert!(
        sent - fwd_at_rst <= u64::from(BUF_ALLOC) + MAX_PKT_DATA as u64,
        "reset at the first packet past the credit: sent {sent}, forwarded {fwd_at_rst}"
    );
    // What the host socket took arrives intact.
    s.set_nonblocking(true).unwrap();
    let mut total = 0u64;
    let mut b = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(n) => {
                assert!(b[..n].iter().all(|&x| x == 7));
                total += n as u64;
            }
            Err(_) => break,
        }
    }
    assert!(total > 0 && total <= sent);
}

#[test]
fn credit_update_after_the_host_drains() {
    let mut g = Guest::new(16);
    let l = UnixListener::bind(format!("{}_8", g.uds.display())).unwrap();
    g.send(hdr(OP_REQUEST, 41, 8), &[]);
    g.expect(OP_RESPONSE);
    let (mut s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    // Half of BUF_ALLOC forwarded: the device tells the guest without being asked.
    let n = (BUF_ALLOC / 2) as usize;
    let mut sent = 0;
    while sent < n {
        let k = (n - sent).min(MAX_PKT_DATA);
        g.send(hdr(OP_RW, 41, 8), &vec![3u8; k]);
        sent += k;
        // The host reads as it goes, so nothing waits in the device.
        assert_eq!(read_n(&mut s, k), vec![3u8; k]);
    }
    let (c, _) = g.expect(OP_CREDIT_UPDATE);
    assert_eq!(c.fwd_cnt as usize, n);
}

#[test]
fn resets_from_either_side() {
    let mut g = Guest::new(8);
    let l = UnixListener::bind(format!("{}_9", g.uds.display())).unwrap();
    g.send(hdr(OP_REQUEST, 42, 9), &[]);
    g.expect(OP_RESPONSE);
    let (mut s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    // Guest RST: the host socket is closed.
    g.send(hdr(OP_RST, 42, 9), &[]);
    assert_eq!(s.read(&mut [0u8; 4]).unwrap(), 0);
    // Data on the reset connection is answered with RST.
    g.send(hdr(OP_RW, 42, 9), b"late");
    let (r, _) = g.expect(OP_RST);
    assert_eq!((r.src_port, r.dst_port), (9, 42));

    // The guest refuses a host connection: the host program sees EOF without OK.
    let mut host = host_connect(&g.uds, 60);
    let (req, _) = g.expect(OP_REQUEST);
    g.send(hdr(OP_RST, 60, req.src_port), &[]);
    let mut b = Vec::new();
    host.read_to_end(&mut b).unwrap();
    assert!(b.is_empty(), "{b:?}");

    // A host program that sends a bad line is disconnected, nothing reaches the guest.
    let mut bad = host_connect(&g.uds, 0);
    bad.write_all(b"").unwrap();
    let mut bad2 = UnixStream::connect(&g.uds).unwrap();
    bad2.write_all(b"HELLO 1\n").unwrap();
    bad2.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    assert_closed(&mut bad2);
    let mut bad3 = UnixStream::connect(&g.uds).unwrap();
    bad3.write_all(&[b'C'; 40]).unwrap();
    bad3.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    assert_closed(&mut bad3); // no line within 32 bytes
    let (req0, _) = g.expect(OP_REQUEST);
    assert_eq!(req0.dst_port, 0);
    drop(bad);
}

#[test]
fn hostile_packets_are_dropped_or_reset_and_counted() {
    let mut g = Guest::new(8);
    let l = UnixListener::bind(format!("{}_11", g.uds.display())).unwrap();
    g.send(hdr(OP_REQUEST, 43, 11), &[]);
    g.expect(OP_RESPONSE);
    let (mut s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let before = g.rejected();

    // A chain shorter than a header: dropped.
    let idx = g.tx.next_avail % QSIZE;
    g.tx.add_chain(&g.m, idx, &[(TX_BUF, 20, false)]);
    g.tx_sent += 1;
    g.notify(1);
    assert!(wait_for(|| g.tx.used_idx(&g.m) == g.tx_sent));
    // Spoofed source CID: dropped without an answer.
    g.send(
        Hdr {
            src_cid: 77,
            ..hdr(OP_REQUEST, 44, 11)
        },
        &[],
    );
    // Another destination CID: refused.
    g.send(
        Hdr {
            dst_cid: 5,
            ..hdr(OP_REQUEST, 45, 11)
        },
        &[],
    );
    let (r, _) = g.expect(OP_RST);
    assert_eq!(r.dst_port, 45);
    // Seqpacket type: refused.
    g.send(
        Hdr {
            type_: 2,
            ..hdr(OP_REQUEST, 46, 11)
        },
        &[],
    );
    assert_eq!(g.expect(OP_RST).0.dst_port, 46);
    // A length past the data given, on the live connection: reset.
    g.send_raw(
        Hdr {
            len: 1000,
            ..hdr(OP_RW, 43, 11)
        },
        b"abc",
    );
    assert_eq!(g.expect(OP_RST).0.dst_port, 43);
    assert_eq!(s.read(&mut [0u8; 4]).unwrap(), 0, "host socket closed");
    assert!(
        g.rejected() >= before + 5,
        "counted: {:?}",
        g.metrics.snapshot()
    );

    // An unknown operation on a live connection: reset. A length over 64 KiB: reset.
    for (op, len) in [(99u16, 0u32), (OP_RW, MAX_PKT_DATA as u32 + 1)] {
        g.send(hdr(OP_REQUEST, 47, 11), &[]);
        g.expect(OP_RESPONSE);
        let (mut s, _) = l.accept().unwrap();
        g.send_raw(
            Hdr {
                len,
                ..hdr(op, 47, 11)
            },
            &[],
        );
        assert_eq!(g.expect(OP_RST).0.dst_port, 47);
        assert_eq!(s.read(&mut [0u8; 4]).unwrap(), 0);
    }
    // A second REQUEST on a live connection resets it.
    g.send(hdr(OP_REQUEST, 48, 11), &[]);
    g.expect(OP_RESPONSE);
    g.send(hdr(OP_REQUEST, 48, 11), &[]);
    assert_eq!(g.expect(OP_RST).0.dst_port, 48);
    g.expect_nothing();
}

#[test]
fn a_reset_flood_without_receive_buffers_stays_bounded() {
    let mut g = Guest::new(0);
    // Requests to closed ports, no receive buffers: the resets queue up to the limit only.
    let n = MAX_PENDING_RST + 100;
    for i in 0..n {
        g.send(hdr(OP_REQUEST, 100 + i as u32, 5), &[]);
    }
    g.give_rx(QSIZE);
    for i in 0..MAX_PENDING_RST {
        let (h, _) = g.expect(OP_RST);
        assert_eq!(h.dst_port, 100 + i as u32, "the first ones, in order");
    }
    // The next packet is the answer to a probe sent now: the rest were dropped.
    g.expect_nothing();
    assert!(g.rejected() >= 100);
}

#[test]
fn many_connections_at_once() {
    let mut g = Guest::new(32);
    let l = UnixListener::bind(format!("{}_20", g.uds.display())).unwrap();
    let n = 40u32;
    let mut host = Vec::new();
    for i in 0..n {
        g.send(hdr(OP_REQUEST, 1000 + i, 20), &[]);
        g.expect(OP_RESPONSE);
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        host.push(s);
    }
    for i in 0..n {
        g.send(hdr(OP_RW, 1000 + i, 20), format!("to {i}").as_bytes());
    }
    for (i, s) in host.iter_mut().enumerate() {
        let want = format!("to {i}");
        assert_eq!(read_n(s, want.len()), want.as_bytes());
        s.write_all(format!("from {i}").as_bytes()).unwrap();
    }
    let mut seen = vec![false; n as usize];
    for _ in 0..n {
        let (h, d) = g.expect(OP_RW);
        let i = (h.dst_port - 1000) as usize;
        assert_eq!(d, format!("from {i}").as_bytes());
        assert!(!std::mem::replace(&mut seen[i], true));
    }
    // A hundred host connections in flight too.
    let mut hosts: Vec<UnixStream> = (0..100).map(|p| host_connect(&g.uds, 3000 + p)).collect();
    let mut ports = std::collections::HashSet::new();
    for _ in 0..100 {
        let (req, _) = g.expect(OP_REQUEST);
        assert!(ports.insert(req.src_port), "distinct host ports");
        g.send(hdr(OP_RESPONSE, req.dst_port, req.src_port), &[]);
    }
    for h in &mut hosts {
        let mut line = String::new();
        BufReader::new(h).read_line(&mut line).unwrap();
        assert!(line.starts_with("OK "), "{line}");
    }
}

#[test]
fn connections_past_the_limit_are_refused() {
    let mut g = Guest::new(16);
    let l = UnixListener::bind(format!("{}_30", g.uds.display())).unwrap();
    let mut host = Vec::new();
    for i in 0..MAX_CONNS as u32 {
        g.send(hdr(OP_REQUEST, 10_000 + i, 30), &[]);
        g.expect(OP_RESPONSE);
        host.push(l.accept().unwrap().0);
    }
    let errors = g.metrics.snapshot()[2];
    g.send(hdr(OP_REQUEST, 20_000, 30), &[]);
    let (r, _) = g.expect(OP_RST);
    assert_eq!(r.dst_port, 20_000);
    assert_eq!(g.metrics.snapshot()[2], errors + 1, "counted");
    // A host connection past the limit is closed at once.
    let mut s = UnixStream::connect(&g.uds).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    assert_closed(&mut s);
    // One connection ends: a new one fits again.
    g.send(hdr(OP_RST, 10_000, 30), &[]);
    g.send(hdr(OP_REQUEST, 20_001, 30), &[]);
    g.expect(OP_RESPONSE);
}
