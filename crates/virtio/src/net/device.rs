//! The virtio-net device: options, features, configuration space, activation.

use std::os::fd::AsRawFd;
use std::str::FromStr;
use std::sync::Arc;

use super::event_handler::{NetHandler, MAX_FRAME, RX_TOKEN, TAP_TOKEN, TX_TOKEN, VNET_HDR_LEN};
use super::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};
use crate::device::{ActivateContext, VirtioDevice};
use crate::metrics::DeviceMetrics;
use crate::worker::Worker;
use crate::{os, Error, Result, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1, TYPE_NET};

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

/// Size of each of the two queues.
pub const QUEUE_SIZE: u16 = 256;

/// One `--net tap=NAME[,mac=MAC]` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// TAP interface name.
    pub tap: String,
    /// Guest MAC; a random locally administered one when absent.
    pub mac: Option<[u8; 6]>,
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

    /// Parse `tap=NAME[,mac=MAC]`.
    fn from_str(s: &str) -> Result<Self> {
        let mut tap = None;
        let mut mac = None;
        for p in s.split(',') {
            match p.split_once('=') {
                Some(("tap", n)) if !n.is_empty() && n.len() < libc::IFNAMSIZ => {
                    tap = Some(n.to_string())
                }
                Some(("tap", n)) => {
                    return Err(Error::Config(format!(
                        "--net '{s}': tap name '{n}' must be 1 to {} bytes",
                        libc::IFNAMSIZ - 1
                    )))
                }
                Some(("mac", m)) => match parse_mac(m) {
                    Some(v) if v[0] & 1 == 0 => mac = Some(v),
                    _ => {
                        return Err(Error::Config(format!(
                            "--net '{s}': '{m}' is not a unicast MAC like 52:54:00:12:34:56"
                        )))
                    }
                },
                _ => {
                    return Err(Error::Config(format!(
                        "--net '{s}': unknown option '{p}' (expected tap=NAME or mac=MAC)"
                    )))
                }
            }
        }
        let tap = tap.ok_or_else(|| Error::Config(format!("--net '{s}': missing tap=NAME")))?;
        Ok(NetConfig { tap, mac })
    }
}

/// A virtio-net device on a TAP interface.
pub struct Net {
    tap: Arc<Tap>,
    mac: [u8; 6],
    worker: Option<Worker>,
    metrics: Arc<DeviceMetrics>,
}

impl Net {
    /// Open the TAP interface `cfg` names (creating it needs CAP_NET_ADMIN).
    pub fn new(cfg: &NetConfig) -> Result<Self> {
        let tap = Tap::open(&cfg.tap, VNET_HDR_LEN as i32)?;
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
        Ok(Self {
            tap: Arc::new(tap),
            mac,
            worker: None,
            metrics: Arc::default(),
        })
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The TAP interface name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
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
        [
            F_VERSION_1,
            F_RING_EVENT_IDX,
            F_RING_INDIRECT_DESC,
            F_CSUM,
            F_GUEST_CSUM,
            F_MAC,
            F_GUEST_TSO4,
            F_GUEST_TSO6,
            F_HOST_TSO4,
            F_HOST_TSO6,
            F_MRG_RXBUF,
        ]
        .iter()
        .fold(0u64, |f, b| f | 1 << b)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::device::read_config_bytes(&self.mac, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<()> {
        self.reset();
        let f = ctx.features;
        let mut offload = 0;
        if f & 1 << F_GUEST_CSUM != 0 {
            offload |= TUN_F_CSUM;
            if f & 1 << F_GUEST_TSO4 != 0 {
                offload |= TUN_F_TSO4;
            }
            if f & 1 << F_GUEST_TSO6 != 0 {
                offload |= TUN_F_TSO6;
            }
        }
        self.tap.set_offload(offload).map_err(os("TUNSETOFFLOAD"))?;
        let mut qs = ctx.queues.into_iter();
        let (Some((Some(rx), rx_evt)), Some((Some(tx), tx_evt))) = (qs.next(), qs.next()) else {
            return Err(Error::InvalidQueue(0));
        };
        let fds = [
            (rx_evt.as_raw_fd(), RX_TOKEN),
            (tx_evt.as_raw_fd(), TX_TOKEN),
            (self.tap.as_raw_fd(), TAP_TOKEN),
        ];
        let handler = NetHandler {
            mem: ctx.mem,
            rx,
            tx,
            rx_evt,
            tx_evt,
            tap: self.tap.clone(),
            interrupt: ctx.interrupt,
            frame: vec![0; MAX_FRAME],
            pending: None,
            tap_watched: true,
            tap_dead: false,
            mrg_rxbuf: f & 1 << F_MRG_RXBUF != 0,
            metrics: self.metrics.clone(),
            tx_buf: vec![0; MAX_FRAME],
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_option_parsing() {
        let c: NetConfig = "tap=tap0,mac=52:54:00:ab:cd:ef".parse().unwrap();
        assert_eq!(c.tap, "tap0");
        assert_eq!(c.mac, Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef]));
        let c: NetConfig = "tap=t".parse().unwrap();
        assert_eq!(c.mac, None);
        for (bad, msg) in [
            ("mac=52:54:00:ab:cd:ef", "missing tap=NAME"),
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
