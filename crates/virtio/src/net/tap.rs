//! TAP interfaces through /dev/net/tun.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use kvmbox_cpu::GuestMemoryMmap;

use super::backend::NetBackend;
use super::device::{F_CSUM, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_HOST_TSO4, F_HOST_TSO6};
use super::event_handler::{parse_tx_frame, tx_reader, MAX_FRAME};
use crate::metrics::DeviceMetrics;
use crate::queue::{Chain, ChainError};
use crate::{Error, Result};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// TUNSETOFFLOAD: the tap may hand us frames with partial checksums.
pub const TUN_F_CSUM: u32 = 0x01;
/// TUNSETOFFLOAD: ... TCPv4 segmentation offload frames.
pub const TUN_F_TSO4: u32 = 0x02;
/// TUNSETOFFLOAD: ... TCPv6 segmentation offload frames.
pub const TUN_F_TSO6: u32 = 0x04;

/// A TAP interface opened with a virtio-net header on every frame.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Open (creating if needed) TAP interface `name` in the caller's network namespace,
    /// non-blocking, with a `hdr_len`-byte virtio-net header. Needs CAP_NET_ADMIN to create,
    /// or to attach to a device whose owner is not the caller's uid.
    ///
    /// When [`TAP_FDS_ENV`] names `name`, the descriptor it gives (attached by the process
    /// that started kvmbox) is used instead, through a duplicate, so a rebuilt machine (a
    /// restart, a restore) opens it again: no permission on the interface is needed.
    pub fn open(name: &str, hdr_len: i32) -> Result<Self> {
        let err = |what, source| Error::Backend {
            what,
            path: name.to_string(),
            source,
        };
        let file = match inherited_tap(name)? {
            Some(fd) => dup_nonblocking(fd).map_err(|e| err("using the inherited tap", e))?,
            None => attach(name, libc::O_NONBLOCK)?,
        };
        let tap = Self {
            file,
            name: name.to_string(),
        };
        let mut sz: libc::c_int = hdr_len;
        // SAFETY: TUNSETVNETHDRSZ reads one int we own.
        if unsafe { libc::ioctl(tap.file.as_raw_fd(), TUNSETVNETHDRSZ, &mut sz) } < 0 {
            return Err(err(
                "setting the vnet header size of tap",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Which offloaded frames the tap may deliver to us (`TUN_F_*`).
    pub fn set_offload(&self, flags: u32) -> std::io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes the flags by value.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        } < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Read one frame (with its vnet header).
    pub fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Write one frame (with its vnet header) gathered from `iov`.
    pub(crate) fn write_iovecs(&self, iov: &[libc::iovec]) -> std::io::Result<usize> {
        let n = libc::c_int::try_from(iov.len())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the tap fd is ours; writev only reads the `n` iovecs, whose ranges the caller
        // guarantees are readable memory (validated guest buffers).
        let r = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), n) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(r as usize)
    }

    /// Write one frame (with its vnet header).
    pub fn write_frame(&self, buf: &[u8]) -> std::io::Result<usize> {
        (&self.file).write(buf)
    }
}

/// The environment variable through which the process that starts kvmbox hands it TAP
/// descriptors it attached: `NAME=FD[,NAME=FD]...`. `kvmbox vm start` as root does so for a
/// jailed VM (`kvmbox jail` passes the variable on), so that the unprivileged VM process uses
/// the TAP without its owner ever being changed.
pub const TAP_FDS_ENV: &str = "KVMBOX_TAP_FDS";

/// The descriptor [`TAP_FDS_ENV`] gives for TAP `name`, if any.
fn inherited_tap(name: &str) -> Result<Option<RawFd>> {
    Ok(inherited_taps()?
        .iter()
        .find(|(n, _)| n == name)
        .map(|&(_, fd)| fd))
}

/// The descriptors [`TAP_FDS_ENV`] gives, by TAP name. The first call reads the variable and
/// marks every descriptor it names close-on-exec (helpers kvmbox starts, such as passt, must
/// not inherit them: call this before starting one); a malformed variable is an error naming
/// it.
pub(crate) fn inherited_taps() -> Result<&'static [(String, RawFd)]> {
    static FDS: std::sync::OnceLock<std::result::Result<Vec<(String, RawFd)>, String>> =
        std::sync::OnceLock::new();
    let fds = FDS.get_or_init(|| {
        let Some(v) = std::env::var_os(TAP_FDS_ENV) else {
            return Ok(Vec::new());
        };
        let v = v.to_string_lossy();
        let parsed = parse_tap_fds(&v)
            .map_err(|e| format!("{TAP_FDS_ENV}='{v}': {e} (expected NAME=FD[,NAME=FD]...)"))?;
        for &(_, fd) in &parsed {
            // SAFETY: F_SETFD on a descriptor number only changes its close-on-exec flag.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
                return Err(format!(
                    "{TAP_FDS_ENV}: descriptor {fd}: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        Ok(parsed)
    });
    fds.as_deref().map_err(|e| Error::Config(e.clone()))
}

/// `NAME=FD[,NAME=FD]...`: names of at most IFNAMSIZ-1 bytes, descriptors above 2.
fn parse_tap_fds(v: &str) -> std::result::Result<Vec<(String, RawFd)>, String> {
    v.split(',')
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (name, fd) = e
                .split_once('=')
                .ok_or_else(|| format!("'{e}' has no '='"))?;
            if name.is_empty() || name.len() >= libc::IFNAMSIZ {
                return Err(format!(
                    "tap name '{name}' must be 1 to {} bytes",
                    libc::IFNAMSIZ - 1
                ));
            }
            match fd.parse::<RawFd>() {
                Ok(fd) if fd > 2 => Ok((name.to_string(), fd)),
                _ => Err(format!("'{fd}' is not a descriptor number above 2")),
            }
        })
        .collect()
}

/// A close-on-exec, non-blocking duplicate of `fd`.
fn dup_nonblocking(fd: RawFd) -> std::io::Result<File> {
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor (or fails); nothing else is touched.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `new` was just made and nothing else owns it.
    let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(new) };
    // SAFETY: F_GETFL/F_SETFL on our descriptor read and set its status flags.
    let flags = unsafe { libc::fcntl(new, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(new, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// Attach a descriptor to TAP interface `name` (in the caller's network namespace; created,
/// not persistent, if there is none: it goes when its last descriptor closes) for another
/// process, which gets it through [`TAP_FDS_ENV`]: blocking and close-on-exec here (clear
/// the flag in the child that is to inherit it). Needs the permission [`Tap::open`] needs.
pub fn attach_for_another_process(name: &str) -> Result<File> {
    attach(name, 0)
}

/// Check `name` and attach a new descriptor of /dev/net/tun (with `flags` besides
/// `O_CLOEXEC`) to TAP interface `name`, creating it if there is none, as a virtio-net TAP
/// (no packet info, a virtio-net header on every frame).
fn attach(name: &str, flags: libc::c_int) -> Result<File> {
    let err = |what, source| Error::Backend {
        what,
        path: name.to_string(),
        source,
    };
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(Error::Config(format!(
            "tap name '{name}' must be 1 to {} bytes",
            libc::IFNAMSIZ - 1
        )));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| err("opening /dev/net/tun for tap", e))?;
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    ifr[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq (40 bytes) we own.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) } < 0 {
        return Err(err("creating tap", std::io::Error::last_os_error()));
    }
    Ok(file)
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Most guest buffers one transmit writev takes (the kernel's IOV_MAX); longer chains are
/// copied into a bounce buffer first.
const MAX_IOVECS: usize = 1024;

impl NetBackend for Tap {
    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn offload_features(&self) -> u64 {
        [
            F_CSUM,
            F_GUEST_CSUM,
            F_GUEST_TSO4,
            F_GUEST_TSO6,
            F_HOST_TSO4,
            F_HOST_TSO6,
        ]
        .iter()
        .fold(0u64, |f, b| f | 1 << b)
    }

    fn activate(&mut self, f: u64) -> std::io::Result<()> {
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
        self.set_offload(offload)
    }

    fn recv(&mut self, buf: &mut [u8], _metrics: &DeviceMetrics) -> std::io::Result<usize> {
        self.read_frame(buf)
    }

    /// Straight from guest memory (one writev: one frame), or through `scratch` when the
    /// chain has more buffers than one writev takes. A full tap queue drops the frame, as a
    /// congested link would.
    fn send(
        &mut self,
        chain: &Chain,
        mem: &GuestMemoryMmap,
        scratch: &mut [u8],
    ) -> std::result::Result<std::io::Result<usize>, ChainError> {
        let mut r = tx_reader(chain, mem, MAX_FRAME)?;
        let len = r.remaining();
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(chain.readable.len());
        r.for_each_host_range(len, |_, p, n| {
            if n > 0 {
                iov.push(libc::iovec {
                    iov_base: p.cast(),
                    iov_len: n,
                });
            }
            Ok(())
        })?;
        if iov.len() <= MAX_IOVECS {
            return Ok(self.write_iovecs(&iov).map(|_| len));
        }
        let n = parse_tx_frame(chain, mem, scratch)?;
        Ok(self.write_frame(&scratch[..n]).map(|_| n))
    }

    fn failure(&mut self) -> String {
        format!("tap '{}' failed or disappeared", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_tap_fds;

    #[test]
    fn tap_fds_parse_and_bad_ones_are_named() {
        assert_eq!(
            parse_tap_fds("tap0=3,kvt1=17").unwrap(),
            [("tap0".to_string(), 3), ("kvt1".to_string(), 17)]
        );
        assert_eq!(parse_tap_fds("").unwrap(), []);
        for (bad, why) in [
            ("tap0", "'tap0' has no '='"),
            ("tap0=2", "'2' is not a descriptor number above 2"),
            ("tap0=x", "'x' is not a descriptor number above 2"),
            ("=5", "tap name '' must be 1 to 15 bytes"),
            ("a23456789012345678=5", "must be 1 to 15 bytes"),
        ] {
            let e = parse_tap_fds(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
