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
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_PERSIST: libc::c_short = 0x0800;
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
    /// or to attach to a device whose owner is not the caller's uid (see [`lend`]).
    pub fn open(name: &str, hdr_len: i32) -> Result<Self> {
        let err = |what, source| Error::Backend {
            what,
            path: name.to_string(),
            source,
        };
        let file = attach(name, libc::O_NONBLOCK)?;
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

/// An ioctl on an attached TAP descriptor that takes its argument by value.
fn tun_set(
    file: &File,
    name: &str,
    what: &'static str,
    req: libc::c_ulong,
    arg: u32,
) -> Result<()> {
    // SAFETY: TUNSETOWNER and TUNSETPERSIST take their argument by value.
    if unsafe { libc::ioctl(file.as_raw_fd(), req, libc::c_ulong::from(arg)) } < 0 {
        return Err(Error::Backend {
            what,
            path: name.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Whether an interface named `name` exists in the caller's network namespace (its index).
fn if_index(name: &str) -> u32 {
    let Ok(c) = std::ffi::CString::new(name) else {
        return 0;
    };
    // SAFETY: if_nametoindex reads the NUL-terminated string we own.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

/// How a TAP interface was before [`lend`] gave it to a user: what [`give_back`] restores.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TapLoan {
    /// The interface.
    pub name: String,
    /// Whether `lend` created it (`give_back` deletes it).
    pub created: bool,
    /// Its owner before (None: it had none).
    pub owner: Option<u32>,
    /// Whether it was persistent before.
    pub persist: bool,
}

/// Make TAP interface `name` (in the caller's network namespace; created if there is none)
/// usable by `uid` without CAP_NET_ADMIN: owner `uid`, persistent, so that it outlives this
/// descriptor. Needs CAP_NET_ADMIN. Fails (EBUSY) when another process has it attached.
pub fn lend(name: &str, uid: u32) -> Result<TapLoan> {
    let index = if_index(name);
    let owner = if index == 0 {
        None
    } else {
        sysfs_owner(name, index)?
    };
    let file = attach(name, 0)?;
    let persist = index != 0 && {
        let mut ifr = [0u8; 40];
        // SAFETY: TUNGETIFF writes a struct ifreq (40 bytes) we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNGETIFF, ifr.as_mut_ptr()) } < 0 {
            return Err(Error::Backend {
                what: "reading the flags of tap",
                path: name.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        libc::c_short::from_ne_bytes([ifr[16], ifr[17]]) & IFF_PERSIST != 0
    };
    tun_set(&file, name, "setting the owner of tap", TUNSETOWNER, uid)?;
    tun_set(&file, name, "making persistent tap", TUNSETPERSIST, 1)?;
    Ok(TapLoan {
        name: name.to_string(),
        created: index == 0,
        owner,
        persist,
    })
}

/// Undo [`lend`] (call when no process has the interface attached, in the network namespace
/// it was lent in): delete an interface it created; give one that existed its owner and
/// persistence back. An interface with no owner before gets owner 0 (root): the kernel
/// cannot unset an owner; root may attach to it as before.
pub fn give_back(loan: &TapLoan) -> Result<()> {
    let name = &loan.name;
    if if_index(name) == 0 {
        if loan.created {
            return Ok(());
        }
        return Err(Error::Config(format!(
            "tap '{name}' is gone: cannot give it its owner back"
        )));
    }
    let file = attach(name, 0)?;
    if !loan.created {
        let owner = loan.owner.unwrap_or(0);
        tun_set(
            &file,
            name,
            "giving back the owner of tap",
            TUNSETOWNER,
            owner,
        )?;
    }
    // A created interface goes when its last descriptor (this one) closes, unpersisted.
    let persist = !loan.created && loan.persist;
    tun_set(
        &file,
        name,
        "giving back the persistence of tap",
        TUNSETPERSIST,
        u32::from(persist),
    )
}

/// The owner of TAP `name` (index `index`) from /sys/class/net (the kernel has no ioctl for
/// it); an error when /sys shows another network namespace's interface of that name.
fn sysfs_owner(name: &str, index: u32) -> Result<Option<u32>> {
    let dir = format!("/sys/class/net/{name}");
    let read = |f: &str| -> Result<String> {
        std::fs::read_to_string(format!("{dir}/{f}"))
            .map(|t| t.trim().to_string())
            .map_err(|e| Error::Backend {
                what: "reading /sys/class/net for tap",
                path: name.to_string(),
                source: e,
            })
    };
    if read("ifindex")? != index.to_string() {
        return Err(Error::Config(format!(
            "tap '{name}': /sys/class/net shows another network namespace's interface of that name (mount a sysfs of this namespace, as ip netns exec does)"
        )));
    }
    let owner = read("owner")?;
    match owner.parse::<i64>() {
        Ok(-1) => Ok(None),
        Ok(o) => u32::try_from(o)
            .map(Some)
            .map_err(|_| Error::Config(format!("tap '{name}': owner '{owner}' in {dir}/owner"))),
        Err(_) => Err(Error::Config(format!(
            "tap '{name}': owner '{owner}' in {dir}/owner is not a number"
        ))),
    }
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
        r.for_each_host_range(len, |p, n| {
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
