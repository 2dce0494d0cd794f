//! The virtio-vsock device: option, configuration space (the guest's CID), the host listener
//! and activation of the worker.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use super::muxer::{Muxer, VsockHandler, EVENT_TOKEN, LISTENER_TOKEN, RX_TOKEN, TX_TOKEN};
use crate::device::{ActivateContext, VirtioDevice};
use crate::metrics::DeviceMetrics;
use crate::worker::Worker;
use crate::{Error, Result, F_RING_INDIRECT_DESC, F_VERSION_1, TYPE_VSOCK};

/// Size of each of the three queues (rx, tx, event).
pub const QUEUE_SIZE: u16 = 256;

/// The host's context id (VMADDR_CID_HOST).
pub const HOST_CID: u64 = 2;

/// Longest Unix socket path (`sun_path` holds 108 bytes with the terminating NUL).
const SUN_PATH_MAX: usize = 107;
/// What a guest-initiated connection adds to the path: `_` and a port (at most 10 digits).
const PORT_SUFFIX_MAX: usize = 11;

/// One `--vsock cid=N,uds=PATH` option (Firecracker's `guest_cid` and `uds_path`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id (3 to 2^32 - 2).
    pub guest_cid: u32,
    /// The host's Unix socket: kvmbox listens here for `CONNECT <port>`; a guest connection
    /// to host port P goes to `PATH_P`.
    pub uds_path: PathBuf,
}

impl VsockConfig {
    /// Check a CID and path (also for the API's `PUT /vsock`).
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self> {
        let guest_cid = match u32::try_from(guest_cid) {
            Ok(c) if (3..u32::MAX).contains(&c) => c,
            _ => {
                return Err(Error::Config(format!(
                    "vsock guest CID {guest_cid} must be 3 to {} (0-2 are reserved, {} is \
                     VMADDR_CID_ANY)",
                    u32::MAX - 1,
                    u32::MAX
                )))
            }
        };
        let len = uds_path.as_os_str().as_bytes().len();
        if len == 0 || uds_path.as_os_str().as_bytes().contains(&0) {
            return Err(Error::Config(
                "vsock uds path must be a non-empty path without NUL bytes".into(),
            ));
        }
        if len + PORT_SUFFIX_MAX > SUN_PATH_MAX {
            return Err(Error::Config(format!(
                "vsock uds path '{}' is {len} bytes; at most {} fit a Unix socket address \
                 with the '_PORT' of guest connections",
                uds_path.display(),
                SUN_PATH_MAX - PORT_SUFFIX_MAX
            )));
        }
        Ok(Self {
            guest_cid,
            uds_path,
        })
    }

    /// The option text (`cid=N,uds=PATH`), which parses back to the same configuration.
    pub fn spec(&self) -> String {
        format!("cid={},uds={}", self.guest_cid, self.uds_path.display())
    }
}

impl FromStr for VsockConfig {
    type Err = Error;

    /// Parse `cid=N,uds=PATH`.
    fn from_str(s: &str) -> Result<Self> {
        let mut cid = None;
        let mut uds = None;
        // PATH is last and may hold commas: everything after `uds=` is the path.
        let mut rest = s;
        while !rest.is_empty() {
            if let Some(p) = rest.strip_prefix("uds=") {
                uds = Some(PathBuf::from(p));
                break;
            }
            let (part, tail) = rest.split_once(',').unwrap_or((rest, ""));
            rest = tail;
            match part.split_once('=') {
                Some(("cid", v)) => {
                    cid = Some(v.parse::<u64>().map_err(|_| {
                        Error::Config(format!("--vsock '{s}': cid '{v}' is not a number"))
                    })?)
                }
                _ => {
                    return Err(Error::Config(format!(
                        "--vsock '{s}': unknown option '{part}' (expected cid=N,uds=PATH)"
                    )))
                }
            }
        }
        let (Some(cid), Some(uds)) = (cid, uds) else {
            return Err(Error::Config(format!(
                "--vsock '{s}': needs both cid=N and uds=PATH"
            )));
        };
        Self::new(cid, uds).map_err(|e| Error::Config(format!("--vsock '{s}': {e}")))
    }
}

/// `sockaddr_un` for `path` (checked by [`VsockConfig::new`] to fit) and its length.
pub(crate) fn sockaddr_un(path: &Path) -> Option<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return None;
    }
    for (d, &s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Some((addr, len as libc::socklen_t))
}

/// A non-blocking, close-on-exec Unix stream socket.
pub(crate) fn unix_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: socket has no memory arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The host's listening socket at the configured path, removed when the device goes.
pub(crate) struct Listener {
    pub(crate) fd: OwnedFd,
    path: PathBuf,
}

impl Listener {
    fn bind(path: &Path) -> Result<Self> {
        let err = |what: &'static str| Error::Backend {
            what,
            path: path.display().to_string(),
            source: std::io::Error::last_os_error(),
        };
        let (addr, len) = sockaddr_un(path).ok_or_else(|| {
            Error::Config(format!(
                "vsock uds path '{}' does not fit a Unix socket address",
                path.display()
            ))
        })?;
        let fd = unix_socket().map_err(|_| err("creating the vsock socket"))?;
        // SAFETY: `addr` is a valid sockaddr_un of `len` bytes; `fd` is ours.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            )
        };
        if r != 0 {
            return Err(err(
                "binding the vsock socket (a stale one must be removed first)",
            ));
        }
        let me = Self {
            fd,
            path: path.to_path_buf(),
        };
        // SAFETY: listen on our own socket.
        if unsafe { libc::listen(me.fd.as_raw_fd(), 128) } != 0 {
            return Err(err("listening on the vsock socket"));
        }
        Ok(me)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A virtio-vsock device with Firecracker's host side: Unix sockets at the configured path.
pub struct Vsock {
    cfg: VsockConfig,
    listener: Arc<Listener>,
    worker: Option<Worker>,
    metrics: Arc<DeviceMetrics>,
}

impl Vsock {
    /// Listen on the configured path (it must not exist yet).
    pub fn new(cfg: &VsockConfig) -> Result<Self> {
        Ok(Self {
            listener: Arc::new(Listener::bind(&cfg.uds_path)?),
            cfg: cfg.clone(),
            worker: None,
            metrics: Arc::default(),
        })
    }

    /// The configuration it was made with.
    pub fn config(&self) -> &VsockConfig {
        &self.cfg
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        // No EVENT_IDX: the receive queue's notifications stay on, which the worker needs
        // whenever it holds packets for the guest.
        1 << F_VERSION_1 | 1 << F_RING_INDIRECT_DESC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = u64::from(self.cfg.guest_cid).to_le_bytes();
        crate::device::read_config_bytes(&cfg, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<()> {
        self.reset();
        let mut qs = ctx.queues.into_iter();
        let (Some((Some(rx), rx_evt)), Some((Some(tx), tx_evt)), Some((_, ev_evt))) =
            (qs.next(), qs.next(), qs.next())
        else {
            return Err(Error::InvalidQueue(0));
        };
        let fds = [
            (rx_evt.as_raw_fd(), RX_TOKEN),
            (tx_evt.as_raw_fd(), TX_TOKEN),
            (ev_evt.as_raw_fd(), EVENT_TOKEN),
            (self.listener.fd.as_raw_fd(), LISTENER_TOKEN),
        ];
        let handler = VsockHandler {
            mem: ctx.mem,
            rx,
            tx,
            rx_evt,
            tx_evt,
            ev_evt,
            interrupt: ctx.interrupt,
            mux: Muxer::new(
                u64::from(self.cfg.guest_cid),
                self.cfg.uds_path.clone(),
                self.listener.clone(),
                self.metrics.clone(),
            ),
        };
        self.worker = Some(Worker::spawn(
            kvmbox_seccomp::ThreadKind::VsockWorker,
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
    fn vsock_option_parsing() {
        let c: VsockConfig = "cid=3,uds=/tmp/v.sock".parse().unwrap();
        assert_eq!(c.guest_cid, 3);
        assert_eq!(c.uds_path, PathBuf::from("/tmp/v.sock"));
        assert_eq!(c.spec(), "cid=3,uds=/tmp/v.sock");
        assert_eq!(c.spec().parse::<VsockConfig>().unwrap(), c);
        let c: VsockConfig = "cid=9,uds=/tmp/a,b".parse().unwrap();
        assert_eq!(c.uds_path, PathBuf::from("/tmp/a,b"));
        let long = format!("cid=3,uds=/{}", "x".repeat(100));
        for (bad, msg) in [
            ("cid=2,uds=/tmp/x", "must be 3 to"),
            ("cid=4294967295,uds=/tmp/x", "must be 3 to"),
            ("cid=99999999999,uds=/tmp/x", "must be 3 to"),
            ("cid=x,uds=/tmp/x", "'x' is not a number"),
            ("cid=3", "needs both"),
            ("uds=/tmp/x", "needs both"),
            ("cid=3,port=4,uds=/tmp/x", "unknown option 'port=4'"),
            ("cid=3,uds=", "non-empty"),
            (long.as_str(), "at most 96 fit"),
        ] {
            let e = bad.parse::<VsockConfig>().unwrap_err().to_string();
            assert!(e.contains(msg), "{bad}: {e}");
        }
    }
}
