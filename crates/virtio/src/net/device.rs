//! The virtio-net device: options, features, configuration space, activation.

use std::os::fd::AsRawFd;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::backend::NetBackend;
use super::event_handler::{
    NetHandler, BACKEND_TOKEN, MAX_FRAME, RX_LIMITER_TOKEN, RX_TOKEN, TX_LIMITER_TOKEN, TX_TOKEN,
    VNET_HDR_LEN,
};
use super::tap::Tap;
use super::user::{HostFwd, Passt, UserNetConfig};
use crate::device::{ActivateContext, VirtioDevice};
use crate::limiter::SharedLimiter;
use crate::metrics::DeviceMetrics;
use crate::worker::Worker;
use crate::{os, Error, Result, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1, TYPE_NET};
use kvmbox_ratelimit::RateLimiterConfig;

/// Feature bit: the device takes frames with partial checksums.
pub const F_CSUM: u32 = 0;
/// Feature bit: the driver takes frames with partial checksums.
pub const F_GUEST_CSUM: u32 = 1;
/// Feature bit: `mac` in configuration space is valid.
pub const F_MAC: u32 = 5;
/// Feature bit: the driver takes TCPv4 segmentation offload frames.
pub const F_GUEST_TSO4: u32 = 7;
/// Feature bit: the driver takes TCPv6 segmentation offload frames.
pub const F_GUEST_TSO6: u32 = 8;
/// Feature bit: the device takes TCPv4 segmentation offload frames.
pub const F_HOST_TSO4: u32 = 11;
/// Feature bit: the device takes TCPv6 segmentation offload frames.
pub const F_HOST_TSO6: u32 = 12;

/// Feature bit: the driver takes a frame spread over several receive buffers.
pub const F_MRG_RXBUF: u32 = 15;
/// Feature bit: `status` in configuration space is valid (link up or down).
pub const F_STATUS: u32 = 16;

/// Size of each of the two queues.
pub const QUEUE_SIZE: u16 = 256;

/// What carries a virtio-net device's frames on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackendConfig {
    /// `tap=NAME`: a TAP interface (creating it needs CAP_NET_ADMIN).
    Tap(String),
    /// `user[,hostfwd=...]`: user-mode NAT through passt; no privileges.
    User(UserNetConfig),
}

/// One `--net tap=NAME[,mac=MAC]` or `--net user[,hostfwd=RULE]...[,mac=MAC]` option, with
/// its rate limits (`rx_bw=`, `tx_iops=`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The host side.
    pub backend: NetBackendConfig,
    /// Guest MAC; a random locally administered one when absent.
    pub mac: Option<[u8; 6]>,
    /// Limits on frames into the guest (Firecracker's `rx_rate_limiter`).
    pub rx_limiter: RateLimiterConfig,
    /// Limits on frames from the guest (Firecracker's `tx_rate_limiter`).
    pub tx_limiter: RateLimiterConfig,
}

impl NetConfig {
    /// Whether the backend is a helper program kvmbox starts (passt) as the device is built.
    pub fn starts_a_helper(&self) -> bool {
        matches!(self.backend, NetBackendConfig::User(_))
    }

    /// The option text without the MAC (`tap=NAME` or `user,hostfwd=...`), which parses back
    /// to the same backend.
    pub fn backend_spec(&self) -> String {
        match &self.backend {
            NetBackendConfig::Tap(name) => format!("tap={name}"),
            NetBackendConfig::User(u) => {
                let mut s = "user".to_string();
                for f in &u.hostfwd {
                    s.push_str(&format!(",hostfwd={f}"));
                }
                s
            }
        }
    }
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl FromStr for NetConfig {
    type Err = Error;

    /// Parse `tap=NAME[,mac=MAC]` or `user[,hostfwd=RULE]...[,mac=MAC]`, and the rate limits:
    /// `rx_`/`tx_` before each of `--disk`'s `bw=`, `bw_burst=`, `bw_refill=`, `iops=`,
    /// `iops_burst=`, `iops_refill=`.
    fn from_str(s: &str) -> Result<Self> {
        let mut rx_limiter = RateLimiterConfig::default();
        let mut tx_limiter = RateLimiterConfig::default();
        let limit_err = |e: String| Error::Config(format!("--net '{s}': {e}"));
        let mut tap = None;
        let mut user = false;
        let mut hostfwd = Vec::new();
        let mut mac = None;
        for p in s.split(',') {
            match p.split_once('=') {
                None if p == "user" => user = true,
                Some(("tap", n)) if !n.is_empty() && n.len() < libc::IFNAMSIZ => {
                    tap = Some(n.to_string())
                }
                Some(("tap", n)) => {
                    return Err(Error::Config(format!(
                        "--net '{s}': tap name '{n}' must be 1 to {} bytes",
                        libc::IFNAMSIZ - 1
                    )))
                }
                Some(("hostfwd", rule)) => {
                    let f = HostFwd::parse(rule)
                        .map_err(|e| Error::Config(format!("--net '{s}': {e}")))?;
                    hostfwd.push(f);
                }
                Some(("mac", m)) => match parse_mac(m) {
                    Some(v) if v[0] & 1 == 0 => mac = Some(v),
                    _ => {
                        return Err(Error::Config(format!(
                            "--net '{s}': '{m}' is not a unicast MAC like 52:54:00:12:34:56"
                        )))
                    }
                },
                Some((k, v))
                    if match k.split_at_checked(3) {
                        Some(("rx_", key)) => rx_limiter
                            .set_option(key, v)
                            .map_err(|e| limit_err(format!("rx_{e}")))?,
                        Some(("tx_", key)) => tx_limiter
                            .set_option(key, v)
                            .map_err(|e| limit_err(format!("tx_{e}")))?,
                        _ => false,
                    } => {}
                _ => {
                    return Err(Error::Config(format!(
                        "--net '{s}': unknown option '{p}' (expected tap=NAME or user, \
                         hostfwd=RULE, mac=MAC, or rx_/tx_ before bw=, bw_burst=, bw_refill=, \
                         iops=, iops_burst=, iops_refill=)"
                    )))
                }
            }
        }
        let backend = match (tap, user) {
            (Some(t), false) if hostfwd.is_empty() => NetBackendConfig::Tap(t),
            (None, true) => NetBackendConfig::User(UserNetConfig { hostfwd }),
            (Some(_), _) => {
                return Err(Error::Config(format!(
                    "--net '{s}': tap=NAME goes with neither user nor hostfwd"
                )))
            }
            (None, false) if !hostfwd.is_empty() => {
                return Err(Error::Config(format!(
                    "--net '{s}': hostfwd needs the user network (user,hostfwd=RULE)"
                )))
            }
            (None, false) => {
                return Err(Error::Config(format!(
                    "--net '{s}': missing tap=NAME or user"
                )))
            }
        };
        rx_limiter.check_options("rx_").map_err(limit_err)?;
        tx_limiter.check_options("tx_").map_err(limit_err)?;
        Ok(NetConfig {
            backend,
            mac,
            rx_limiter,
            tx_limiter,
        })
    }
}

/// VIRTIO_NET_S_LINK_UP in the configuration space's `status`.
const S_LINK_UP: u16 = 1;

/// A virtio-net device on a TAP interface or on the user network.
pub struct Net {
    backend: Arc<Mutex<Box<dyn NetBackend>>>,
    /// What the backend is, for messages.
    label: String,
    mac: [u8; 6],
    /// The link is up until the backend ends for good.
    link_up: Arc<AtomicBool>,
    worker: Option<Worker>,
    metrics: Arc<DeviceMetrics>,
    rx_limiter: SharedLimiter,
    tx_limiter: SharedLimiter,
}

impl Net {
    /// Open the TAP interface `cfg` names (creating it needs CAP_NET_ADMIN), or start the
    /// user network's helper (checking its forwarded ports are free).
    pub fn new(cfg: &NetConfig) -> Result<Self> {
        let mac = match cfg.mac {
            Some(m) => m,
            None => {
                let mut m = [0u8; 6];
                // SAFETY: getrandom writes at most 6 bytes into `m`.
                let r = unsafe { libc::getrandom(m.as_mut_ptr().cast(), m.len(), 0) };
                if r != 6 {
                    return Err(Error::Os {
                        what: "getrandom for a MAC address",
                        source: std::io::Error::last_os_error(),
                    });
                }
                m[0] = (m[0] & 0xfe) | 0x02; // unicast, locally administered
                m
            }
        };
        let (backend, label): (Box<dyn NetBackend>, String) = match &cfg.backend {
            NetBackendConfig::Tap(name) => (
                Box::new(Tap::open(name, VNET_HDR_LEN as i32)?),
                format!("tap '{name}'"),
            ),
            NetBackendConfig::User(u) => (Box::new(Passt::start(u, mac)?), "user".to_string()),
        };
        let rx_limiter = SharedLimiter::new(&cfg.rx_limiter)?;
        let tx_limiter = SharedLimiter::new(&cfg.tx_limiter)?;
        Ok(Self {
            rx_limiter,
            tx_limiter,
            backend: Arc::new(Mutex::new(backend)),
            label,
            mac,
            link_up: Arc::new(AtomicBool::new(true)),
            worker: None,
            metrics: Arc::default(),
        })
    }

    /// The receive and transmit rate limiters (live updates go through them).
    pub fn rate_limiters(&self) -> (SharedLimiter, SharedLimiter) {
        (self.rx_limiter.clone(), self.tx_limiter.clone())
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// What carries the frames: `tap 'NAME'` or `user`.
    pub fn backend_label(&self) -> &str {
        &self.label
    }

    /// Whether the guest sees its link up (it goes down when the backend ends).
    pub fn link_up(&self) -> bool {
        self.link_up.load(Ordering::Relaxed)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let offloads = lock(&self.backend).offload_features();
        [
            F_VERSION_1,
            F_RING_EVENT_IDX,
            F_RING_INDIRECT_DESC,
            F_MAC,
            F_MRG_RXBUF,
            F_STATUS,
        ]
        .iter()
        .fold(offloads, |f, b| f | 1 << b)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 8];
        cfg[..6].copy_from_slice(&self.mac);
        let status = if self.link_up() { S_LINK_UP } else { 0 };
        cfg[6..].copy_from_slice(&status.to_le_bytes());
        crate::device::read_config_bytes(&cfg, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<()> {
        self.reset();
        let f = ctx.features;
        let backend_fd = {
            let mut b = lock(&self.backend);
            b.activate(f)
                .map_err(os("setting up the network backend"))?;
            b.fd()
        };
        let mut qs = ctx.queues.into_iter();
        let (Some((Some(rx), rx_evt)), Some((Some(tx), tx_evt))) = (qs.next(), qs.next()) else {
            return Err(Error::InvalidQueue(0));
        };
        let fds = [
            (rx_evt.as_raw_fd(), RX_TOKEN),
            (tx_evt.as_raw_fd(), TX_TOKEN),
            (backend_fd, BACKEND_TOKEN),
            (self.rx_limiter.lock().as_raw_fd(), RX_LIMITER_TOKEN),
            (self.tx_limiter.lock().as_raw_fd(), TX_LIMITER_TOKEN),
        ];
        let handler = NetHandler {
            mem: ctx.mem,
            rx,
            tx,
            rx_evt,
            tx_evt,
            backend: self.backend.clone(),
            backend_fd,
            label: self.label.clone(),
            link_up: self.link_up.clone(),
            interrupt: ctx.interrupt,
            frame: vec![0; MAX_FRAME],
            pending: None,
            want_in: true,
            watched: Some((true, false)),
            backend_dead: !self.link_up(),
            mrg_rxbuf: f & 1 << F_MRG_RXBUF != 0,
            metrics: self.metrics.clone(),
            tx_buf: vec![0; MAX_FRAME],
            rx_limiter: self.rx_limiter.clone(),
            tx_limiter: self.tx_limiter.clone(),
            pending_paid: false,
        };
        self.worker = Some(Worker::spawn(
            kvmbox_seccomp::ThreadKind::NetWorker,
            &fds,
            handler,
        )?);
        Ok(())
    }

    fn metrics(&self) -> Arc<DeviceMetrics> {
        self.metrics.clone()
    }

    fn reset(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
    }
}

/// The backend, even if a worker panicked while holding it (its state is still consistent:
/// every call leaves it whole).
pub(crate) fn lock(
    b: &Mutex<Box<dyn NetBackend>>,
) -> std::sync::MutexGuard<'_, Box<dyn NetBackend>> {
    b.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_option_parsing() {
        let c: NetConfig = "tap=tap0,mac=52:54:00:ab:cd:ef".parse().unwrap();
        assert_eq!(c.backend, NetBackendConfig::Tap("tap0".into()));
        assert_eq!(c.backend_spec(), "tap=tap0");
        assert_eq!(c.mac, Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef]));
        let c: NetConfig = "tap=t".parse().unwrap();
        assert_eq!(c.mac, None);
        let c: NetConfig = "user".parse().unwrap();
        assert_eq!(c.backend, NetBackendConfig::User(UserNetConfig::default()));
        let spec = "user,hostfwd=tcp::8080-:80,hostfwd=udp:127.0.0.3:5000-10.0.2.15:5001";
        let c: NetConfig = format!("{spec},mac=52:54:00:12:34:56").parse().unwrap();
        let NetBackendConfig::User(u) = &c.backend else {
            panic!("{c:?}")
        };
        assert_eq!(u.hostfwd.len(), 2);
        assert_eq!(c.mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!(
            c.backend_spec(),
            "user,hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=udp:127.0.0.3:5000-:5001"
        );
        assert_eq!(
            c.backend_spec().parse::<NetConfig>().unwrap().backend,
            c.backend
        );
        for (bad, msg) in [
            ("hostfwd=tcp::1-:2", "needs the user network"),
            ("tap=a,user", "goes with neither"),
            ("user,hostfwd=tcp::1-:99999", "'99999' is not a port"),
            ("mac=52:54:00:ab:cd:ef", "missing tap=NAME or user"),
            ("tap=a,mac=52:54:00:ab:cd", "not a unicast MAC"),
            ("tap=a,mac=53:54:00:ab:cd:ef", "not a unicast MAC"),
            ("tap=a,mac=52:54:00:ab:cd:ef:00", "not a unicast MAC"),
            ("tap=0123456789abcdef", "1 to 15 bytes"),
            ("tap=a,queues=2", "unknown option 'queues=2'"),
        ] {
            let e = bad.parse::<NetConfig>().unwrap_err().to_string();
            assert!(e.contains(msg), "{bad}: {e}");
        }
    }
}
