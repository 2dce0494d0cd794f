//! User-mode networking (`--net user`): NAT, DHCP, DNS forwarding and port forwarding with no
//! root, no capabilities and no TAP, through `passt` (Debian's package), which kvmbox starts,
//! talks to and stops.
//!
//! kvmbox makes a Unix stream socket pair, hands one end to `passt --fd` and speaks QEMU's
//! stream protocol on the other: each Ethernet frame preceded by its length as 4 bytes,
//! big-endian. The guest sees QEMU's and VirtualBox's NAT: 10.0.2.15/24 by DHCP, gateway
//! 10.0.2.2 (connections to it reach the host's loopback), DNS forwarded at 10.0.2.3, MTU
//! 65520. Before the guest boots kvmbox checks every `hostfwd` port is free and waits for
//! passt to answer an ARP request, so a taken port or a passt that cannot start is an error
//! then, not a dead link later. When passt ends the socket reaches end-of-file: the worker
//! reports it once and the guest's link goes down (`VIRTIO_NET_F_STATUS`).
//!
//! Frames from passt are untrusted like the guest's: a length below an Ethernet header or
//! above [`MAX_PAYLOAD`] is skipped (without being stored) and counted; memory stays bounded
//! by one receive buffer and one pending transmit frame.

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvmbox_cpu::GuestMemoryMmap;

use super::backend::NetBackend;
use super::device::{F_CSUM, F_GUEST_CSUM};
use super::event_handler::{parse_tx_frame, MAX_FRAME, VNET_HDR_LEN};
use crate::metrics::DeviceMetrics;
use crate::queue::{Chain, ChainError};
use crate::{Error, Result};

/// The guest's address (QEMU's and VirtualBox's NAT).
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The gateway; TCP and UDP to it reach the host's loopback.
pub const GATEWAY_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// DNS queries to this address go to the host's first resolver.
pub const DNS_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// The MAC address the gateway answers with (QEMU's slirp uses the same).
const GATEWAY_MAC: [u8; 6] = [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02];
/// Largest Ethernet frame accepted from passt (without the virtio-net header).
pub const MAX_PAYLOAD: usize = MAX_FRAME - VNET_HDR_LEN;
const ETH_HLEN: usize = 14;
/// Receive buffer: several frames per read, and always room for one whole frame.
const RX_BUF: usize = 256 * 1024;
/// How long passt may take to start and answer the first ARP request.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Transport protocol of a `hostfwd` rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// One `hostfwd=PROTO:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFwd {
    /// TCP or UDP.
    pub proto: Proto,
    /// Host address to listen on (127.0.0.1 unless given).
    pub host_addr: Ipv4Addr,
    /// Host port.
    pub host_port: u16,
    /// Guest port (on [`GUEST_ADDR`]).
    pub guest_port: u16,
}

impl std::fmt::Display for HostFwd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        write!(
            f,
            "{p}:{}:{}-:{}",
            self.host_addr, self.host_port, self.guest_port
        )
    }
}

impl HostFwd {
    /// Parse QEMU's `[tcp|udp]:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT`.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "hostfwd '{s}': {why} (expected PROTO:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT, \
                 e.g. tcp::2222-:22)"
            )
        };
        let (host, guest) = s.split_once('-').ok_or_else(|| bad("no '-'"))?;
        let mut h = host.splitn(3, ':');
        let (proto, addr, hport) = match (h.next(), h.next(), h.next()) {
            (Some(p), Some(a), Some(port)) => (p, a, port),
            _ => return Err(bad("the host side needs PROTO:[ADDR]:PORT")),
        };
        let proto = match proto {
            "tcp" | "" => Proto::Tcp,
            "udp" => Proto::Udp,
            p => return Err(bad(&format!("protocol '{p}' is not tcp or udp"))),
        };
        let host_addr = if addr.is_empty() {
            Ipv4Addr::LOCALHOST
        } else {
            addr.parse()
                .map_err(|_| bad(&format!("'{addr}' is not an IPv4 address")))?
        };
        let port = |p: &str| match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(bad(&format!("'{p}' is not a port from 1 to 65535"))),
        };
        let host_port = port(hport)?;
        let (gaddr, gport) = guest
            .split_once(':')
            .ok_or_else(|| bad("the guest side needs [ADDR]:PORT"))?;
        if !gaddr.is_empty() && gaddr.parse::<Ipv4Addr>() != Ok(GUEST_ADDR) {
            return Err(bad(&format!(
                "the guest address must be {GUEST_ADDR} (the address DHCP gives it) or empty"
            )));
        }
        Ok(HostFwd {
            proto,
            host_addr,
            host_port,
            guest_port: port(gport)?,
        })
    }

    /// passt's `-t`/`-u` argument for this rule.
    fn passt_args(&self) -> [String; 2] {
        let flag = match self.proto {
            Proto::Tcp => "-t",
            Proto::Udp => "-u",
        };
        [
            flag.to_string(),
            format!("{}/{}:{}", self.host_addr, self.host_port, self.guest_port),
        ]
    }

    /// Whether the host port can be had now (passt binds it right after).
    fn check_free(&self) -> std::io::Result<()> {
        let a = SocketAddrV4::new(self.host_addr, self.host_port);
        match self.proto {
            Proto::Tcp => TcpListener::bind(a).map(drop),
            Proto::Udp => UdpSocket::bind(a).map(drop),
        }
    }
}

/// The `user` network: its port forwarding rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserNetConfig {
    /// `hostfwd` rules, in order.
    pub hostfwd: Vec<HostFwd>,
}

/// A Unix stream carrying frames in QEMU's stream format, non-blocking, with bounded buffers.
pub(crate) struct FrameStream {
    sock: UnixStream,
    rx: Box<[u8]>,
    start: usize,
    end: usize,
    /// Bytes of a rejected frame still to discard.
    skip: u64,
    /// Bytes of the last frame not yet written (length prefix included), from `out_off`.
    out: Vec<u8>,
    out_off: usize,
}

impl FrameStream {
    pub(crate) fn new(sock: UnixStream) -> std::io::Result<Self> {
        sock.set_nonblocking(true)?;
        Ok(Self {
            sock,
            rx: vec![0; RX_BUF].into_boxed_slice(),
            start: 0,
            end: 0,
            skip: 0,
            out: Vec::new(),
            out_off: 0,
        })
    }

    /// Next whole frame into `buf[VNET_HDR_LEN..]`, with a zeroed virtio-net header in front;
    /// returns header + frame length. `WouldBlock` when no whole frame is there yet,
    /// `UnexpectedEof` when the peer closed.
    pub(crate) fn recv(&mut self, buf: &mut [u8], dropped: &mut u64) -> std::io::Result<usize> {
        loop {
            if self.skip > 0 {
                let n = self.skip.min((self.end - self.start) as u64);
                self.start += n as usize;
                self.skip -= n;
            }
            let have = self.end - self.start;
            if self.skip == 0 && have >= 4 {
                let mut l = [0u8; 4];
                l.copy_from_slice(&self.rx[self.start..self.start + 4]);
                let len = u32::from_be_bytes(l) as usize;
                if !(ETH_HLEN..=MAX_PAYLOAD).contains(&len) || buf.len() < VNET_HDR_LEN + len {
                    *dropped += 1;
                    self.start += 4;
                    self.skip = len as u64;
                    continue;
                }
                if have >= 4 + len {
                    let f = &self.rx[self.start + 4..self.start + 4 + len];
                    buf[..VNET_HDR_LEN].fill(0);
                    buf[VNET_HDR_LEN..VNET_HDR_LEN + len].copy_from_slice(f);
                    self.start += 4 + len;
                    return Ok(VNET_HDR_LEN + len);
                }
            }
            // Need more bytes: move what is left to the front (there is then room for at
            // least one whole frame) and read.
            if self.start > 0 {
                self.rx.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            match (&self.sock).read(&mut self.rx[self.end..]) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.end += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Send `frame` (Ethernet, no virtio-net header) with its length in front. What the
    /// socket does not take now is kept and written by [`FrameStream::flush`]; the caller
    /// sends nothing more while [`FrameStream::blocked`].
    pub(crate) fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        debug_assert!(!self.blocked());
        let len = (frame.len() as u32).to_be_bytes();
        let iov = [
            libc::iovec {
                iov_base: len.as_ptr() as *mut libc::c_void,
                iov_len: 4,
            },
            libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            },
        ];
        let sent = match self.sendmsg(&iov) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        let total = 4 + frame.len();
        if sent < total {
            self.out.clear();
            self.out.extend_from_slice(&len);
            self.out.extend_from_slice(frame);
            self.out_off = sent;
        }
        Ok(())
    }

    fn sendmsg(&self, iov: &[libc::iovec]) -> std::io::Result<usize> {
        // SAFETY: an all-zero msghdr is valid; we then point it at `iov`, which outlives the
        // call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len();
        loop {
            // SAFETY: the socket is ours; sendmsg only reads the iovecs' ranges, which are
            // live slices of the caller. MSG_NOSIGNAL: a closed peer is EPIPE, not SIGPIPE.
            let r = unsafe {
                libc::sendmsg(
                    self.sock.as_raw_fd(),
                    &msg,
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if r >= 0 {
                return Ok(r as usize);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    pub(crate) fn blocked(&self) -> bool {
        self.out_off < self.out.len()
    }

    pub(crate) fn flush(&mut self) -> std::io::Result<()> {
        while self.blocked() {
            let rest = &self.out[self.out_off..];
            let iov = [libc::iovec {
                iov_base: rest.as_ptr() as *mut libc::c_void,
                iov_len: rest.len(),
            }];
            match self.sendmsg(&iov) {
                Ok(n) => self.out_off += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => {
                    // The peer is gone: drop what was waiting so the worker is not stuck.
                    self.out.clear();
                    self.out_off = 0;
                    return Err(e);
                }
            }
        }
        self.out.clear();
        self.out_off = 0;
        Ok(())
    }

    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

/// Complete a partial checksum the guest left for the device (`VIRTIO_NET_HDR_F_NEEDS_CSUM`):
/// the one's-complement sum from `csum_start` to the end, stored at `csum_start + csum_offset`.
/// `frame` starts with the virtio-net header. Refuses offsets outside the frame and
/// segmentation requests (never negotiated here).
pub(crate) fn finish_tx_frame(frame: &mut [u8]) -> std::result::Result<(), ChainError> {
    if frame.len() < VNET_HDR_LEN + ETH_HLEN {
        return Err(ChainError::Malformed(
            "transmit frame shorter than Ethernet",
        ));
    }
    let (hdr, eth) = frame.split_at_mut(VNET_HDR_LEN);
    if hdr[1] != 0 {
        return Err(ChainError::Malformed("segmentation offload not negotiated"));
    }
    if hdr[0] & 1 == 0 {
        return Ok(());
    }
    let start = usize::from(u16::from_le_bytes([hdr[6], hdr[7]]));
    let at = start + usize::from(u16::from_le_bytes([hdr[8], hdr[9]]));
    if at + 2 > eth.len() {
        return Err(ChainError::Malformed("checksum offset outside the frame"));
    }
    let mut sum = 0u64;
    let mut chunks = eth[start..].chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    eth[at..at + 2].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    Ok(())
}

/// A running passt serving one virtio-net device.
pub(crate) struct Passt {
    child: Child,
    stream: FrameStream,
    /// VIRTIO_NET_F_GUEST_CSUM was negotiated: frames to the guest are marked DATA_VALID.
    data_valid: bool,
}

fn passt_error(why: String) -> Error {
    Error::Config(format!("--net user: {why}"))
}

impl Passt {
    /// Check the `hostfwd` ports, start passt for a guest with MAC `mac` and wait until it
    /// answers.
    pub(crate) fn start(cfg: &UserNetConfig, mac: [u8; 6]) -> Result<Self> {
        for (i, f) in cfg.hostfwd.iter().enumerate() {
            if let Some(g) = cfg.hostfwd[..i].iter().find(|g| {
                (g.proto, g.host_addr, g.host_port) == (f.proto, f.host_addr, f.host_port)
            }) {
                return Err(passt_error(format!(
                    "hostfwd {f} and {g} use the same host port"
                )));
            }
            f.check_free().map_err(|e| {
                passt_error(format!(
                    "hostfwd {f}: cannot listen on {}:{}: {e}",
                    f.host_addr, f.host_port
                ))
            })?;
        }
        let (ours, theirs) = UnixStream::pair().map_err(crate::os("socketpair for passt"))?;
        let fd = theirs.as_raw_fd();
        // Inherited TAP descriptors are not passt's.
        super::tap::inherited_taps()?;
        let mut cmd = Command::new(std::env::var_os("KVMBOX_PASST").unwrap_or("passt".into()));
        cmd.args([
            "--foreground",
            "--quiet",
            "--ipv4-only",
            "--interface",
            "lo",
        ])
        .arg("--fd")
        .arg(fd.to_string())
        .args(["--address", &GUEST_ADDR.to_string(), "--netmask", "24"])
        .args(["--gateway", &GATEWAY_ADDR.to_string()])
        .args(["--dns-forward", &DNS_ADDR.to_string()])
        .arg("--mac-addr")
        .arg(
            GATEWAY_MAC
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":"),
        );
        for f in &cfg.hostfwd {
            cmd.args(f.passt_args());
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: fcntl on a descriptor the child inherited is async-signal-safe; it only
        // clears close-on-exec on passt's end of the socket pair.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            passt_error(format!(
                "cannot run passt ({e}); install Debian's package passt (scripts/setup.sh does)"
            ))
        })?;
        drop(theirs);
        if let Some(err) = child.stderr.take() {
            // passt's own messages, one line each, minus its complaints about a missing syslog.
            let _ = std::thread::Builder::new()
                .name("passt-stderr".into())
                .spawn(move || {
                    kvmbox_seccomp::apply_or_exit(kvmbox_seccomp::ThreadKind::HelperOutput);
                    for line in BufReader::new(err).lines().map_while(|l| l.ok()) {
                        if !line.starts_with("Failed to send") || !line.contains("syslog") {
                            eprintln!("kvmbox: passt: {line}");
                        }
                    }
                });
        }
        let stream = FrameStream::new(ours).map_err(crate::os("passt socket"))?;
        let mut passt = Passt {
            child,
            stream,
            data_valid: false,
        };
        passt.handshake(mac)?;
        Ok(passt)
    }

    /// Send an ARP request for the gateway from the guest's MAC and wait for the answer: passt
    /// has then bound every forwarded port and serves the socket. The answer is not passed on.
    fn handshake(&mut self, mac: [u8; 6]) -> Result<()> {
        let mut arp = Vec::with_capacity(42);
        arp.extend_from_slice(&[0xff; 6]);
        arp.extend_from_slice(&mac);
        arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&mac);
        arp.extend_from_slice(&[0; 4]);
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&GATEWAY_ADDR.octets());
        self.stream
            .send(&arp)
            .and_then(|()| self.stream.flush())
            .map_err(|e| self.died(&format!("passt did not take a frame ({e})")))?;
        let deadline = Instant::now() + START_TIMEOUT;
        let mut buf = vec![0u8; MAX_FRAME];
        let mut dropped = 0;
        loop {
            match self.stream.recv(&mut buf, &mut dropped) {
                Ok(n) => {
                    let f = &buf[VNET_HDR_LEN..n];
                    if f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(self.died(&format!(
                            "passt did not answer within {} s",
                            START_TIMEOUT.as_secs()
                        )));
                    }
                    let mut p = libc::pollfd {
                        fd: self.stream.fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one pollfd we own; the timeout is bounded.
                    unsafe { libc::poll(&mut p, 1, left.as_millis().min(1000) as i32) };
                }
                Err(e) => return Err(self.died(&format!("passt closed its socket ({e})"))),
            }
        }
    }

    /// Stop passt and describe what happened, for an error before the guest runs.
    fn died(&mut self, what: &str) -> Error {
        let status = match self.child.try_wait() {
            Ok(Some(s)) => s.to_string(),
            _ => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                "stopped by kvmbox".to_string()
            }
        };
        passt_error(format!("{what}; passt {status} (its messages are above)"))
    }

    /// passt's exit status once it has ended, waiting up to `wait` for that.
    fn exit_status(&mut self, wait: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + wait;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Passt {
    /// passt keeps no state worth a clean exit (and this one takes seconds to act on
    /// SIGTERM): it is killed and reaped. It also quits by itself when its socket closes
    /// (kvmbox killed, say).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NetBackend for Passt {
    fn fd(&self) -> RawFd {
        self.stream.fd()
    }

    fn offload_features(&self) -> u64 {
        // passt takes and gives whole frames of up to 64 KiB (MTU 65520), so segmentation
        // offloads are not needed; checksums are completed here and passt's are valid.
        1 << F_CSUM | 1 << F_GUEST_CSUM
    }

    fn activate(&mut self, features: u64) -> std::io::Result<()> {
        self.data_valid = features & 1 << F_GUEST_CSUM != 0;
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8], metrics: &DeviceMetrics) -> std::io::Result<usize> {
        let mut dropped = 0;
        let r = self.stream.recv(buf, &mut dropped);
        DeviceMetrics::add(&metrics.errors, dropped);
        if r.is_ok() && self.data_valid {
            buf[0] = 2; // VIRTIO_NET_HDR_F_DATA_VALID: passt's checksums are right
        }
        r
    }

    fn send(
        &mut self,
        chain: &Chain,
        mem: &GuestMemoryMmap,
        scratch: &mut [u8],
    ) -> std::result::Result<std::io::Result<usize>, ChainError> {
        let n = parse_tx_frame(chain, mem, scratch)?;
        finish_tx_frame(&mut scratch[..n])?;
        Ok(self.stream.send(&scratch[VNET_HDR_LEN..n]).map(|()| n))
    }

    fn tx_blocked(&self) -> bool {
        self.stream.blocked()
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }

    fn failure(&mut self) -> String {
        match self.exit_status(Duration::from_secs(1)) {
            Some(s) => format!("passt ended ({s})"),
            None => "passt closed its socket".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostfwd_parsing() {
        let f = HostFwd::parse("tcp::2222-:22").unwrap();
        assert_eq!(
            f,
            HostFwd {
                proto: Proto::Tcp,
                host_addr: Ipv4Addr::LOCALHOST,
                host_port: 2222,
                guest_port: 22
            }
        );
        assert_eq!(f.to_string(), "tcp:127.0.0.1:2222-:22");
        assert_eq!(
            f.passt_args(),
            ["-t".to_string(), "127.0.0.1/2222:22".into()]
        );
        let f = HostFwd::parse("udp:127.0.0.2:5353-10.0.2.15:53").unwrap();
        assert_eq!(
            (f.proto, f.host_addr),
            (Proto::Udp, Ipv4Addr::new(127, 0, 0, 2))
        );
        assert_eq!(f.passt_args()[0], "-u");
        assert_eq!(HostFwd::parse("::8080-:80").unwrap().proto, Proto::Tcp);
        for (bad, why) in [
            ("tcp:2222-:22", "PROTO:[ADDR]:PORT"),
            ("sctp::1-:1", "not tcp or udp"),
            ("tcp::0-:22", "'0' is not a port"),
            ("tcp::70000-:22", "'70000' is not a port"),
            ("tcp:localhost:1-:2", "not an IPv4 address"),
            ("tcp::1-10.0.2.16:2", "must be 10.0.2.15"),
            ("tcp::1-2", "[ADDR]:PORT"),
            ("tcp::1:2", "no '-'"),
        ] {
            let e = HostFwd::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn stream_frames_are_checked_and_resynchronised() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut s = FrameStream::new(a).unwrap();
        let mut buf = vec![0u8; MAX_FRAME];
        let mut dropped = 0;
        let frame = |n: usize, fill: u8| {
            let mut v = (n as u32).to_be_bytes().to_vec();
            v.resize(4 + n, fill);
            v
        };
        let mut wire = Vec::new();
        wire.extend(frame(60, 1));
        wire.extend(frame(3, 2)); // shorter than Ethernet: skipped
        wire.extend(frame(MAX_PAYLOAD + 1, 3)); // oversized: skipped without being stored
        wire.extend(frame(MAX_PAYLOAD, 4));
        let tail = frame(100, 5);
        wire.extend(&tail[..50]); // half a frame
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            (&b).write_all(&wire).unwrap();
            b
        });
        let mut got = Vec::new();
        while got.len() < 2 {
            match s.recv(&mut buf, &mut dropped) {
                Ok(n) => got.push((n, buf[VNET_HDR_LEN], buf[..VNET_HDR_LEN] == [0; 12])),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(
            got,
            vec![
                (VNET_HDR_LEN + 60, 1, true),
                (VNET_HDR_LEN + MAX_PAYLOAD, 4, true)
            ]
        );
        assert_eq!(dropped, 2);
        let b = writer.join().unwrap();
        assert_eq!(
            s.recv(&mut buf, &mut dropped).unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock,
            "half a frame waits"
        );
        {
            use std::io::Write;
            (&b).write_all(&tail[50..]).unwrap();
        }
        assert_eq!(s.recv(&mut buf, &mut dropped).unwrap(), VNET_HDR_LEN + 100);
        assert_eq!(buf[VNET_HDR_LEN + 99], 5);
        // A length of 4 GiB - 1 is skipped byte by byte as it arrives, never buffered.
        {
            use std::io::Write;
            (&b).write_all(&u32::MAX.to_be_bytes()).unwrap();
            (&b).write_all(&[9u8; 1000]).unwrap();
        }
        assert_eq!(
            s.recv(&mut buf, &mut dropped).unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock
        );
        assert_eq!(dropped, 3);
        drop(b);
        assert_eq!(
            s.recv(&mut buf, &mut dropped).unwrap_err().kind(),
            std::io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn stream_send_keeps_what_the_socket_did_not_take() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut s = FrameStream::new(a).unwrap();
        let frame = vec![7u8; MAX_PAYLOAD];
        let mut sent = 0;
        while !s.blocked() {
            s.send(&frame).unwrap();
            sent += 1;
            assert!(sent < 10_000, "the socket never filled");
        }
        // The peer reads everything: every frame arrives whole, in order.
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            (&b).read_to_end(&mut all).unwrap();
            all
        });
        while s.blocked() {
            s.flush().unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(s);
        let all = reader.join().unwrap();
        assert_eq!(all.len(), sent * (4 + MAX_PAYLOAD));
        for c in all.chunks(4 + MAX_PAYLOAD) {
            assert_eq!(&c[..4], &(MAX_PAYLOAD as u32).to_be_bytes());
            assert!(c[4..].iter().all(|&x| x == 7));
        }
    }

    #[test]
    fn partial_checksums_are_completed_and_bad_offsets_refused() {
        // A UDP/IPv4 frame whose checksum field holds the pseudo-header sum, as Linux leaves it.
        let mut f = vec![0u8; VNET_HDR_LEN];
        f[0] = 1;
        f[6..8].copy_from_slice(&34u16.to_le_bytes());
        f[8..10].copy_from_slice(&6u16.to_le_bytes());
        f.extend_from_slice(&[0; 12]);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&[
            0x45, 0, 0, 33, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 2, 15, 10, 0, 2, 2,
        ]);
        let udp = [
            0x9c, 0x40, 0x13, 0x89, 0, 13, 0, 0, b'h', b'e', b'l', b'l', b'o',
        ];
        f.extend_from_slice(&udp);
        let pseudo: u32 = [0x0a00, 0x020f, 0x0a00, 0x0202, 17, 13].iter().sum::<u32>();
        let at = VNET_HDR_LEN + 34 + 6;
        f[at..at + 2].copy_from_slice(&(pseudo as u16).to_be_bytes());
        finish_tx_frame(&mut f).unwrap();
        // Verify: the sum over pseudo-header + UDP with the result in place is 0xffff.
        let mut sum: u32 = pseudo;
        let seg = &f[VNET_HDR_LEN + 34..];
        for c in seg.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
        let mut bad = f.clone();
        bad[8..10].copy_from_slice(&60000u16.to_le_bytes());
        assert!(finish_tx_frame(&mut bad).is_err());
        let mut gso = f.clone();
        gso[1] = 1;
        assert!(finish_tx_frame(&mut gso).is_err());
        assert!(finish_tx_frame(&mut f[..20]).is_err());
    }
}
