//! The virtio-vsock worker: guest packets from the transmit queue to host Unix sockets, host
//! sockets' data and control packets into the receive queue.
//!
//! Every connection is keyed by (host port, guest port). A host program starts one by
//! connecting to the listener and writing `CONNECT <guest port>\n`: the worker picks a host
//! port, sends the guest a REQUEST, and on its RESPONSE answers `OK <host port>\n`. A guest
//! REQUEST to CID 2 port P connects to the Unix socket `PATH_P` (RST when nothing listens).
//!
//! Flow control is virtio's credit: the worker advertises [`BUF_ALLOC`] bytes per connection
//! and holds at most that much of the guest's data the host socket has not taken yet; a
//! guest that sends past its credit gets the connection reset. Into the guest it sends no
//! more than the guest's own `buf_alloc - (tx_cnt - fwd_cnt)`. Nothing the guest does grows
//! host memory past [`MAX_CONNS`] connections of [`BUF_ALLOC`] bytes and
//! [`MAX_PENDING_RST`] queued resets.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;

use kvmbox_cpu::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::device::{sockaddr_un, unix_socket, Listener, HOST_CID};
use super::packet::*;
use crate::device::{VirtioInterrupt, VirtioInterruptType};
use crate::metrics::DeviceMetrics;
use crate::queue::{
    mark_broken, pop_chain, process_queue, settle_pass, Chain, ChainError, QueueBroken,
    MAX_CHAINS_PER_PASS,
};
use crate::worker::{drain, EventHandler};

pub(crate) const RX_TOKEN: u64 = 0;
pub(crate) const TX_TOKEN: u64 = 1;
pub(crate) const EVENT_TOKEN: u64 = 2;
pub(crate) const LISTENER_TOKEN: u64 = 3;
const FIRST_CONN_TOKEN: u64 = 16;

/// Receive buffer the host side advertises per connection: the most guest data it holds
/// for a host socket that does not take it.
pub const BUF_ALLOC: u32 = 128 * 1024;
/// Most connections at once (host and guest initiated, handshakes included).
pub const MAX_CONNS: usize = 256;
/// Largest data part of one packet (Linux sends at most 64 KiB).
pub const MAX_PKT_DATA: usize = 64 * 1024;
/// Most resets waiting for a receive buffer; more are dropped (and counted).
pub const MAX_PENDING_RST: usize = 256;
/// Longest `CONNECT <port>\n` line.
const CONNECT_LINE_MAX: usize = 32;
/// First host port handed to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A host connection that has not sent its `CONNECT <port>` line yet.
    AwaitConnectLine,
    /// REQUEST sent (or queued) to the guest; waiting for its RESPONSE.
    Requesting,
    /// Data flows.
    Established,
}

struct Conn {
    sock: UnixStream,
    state: State,
    local_port: u32,
    peer_port: u32,
    /// Guest data the host socket has not taken yet (at most BUF_ALLOC bytes).
    pending_out: VecDeque<u8>,
    /// Guest data bytes received, ever (wrapping).
    rx_cnt: u32,
    /// Guest data bytes written to the host socket, ever (wrapping).
    fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    last_fwd_sent: u32,
    /// The guest's receive buffer and what it has consumed of it.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent into the guest, ever (wrapping).
    tx_cnt: u32,
    /// The host socket may have data (cleared when a read would block).
    readable: bool,
    /// The host closed its side (read returned 0).
    host_eof: bool,
    guest_no_rcv: bool,
    guest_no_send: bool,
    /// The guest shut down both directions: reset once its data reached the host socket.
    closing: bool,
    send_request: bool,
    send_response: bool,
    send_credit: bool,
    send_shutdown: bool,
    /// In the list of connections with something for the guest.
    queued: bool,
}

impl Conn {
    fn new(sock: UnixStream, state: State, local_port: u32, peer_port: u32) -> Self {
        Self {
            sock,
            state,
            local_port,
            peer_port,
            pending_out: VecDeque::new(),
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_sent: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            readable: false,
            host_eof: false,
            guest_no_rcv: false,
            guest_no_send: false,
            closing: false,
            send_request: false,
            send_response: false,
            send_credit: false,
            send_shutdown: false,
            queued: false,
        }
    }

    /// What the guest can still take on this connection.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    fn can_send_data(&self) -> bool {
        self.state == State::Established
            && self.readable
            && !self.host_eof
            && !self.guest_no_rcv
            && self.peer_credit() > 0
    }

    fn wants_rx(&self) -> bool {
        self.send_request
            || self.send_response
            || self.send_credit
            || self.send_shutdown
            || self.can_send_data()
    }
}

/// The connections and the host side of one vsock device.
pub(crate) struct Muxer {
    guest_cid: u64,
    uds: PathBuf,
    listener: Arc<Listener>,
    metrics: Arc<DeviceMetrics>,
    conns: HashMap<u64, Conn>,
    keys: HashMap<(u32, u32), u64>,
    next_token: u64,
    next_local_port: u32,
    /// Connections with something for the guest, in turn.
    rx_list: VecDeque<u64>,
    /// Resets for the guest (connections already gone, or requests refused).
    rsts: VecDeque<Hdr>,
    scratch: Vec<u8>,
}

/// Whether the last system call failed with EAGAIN/EWOULDBLOCK.
fn would_block(e: &std::io::Error) -> bool {
    e.kind() == ErrorKind::WouldBlock
}

impl Muxer {
    pub(crate) fn new(
        guest_cid: u64,
        uds: PathBuf,
        listener: Arc<Listener>,
        metrics: Arc<DeviceMetrics>,
    ) -> Self {
        Self {
            guest_cid,
            uds,
            listener,
            metrics,
            conns: HashMap::new(),
            keys: HashMap::new(),
            next_token: FIRST_CONN_TOKEN,
            next_local_port: FIRST_LOCAL_PORT,
            rx_list: VecDeque::new(),
            rsts: VecDeque::new(),
            scratch: vec![0; MAX_PKT_DATA],
        }
    }

    fn add_conn(&mut self, conn: Conn, epoll: &Epoll) -> Option<u64> {
        let token = self.next_token;
        // Edge-triggered: the worker reads until a read would block and is told again
        // when more arrives, so a socket it cannot serve yet (no credit) does not spin.
        let events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        if epoll
            .ctl(
                ControlOperation::Add,
                conn.sock.as_raw_fd(),
                EpollEvent::new(events, token),
            )
            .is_err()
        {
            DeviceMetrics::add(&self.metrics.errors, 1);
            return None;
        }
        self.next_token += 1;
        if conn.state != State::AwaitConnectLine {
            self.keys.insert((conn.local_port, conn.peer_port), token);
        }
        self.conns.insert(token, conn);
        Some(token)
    }

    /// Forget a connection (closing its socket, which leaves the epoll set with it).
    fn remove(&mut self, token: u64) {
        if let Some(c) = self.conns.remove(&token) {
            if c.state != State::AwaitConnectLine {
                self.keys.remove(&(c.local_port, c.peer_port));
            }
        }
    }

    fn hdr(&self, c: &Conn, op: u16) -> Hdr {
        Hdr {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: c.local_port,
            dst_port: c.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: c.fwd_cnt,
        }
    }

    fn push_rst(&mut self, h: Hdr) {
        if self.rsts.len() >= MAX_PENDING_RST {
            DeviceMetrics::add(&self.metrics.rejected, 1);
            return;
        }
        self.rsts.push_back(h);
    }

    /// Reset a connection: RST to the guest, socket closed.
    fn reset(&mut self, token: u64) {
        if let Some(c) = self.conns.get(&token) {
            if c.state != State::AwaitConnectLine {
                let h = self.hdr(c, OP_RST);
                self.push_rst(h);
            }
        }
        self.remove(token);
    }

    /// Answer a guest packet that belongs to no connection with a reset.
    fn refuse(&mut self, h: &Hdr) {
        if h.op == OP_RST {
            return;
        }
        self.push_rst(Hdr {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Hdr::default()
        });
    }

    /// Put a connection in line for the receive queue if it has something for the guest.
    fn kick(&mut self, token: u64) {
        if let Some(c) = self.conns.get_mut(&token) {
            if !c.queued && c.wants_rx() {
                c.queued = true;
                self.rx_list.push_back(token);
            }
        }
    }

    /// Whether anything waits for a receive buffer.
    pub(crate) fn has_output(&self) -> bool {
        !self.rsts.is_empty() || !self.rx_list.is_empty()
    }

    /// Accept host connections on the listener.
    pub(crate) fn accept(&mut self, epoll: &Epoll) {
        loop {
            // SAFETY: accept4 on our listening socket, no address wanted.
            let fd = unsafe {
                libc::accept4(
                    self.listener.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted || e.kind() == ErrorKind::ConnectionAborted {
                    continue;
                }
                return;
            }
            // SAFETY: accept4 returned a new descriptor owned by nothing else.
            let sock = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
            if self.conns.len() >= MAX_CONNS {
                DeviceMetrics::add(&self.metrics.errors, 1);
                continue; // dropped: closed
            }
            let _ = self.add_conn(Conn::new(sock, State::AwaitConnectLine, 0, 0), epoll);
        }
    }

    /// A host connection's `CONNECT <port>\n`: peeked until whole, then consumed, so data
    /// written right after it stays in the socket for the guest.
    fn read_connect_line(&mut self, token: u64) {
        let Some(c) = self.conns.get(&token) else {
            return;
        };
        let mut line = [0u8; CONNECT_LINE_MAX];
        // SAFETY: recv into `line`, at most its length.
        let n = unsafe {
            libc::recv(
                c.sock.as_raw_fd(),
                line.as_mut_ptr().cast(),
                line.len(),
                libc::MSG_PEEK,
            )
        };
        if n < 0 && would_block(&std::io::Error::last_os_error()) {
            return;
        }
        let n = usize::try_from(n).unwrap_or(0);
        let Some(end) = line[..n].iter().position(|&b| b == b'\n') else {
            if n == 0 || n == CONNECT_LINE_MAX {
                // Closed, failed, or no line within the limit.
                self.remove(token);
            }
            return;
        };
        let mut sink = [0u8; CONNECT_LINE_MAX];
        let port = std::str::from_utf8(&line[..end])
            .ok()
            .and_then(|l| l.trim_end_matches('\r').strip_prefix("CONNECT "))
            .and_then(|p| p.parse::<u32>().ok());
        let consumed = (&c.sock).read(&mut sink[..=end]).ok() == Some(end + 1);
        let Some(port) = port.filter(|_| consumed) else {
            DeviceMetrics::add(&self.metrics.errors, 1);
            self.remove(token);
            return;
        };
        let local = self.free_local_port();
        if let Some(c) = self.conns.get_mut(&token) {
            c.state = State::Requesting;
            c.local_port = local;
            c.peer_port = port;
            c.send_request = true;
            c.readable = true;
        }
        self.keys.insert((local, port), token);
        self.kick(token);
    }

    fn free_local_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = match p.checked_add(1) {
                Some(n) if n < u32::MAX => n,
                _ => FIRST_LOCAL_PORT,
            };
            if !self.keys.keys().any(|k| k.0 == p) {
                return p;
            }
        }
    }

    /// A host socket is ready (readable, writable or closed).
    pub(crate) fn on_conn_event(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        if c.state == State::AwaitConnectLine {
            self.read_connect_line(token);
            return;
        }
        c.readable = true;
        self.flush(token);
        self.kick(token);
    }

    /// Write what the guest sent and the host socket did not take yet. Resets the connection
    /// when the socket failed.
    fn flush(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        while !c.pending_out.is_empty() {
            let (a, _) = c.pending_out.as_slices();
            match (&c.sock).write(a) {
                Ok(0) => break,
                Ok(n) => {
                    c.pending_out.drain(..n);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if would_block(&e) => break,
                Err(_) => {
                    DeviceMetrics::add(&self.metrics.errors, 1);
                    self.reset(token);
                    return;
                }
            }
        }
        self.after_forward(token);
    }

    /// After guest data moved to the host socket: tell the guest about freed space, pass
    /// on its shutdown once everything is written.
    fn after_forward(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        if c.pending_out.is_empty() {
            c.pending_out = VecDeque::new(); // give the memory back
            if c.closing {
                self.reset(token);
                return;
            }
            if c.guest_no_send {
                let _ = c.sock.shutdown(std::net::Shutdown::Write);
            }
        }
        if c.fwd_cnt.wrapping_sub(c.last_fwd_sent) >= BUF_ALLOC / 2 {
            c.send_credit = true;
        }
        self.kick(token);
    }

    /// One chain of the transmit queue. Returns the bytes written into it (none).
    pub(crate) fn on_tx(
        &mut self,
        chain: Result<Chain, ChainError>,
        mem: &GuestMemoryMmap,
        epoll: &Epoll,
    ) -> u32 {
        DeviceMetrics::add(&self.metrics.requests, 1);
        let Ok(chain) = chain else {
            DeviceMetrics::add(&self.metrics.rejected, 1);
            return 0;
        };
        let mut r = chain.reader(mem);
        let mut hb = [0u8; HDR_LEN];
        if !chain.writable.is_empty() || r.read_exact(&mut hb, "vsock header").is_err() {
            DeviceMetrics::add(&self.metrics.rejected, 1);
            return 0;
        }
        let h = Hdr::from_bytes(&hb);
        if h.src_cid != self.guest_cid {
            // Spoofed source: not the guest's to answer.
            DeviceMetrics::add(&self.metrics.rejected, 1);
            return 0;
        }
        let key = (h.dst_port, h.src_port);
        let token = self.keys.get(&key).copied();
        let len = h.len as usize;
        if h.dst_cid != HOST_CID
            || h.type_ != TYPE_STREAM
            || len > MAX_PKT_DATA
            || len > r.remaining()
        {
            DeviceMetrics::add(&self.metrics.rejected, 1);
            match token {
                Some(t) if h.dst_cid == HOST_CID => self.reset(t),
                _ => self.refuse(&h),
            }
            return 0;
        }
        let Some(token) = token else {
            match h.op {
                OP_REQUEST => self.guest_connect(&h, epoll),
                OP_RST => {}
                _ => self.refuse(&h),
            }
            return 0;
        };
        if let Some(c) = self.conns.get_mut(&token) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        match h.op {
            OP_RST => self.remove(token),
            OP_RESPONSE => self.on_response(token),
            OP_RW => {
                let n = r.read(&mut self.scratch[..len]).unwrap_or(0);
                self.on_data(token, n);
            }
            OP_SHUTDOWN => self.on_shutdown(token, h.flags),
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => {
                if let Some(c) = self.conns.get_mut(&token) {
                    c.send_credit = true;
                }
            }
            // A second REQUEST on a live connection, or an operation that does not exist.
            _ => {
                DeviceMetrics::add(&self.metrics.rejected, 1);
                self.reset(token);
            }
        }
        self.kick(token);
        0
    }

    /// A guest REQUEST to host port P: connect to `PATH_P`.
    fn guest_connect(&mut self, h: &Hdr, epoll: &Epoll) {
        if self.conns.len() >= MAX_CONNS {
            DeviceMetrics::add(&self.metrics.errors, 1);
            self.refuse(h);
            return;
        }
        let mut path = OsString::from(self.uds.clone()).into_vec();
        path.extend_from_slice(format!("_{}", h.dst_port).as_bytes());
        let path = PathBuf::from(OsString::from_vec(path));
        let Some(sock) = connect_nonblocking(&path) else {
            self.refuse(h);
            return;
        };
        let mut c = Conn::new(sock, State::Established, h.dst_port, h.src_port);
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        c.send_response = true;
        match self.add_conn(c, epoll) {
            Some(t) => self.kick(t),
            None => self.refuse(h),
        }
    }

    /// The guest accepted a host-initiated connection: tell the host program.
    fn on_response(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        if c.state != State::Requesting || c.send_request {
            DeviceMetrics::add(&self.metrics.rejected, 1);
            self.reset(token);
            return;
        }
        c.state = State::Established;
        let line = format!("OK {}\n", c.local_port);
        // A new socket's buffer takes a line this short at once, or the host side is gone.
        if (&c.sock).write(line.as_bytes()).ok() != Some(line.len()) {
            DeviceMetrics::add(&self.metrics.errors, 1);
            self.reset(token);
        }
    }

    /// `n` bytes of guest data (in `scratch`) for the host socket.
    fn on_data(&mut self, token: u64, n: usize) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        if c.state != State::Established || c.guest_no_send {
            DeviceMetrics::add(&self.metrics.rejected, 1);
            self.reset(token);
            return;
        }
        if c.pending_out.len() + n > BUF_ALLOC as usize {
            // Past the credit it was given: a guest that ignores flow control.
            DeviceMetrics::add(&self.metrics.rejected, 1);
            self.reset(token);
            return;
        }
        DeviceMetrics::add(&self.metrics.bytes_out, n as u64);
        c.rx_cnt = c.rx_cnt.wrapping_add(n as u32);
        let mut done = 0;
        if c.pending_out.is_empty() {
            while done < n {
                match (&c.sock).write(&self.scratch[done..n]) {
                    Ok(0) => break,
                    Ok(k) => done += k,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if would_block(&e) => break,
                    Err(_) => {
                        DeviceMetrics::add(&self.metrics.errors, 1);
                        self.reset(token);
                        return;
                    }
                }
            }
            c.fwd_cnt = c.fwd_cnt.wrapping_add(done as u32);
        }
        c.pending_out.extend(&self.scratch[done..n]);
        self.after_forward(token);
    }

    fn on_shutdown(&mut self, token: u64, flags: u32) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        c.guest_no_rcv |= flags & SHUTDOWN_RCV != 0;
        c.guest_no_send |= flags & SHUTDOWN_SEND != 0;
        if c.guest_no_rcv && c.guest_no_send {
            c.closing = true;
        }
        self.after_forward(token);
    }

    /// Fill one receive chain with the next packet for the guest. `None` when nothing was
    /// left to send (the chain is not used).
    pub(crate) fn fill_rx(&mut self, chain: &Chain, mem: &GuestMemoryMmap) -> Option<u32> {
        let mut w = chain.writer(mem);
        if !chain.readable.is_empty() || w.remaining() < HDR_LEN {
            DeviceMetrics::add(&self.metrics.rejected, 1);
            return Some(0);
        }
        let cap = (w.remaining() - HDR_LEN).min(MAX_PKT_DATA);
        let (h, data) = self.next_packet(cap)?;
        let ok = w.write(&h.to_bytes()).is_ok() && w.write(&self.scratch[..data]).is_ok();
        if !ok {
            DeviceMetrics::add(&self.metrics.errors, 1);
        }
        DeviceMetrics::add(&self.metrics.bytes_in, data as u64);
        Some((HDR_LEN + data) as u32)
    }

    /// The next packet for the guest: a queued reset, else the next connection's control
    /// packet or data (read into `scratch`, at most `cap` bytes).
    fn next_packet(&mut self, cap: usize) -> Option<(Hdr, usize)> {
        if let Some(h) = self.rsts.pop_front() {
            return Some((h, 0));
        }
        while let Some(token) = self.rx_list.pop_front() {
            let Some(c) = self.conns.get_mut(&token) else {
                continue;
            };
            c.queued = false;
            let got = self.conn_packet(token, cap);
            self.kick(token);
            if let Some(p) = got {
                return Some(p);
            }
            // A reset of that connection may have been queued meanwhile.
            if let Some(h) = self.rsts.pop_front() {
                return Some((h, 0));
            }
        }
        None
    }

    fn conn_packet(&mut self, token: u64, cap: usize) -> Option<(Hdr, usize)> {
        let c = self.conns.get_mut(&token)?;
        let (op, flags, len) = if c.send_request {
            c.send_request = false;
            (OP_REQUEST, 0, 0)
        } else if c.send_response {
            c.send_response = false;
            (OP_RESPONSE, 0, 0)
        } else if c.can_send_data() && cap > 0 {
            let n = cap.min(c.peer_credit() as usize);
            match (&c.sock).read(&mut self.scratch[..n]) {
                Ok(0) => {
                    c.readable = false;
                    c.host_eof = true;
                    c.send_shutdown = true;
                    return self.conn_packet(token, cap);
                }
                Ok(k) => {
                    c.tx_cnt = c.tx_cnt.wrapping_add(k as u32);
                    (OP_RW, 0, k)
                }
                Err(e) if would_block(&e) || e.kind() == ErrorKind::Interrupted => {
                    c.readable = e.kind() == ErrorKind::Interrupted;
                    return self.control_packet(token);
                }
                Err(_) => {
                    DeviceMetrics::add(&self.metrics.errors, 1);
                    self.reset(token);
                    return None;
                }
            }
        } else {
            return self.control_packet(token);
        };
        Some((self.stamp(token, op, flags, len), len))
    }

    /// A SHUTDOWN or CREDIT_UPDATE the connection owes the guest.
    fn control_packet(&mut self, token: u64) -> Option<(Hdr, usize)> {
        let c = self.conns.get_mut(&token)?;
        let (op, flags) = if c.send_shutdown {
            c.send_shutdown = false;
            // The host program shut its writing side (or closed): the guest reads EOF. It
            // may still send (a half-close); if the socket is gone, that resets it.
            (OP_SHUTDOWN, SHUTDOWN_SEND)
        } else if c.send_credit {
            (OP_CREDIT_UPDATE, 0)
        } else {
            return None;
        };
        Some((self.stamp(token, op, flags, 0), 0))
    }

    /// The header of a packet the connection sends now; it carries the current credit, so
    /// no separate update is owed after it.
    fn stamp(&mut self, token: u64, op: u16, flags: u32, len: usize) -> Hdr {
        let Some(c) = self.conns.get_mut(&token) else {
            return Hdr::default();
        };
        c.send_credit = false;
        c.last_fwd_sent = c.fwd_cnt;
        let c = &self.conns[&token];
        Hdr {
            op,
            flags,
            len: len as u32,
            ..self.hdr(c, op)
        }
    }
}

/// Connect to the Unix socket at `path` without blocking: a listener whose backlog is full
/// counts as not listening.
fn connect_nonblocking(path: &std::path::Path) -> Option<UnixStream> {
    let (addr, len) = sockaddr_un(path)?;
    let fd = unix_socket().ok()?;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes; `fd` is ours.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    (r == 0).then(|| UnixStream::from(fd))
}

/// The worker of an active vsock device.
pub(crate) struct VsockHandler {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) rx: Queue,
    pub(crate) tx: Queue,
    pub(crate) rx_evt: EventFd,
    pub(crate) tx_evt: EventFd,
    pub(crate) ev_evt: EventFd,
    pub(crate) interrupt: Arc<dyn VirtioInterrupt>,
    pub(crate) mux: Muxer,
}

impl VsockHandler {
    fn tx_path(&mut self, epoll: &Epoll) -> bool {
        let mux = &mut self.mux;
        let mem = &self.mem;
        let pass = process_queue(&mut self.tx, mem, &*self.interrupt, 1, |c| {
            mux.on_tx(c, mem, epoll)
        });
        settle_pass(pass, &self.tx_evt, &self.mux.metrics, &*self.interrupt)
    }

    fn rx_path(&mut self) -> Result<(), QueueBroken> {
        let mut used = 0usize;
        while self.mux.has_output() {
            if used >= MAX_CHAINS_PER_PASS {
                let _ = self.rx_evt.write(1);
                break;
            }
            let start = self.rx.next_avail();
            let Some((head, chain)) = pop_chain(&mut self.rx, &self.mem)? else {
                if self
                    .rx
                    .enable_notification(&self.mem)
                    .map_err(QueueBroken)?
                {
                    continue; // buffers arrived meanwhile
                }
                break;
            };
            let len = match chain {
                Ok(c) => match self.mux.fill_rx(&c, &self.mem) {
                    Some(n) => n,
                    None => {
                        self.rx.set_next_avail(start);
                        break;
                    }
                },
                Err(_) => {
                    DeviceMetrics::add(&self.mux.metrics.rejected, 1);
                    0
                }
            };
            self.rx
                .add_used(&self.mem, head, len)
                .map_err(QueueBroken)?;
            used += 1;
        }
        if used > 0 && self.rx.needs_notification(&self.mem).map_err(QueueBroken)? {
            let _ = self.interrupt.trigger(VirtioInterruptType::Queue(0));
        }
        Ok(())
    }
}

impl EventHandler for VsockHandler {
    fn handle(&mut self, token: u64, epoll: &Epoll) -> bool {
        match token {
            RX_TOKEN => drain(&self.rx_evt),
            TX_TOKEN => {
                drain(&self.tx_evt);
                if !self.tx_path(epoll) {
                    return false;
                }
            }
            // The device sends no events (they are for live migration).
            EVENT_TOKEN => drain(&self.ev_evt),
            LISTENER_TOKEN => self.mux.accept(epoll),
            t => self.mux.on_conn_event(t),
        }
        if self.rx_path().is_err() {
            mark_broken(&self.mux.metrics, &*self.interrupt);
            return false;
        }
        true
    }
}
