//! kvmbox's jail, in the spirit of Firecracker's jailer: run one program (kvmbox itself) in a
//! chroot that holds only the files it needs, in new mount and PID namespaces (and optionally a
//! given network namespace), with resource limits, as an unprivileged user with no capabilities.
//!
//! What happens, in order ([`Jail::prepare`], then [`Jail::run`]):
//! 1. The jail's directory `<chroot_base>/kvmbox/<id>` is created (it must not exist: two jails
//!    with one id would share it); its `root/` is the chroot.
//! 2. Every file the program needs is placed at its own absolute host path inside `root/`
//!    (the jail mirrors host paths, so the program's arguments, relative paths in its config
//!    file and qcow2 backing names keep their meaning): a hard link where `root/` is on the
//!    file's filesystem, otherwise an empty placeholder that the jailed process bind-mounts the
//!    file onto (read-only unless the program writes it). The program's own executable is
//!    placed at `/kvmbox`; a dynamic executable (a helper program such as passt, or a kvmbox
//!    built without `.cargo/config.toml`'s static linking) also gets its ELF interpreter and
//!    the shared libraries that interpreter resolves for it, at their paths (kvmbox itself is
//!    static and needs none). Files it writes are chowned to the
//!    jail's user (and given back to their owner afterwards); files it only reads must be
//!    readable by that user. Device nodes (`/dev/kvm`, `/dev/net/tun`, `/dev/urandom`,
//!    `/dev/null`) are made with `mknod` with the host's numbers and chowned to the user.
//! 3. A child is forked into a new PID namespace (it is PID 1 there) and a new mount namespace.
//!    It enters the network namespace, makes every mount private, bind-mounts what could not be
//!    hard-linked, `pivot_root`s into `root/` and detaches the old root, sets the rlimits, drops
//!    every capability from its bounding and ambient sets, sets no-new-privileges, switches to
//!    the user's uid and gid (no supplementary groups), clears the rest of its capabilities,
//!    and `exec`s `/kvmbox` with a minimal environment (`TERM` and [`Spec::env`]). With
//!    [`Spec::proc`] it mounts a `subset=pid` procfs at `/proc` after the `pivot_root`. The
//!    jailer puts the child in its cgroup ([`Spec::cgroup`], [`Spec::limits`]) and writes its
//!    host PID to [`Spec::pid_file`] before letting it go on. A failure on the way is sent back
//!    through a pipe and reported by the jailer, naming the step.
//! 4. The jailer waits for it, forwarding SIGTERM/SIGINT/SIGHUP/SIGQUIT, then removes what it
//!    made (see [`Jail`]'s `Drop`): the jail's directory, host-side symlinks, and file owners.
//!    The mounts died with the child's mount namespace.

use std::ffi::{CString, OsStr, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Where jails go when `--chroot-base` is not given (Firecracker's default).
pub const DEFAULT_CHROOT_BASE: &str = "/srv/jailer";

/// The executable's path inside the jail.
pub const JAILED_EXE: &str = "/kvmbox";

/// [`Needed::what`] of a program the jailed program runs (passt): it must be executable by
/// the jail's user.
pub const HELPER_PROGRAM: &str = "helper program";

/// Longest jail id (Firecracker's limit).
pub const MAX_ID_LEN: usize = 64;

/// Why a jail could not be made or run.
#[derive(Debug)]
pub enum Error {
    /// Something the user gave is wrong (a bad id or uid, a file that cannot be placed).
    Usage(String),
    /// The host refused a step (a mount, `mknod`, a namespace).
    Setup(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Usage(m) | Error::Setup(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

type Result<T> = std::result::Result<T, Error>;

fn usage(m: impl Into<String>) -> Error {
    Error::Usage(m.into())
}

fn setup(m: impl Into<String>) -> Error {
    Error::Setup(m.into())
}

/// A host file the jailed program uses.
#[derive(Debug, Clone)]
pub struct Needed {
    /// What it is, for messages ("kernel", "disk", ...).
    pub what: String,
    /// Its host path (absolute or relative to the jailer's working directory).
    pub path: PathBuf,
    /// The program writes it: it is chowned to the jail's user while the jail runs.
    pub writable: bool,
}

/// A device node made in the jail's `/dev`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// `/dev/kvm`.
    Kvm,
    /// `/dev/net/tun` (TAP devices).
    Tun,
    /// `/dev/urandom`.
    Urandom,
    /// `/dev/null`.
    Null,
}

impl Device {
    fn path(self) -> &'static str {
        match self {
            Device::Kvm => "/dev/kvm",
            Device::Tun => "/dev/net/tun",
            Device::Urandom => "/dev/urandom",
            Device::Null => "/dev/null",
        }
    }
}

/// A resource limit set in the jail before the program starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    /// `RLIMIT_*`.
    pub resource: libc::__rlimit_resource_t,
    /// Soft and hard limit.
    pub value: u64,
}

/// The `--resource-limit` names: Firecracker's `fsize` and `no-file`, and `as`/`memlock` for memory.
pub const RLIMIT_NAMES: &[(&str, libc::__rlimit_resource_t)] = &[
    ("fsize", libc::RLIMIT_FSIZE),
    ("no-file", libc::RLIMIT_NOFILE),
    ("as", libc::RLIMIT_AS),
    ("memlock", libc::RLIMIT_MEMLOCK),
];

impl std::str::FromStr for Rlimit {
    type Err = String;
    /// `NAME=VALUE` with a name from [`RLIMIT_NAMES`] and a number of bytes or files.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let names = || {
            RLIMIT_NAMES
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (name, value) = s
            .split_once('=')
            .ok_or_else(|| format!("--resource-limit {s:?}: expected NAME=VALUE"))?;
        let resource = RLIMIT_NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, r)| *r)
            .ok_or_else(|| {
                format!(
                    "--resource-limit {s:?}: unknown limit {name:?} (known: {})",
                    names()
                )
            })?;
        let value = value
            .parse::<u64>()
            .map_err(|_| format!("--resource-limit {s:?}: {value:?} is not a whole number"))?;
        Ok(Rlimit { resource, value })
    }
}

/// The cgroup limits of [`Spec::limits`] (all off by default), set with
/// [`kvmbox_cgroup::Cgroup::set_cpu_max`], `set_cpu_weight` and `set_memory_limit`.
#[derive(Debug, Clone, Default)]
pub struct CgroupLimits {
    /// CPU bandwidth.
    pub cpu_max: Option<kvmbox_cgroup::CpuMax>,
    /// CPU weight, 1-10000.
    pub cpu_weight: Option<u32>,
    /// Memory limit in bytes, swap included.
    pub memory_limit: Option<u64>,
    /// Where the group goes, from the hierarchy's root (default: `kvmbox/` under the jailer's
    /// own group).
    pub parent: Option<PathBuf>,
}

impl CgroupLimits {
    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        self.cpu_max.is_some() || self.cpu_weight.is_some() || self.memory_limit.is_some()
    }
}

/// The name of a jail's cgroup (`kvmbox/jail-<id>` under the jailer's group, or under
/// [`CgroupLimits::parent`]).
pub fn cgroup_name(id: &str) -> String {
    format!("jail-{id}")
}

/// Everything a jail is made from.
#[derive(Debug, Clone, Default)]
pub struct Spec {
    /// The jail's name: 1 to [`MAX_ID_LEN`] ASCII letters, digits and `-`.
    pub id: String,
    /// The user the program runs as (not 0).
    pub uid: u32,
    /// Its group (not 0).
    pub gid: u32,
    /// The jail is `<chroot_base>/kvmbox/<id>`.
    pub chroot_base: PathBuf,
    /// A network namespace to enter (a file such as `/var/run/netns/NAME`).
    pub netns: Option<PathBuf>,
    /// Resource limits.
    pub rlimits: Vec<Rlimit>,
    /// Cgroup control files to set (`cpu.shares` = `100`, as Firecracker's `--cgroup`): the
    /// program runs in a group of its own, `kvmbox/jail-<id>` under the jailer's group (v2, or
    /// in each v1 hierarchy of the controllers named), removed afterwards.
    pub cgroup: Vec<(String, String)>,
    /// Resource limits placed through the program's cgroup (the same group as `cgroup`'s
    /// files), in whichever version holds the controller.
    pub limits: CgroupLimits,
    /// Files the program uses.
    pub files: Vec<Needed>,
    /// Directories the program creates files in (an API socket's): made in the jail, owned by
    /// the user.
    pub writable_dirs: Vec<PathBuf>,
    /// Host paths made symlinks to the same path inside the jail (an API socket the program
    /// creates), removed afterwards. They must not exist.
    pub host_links: Vec<PathBuf>,
    /// Device nodes to make.
    pub devices: Vec<Device>,
    /// Environment variables of the program, besides `TERM` (which is passed on).
    pub env: Vec<(OsString, OsString)>,
    /// Mount a procfs at `/proc` in the jail (nosuid, nodev, noexec, `subset=pid`): it shows
    /// the processes of the jail's own PID namespace only, and none of the host's
    /// `/proc/sys`, `/proc/bus` ... files. For helpers that need it (passt reads `/proc/self/exe` and
    /// writes its user namespace's `uid_map`); off by default.
    pub proc: bool,
    /// Where to write the program's host PID (as soon as it is forked, before it runs; the
    /// file is written through a temporary file and a rename).
    pub pid_file: Option<PathBuf>,
    /// The program's arguments (after its name).
    pub args: Vec<OsString>,
    /// Detach: the jailer's first process prints the program's host PID and exits 0 once it
    /// runs; a daemon (new session, stdio on /dev/null) waits for it and cleans up.
    pub daemonize: bool,
}

/// A jail id may name a directory and nothing else.
pub fn check_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(usage(format!(
            "--id {id:?}: must be 1 to {MAX_ID_LEN} characters"
        )));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return Err(usage(format!(
            "--id {id:?}: {c:?} is not allowed (only ASCII letters, digits and '-')"
        )));
    }
    Ok(())
}

/// `p` made absolute against `cwd` with `.` and `..` resolved by name, as the path is seen
/// inside the jail (where every directory on it is a real directory). `..` never climbs above `/`.
pub fn jail_path(cwd: &Path, p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in cwd.join(p).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// `root` joined with the absolute in-jail path `p`.
fn under(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

fn cstr(p: &OsStr) -> Result<CString> {
    CString::new(p.as_bytes())
        .map_err(|_| usage(format!("{}: contains a NUL byte", p.to_string_lossy())))
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// Whether `uid`/`gid` (no supplementary groups) may read (`bit` 4) or execute (`bit` 1) a
/// file with `meta`, from its mode bits.
fn user_may(meta: &std::fs::Metadata, uid: u32, gid: u32, bit: u32) -> bool {
    let mode = meta.mode();
    if meta.uid() == uid {
        mode & (bit << 6) != 0
    } else if meta.gid() == gid {
        mode & (bit << 3) != 0
    } else {
        mode & bit != 0
    }
}

/// An executable's ELF interpreter (`PT_INTERP`), if it has one. Reads only the ELF header,
/// the program headers and the interpreter's name (kvmbox with its debug information is tens
/// of MiB).
fn elf_interpreter(exe: &Path) -> Result<Option<PathBuf>> {
    use std::os::unix::fs::FileExt;
    let file =
        std::fs::File::open(exe).map_err(|e| setup(format!("reading {}: {e}", exe.display())))?;
    let bad = || setup(format!("{}: not a 64-bit ELF file", exe.display()));
    // Headers and an interpreter's name are small: a length beyond 1 MiB is a broken file.
    let read = |off: u64, len: u64| -> Result<Vec<u8>> {
        if len > 1 << 20 {
            return Err(bad());
        }
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, off).map_err(|_| bad())?;
        Ok(buf)
    };
    let field = |b: &[u8], o: usize, n: usize| -> Option<u64> {
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(b.get(o..o + n)?);
        Some(u64::from_le_bytes(v))
    };
    let header = read(0, 64)?;
    if header.get(..5) != Some(b"\x7fELF\x02") {
        return Err(bad());
    }
    let phoff = field(&header, 0x20, 8).ok_or_else(bad)?;
    let phentsize = field(&header, 0x36, 2).ok_or_else(bad)?;
    let phnum = field(&header, 0x38, 2).ok_or_else(bad)?;
    let headers = read(phoff, phentsize * phnum)?;
    for i in 0..phnum as usize {
        let ph = i * phentsize as usize;
        if field(&headers, ph, 4) == Some(3) {
            let off = field(&headers, ph + 8, 8).ok_or_else(bad)?;
            let size = field(&headers, ph + 32, 8).ok_or_else(bad)?;
            let raw = read(off, size)?;
            let name = raw.split(|&b| b == 0).next().unwrap_or_default();
            return Ok(Some(PathBuf::from(OsStr::from_bytes(name))));
        }
    }
    Ok(None)
}

/// What a dynamic executable needs in the jail to start: its ELF interpreter and the shared
/// libraries the interpreter resolves for it (`INTERP --list EXE`, what `ldd` runs), each at
/// its host path. Nothing for a static executable (kvmbox itself is one).
fn shared_objects(exe: &Path) -> Result<Vec<(Needed, PathBuf)>> {
    let Some(interp) = elf_interpreter(exe)? else {
        return Ok(Vec::new());
    };
    let real = std::fs::canonicalize(&interp)
        .map_err(|e| setup(format!("ELF interpreter {}: {e}", interp.display())))?;
    let out = std::process::Command::new(&real)
        .arg("--list")
        .arg(exe)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| setup(format!("running {} --list: {e}", real.display())))?;
    let listed = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || listed.contains("not found") {
        return Err(usage(format!(
            "{}: its shared libraries cannot all be found ({} --list says: {}{})",
            exe.display(),
            real.display(),
            listed.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let mut objects = vec![(
        Needed {
            what: "the ELF interpreter".into(),
            path: real,
            writable: false,
        },
        interp,
    )];
    // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`; the vDSO and the interpreter
    // itself have no `=>`.
    for lib in listed.lines().filter_map(|l| l.split_once("=>")) {
        let Some(path) = lib
            .1
            .split_whitespace()
            .next()
            .filter(|p| p.starts_with('/'))
        else {
            continue;
        };
        objects.push((
            Needed {
                what: "shared library".into(),
                path: PathBuf::from(path),
                writable: false,
            },
            PathBuf::from(path),
        ));
    }
    Ok(objects)
}

/// A file placed by bind mount in the jailed process (its own mount namespace).
#[derive(Debug, Clone)]
struct Bind {
    source: CString,
    target: CString,
    writable: bool,
}

/// A jail made on the host, removed again when dropped.
///
/// Who removes what: the jailer (this value's `Drop`, in the process that waited for the
/// program: the foreground jailer, or the daemon with `--daemonize`) removes the whole
/// `<chroot_base>/kvmbox/<id>` directory (hard links, placeholders, device nodes), the host-side
/// symlinks it made, and gives chowned files back to their owners. Bind mounts need no removal:
/// they exist only in the jailed process's mount namespace, which ends with it. If the jailer
/// itself is killed (SIGKILL), the directory stays and a new jail with that id is refused until
/// it is removed by hand.
pub struct Jail {
    spec: Spec,
    dir: PathBuf,
    root: PathBuf,
    cwd: PathBuf,
    binds: Vec<Bind>,
    chowned: Vec<(PathBuf, u32, u32)>,
    made_links: Vec<PathBuf>,
    netns: Option<OwnedFd>,
    cgroup: Option<kvmbox_cgroup::Cgroup>,
}

impl Jail {
    /// The chroot directory (`<chroot_base>/kvmbox/<id>/root`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Check `spec` and build the jail's directory. Nothing is left behind on an error.
    pub fn prepare(spec: Spec) -> Result<Jail> {
        check_id(&spec.id)?;
        if spec.uid == 0 || spec.uid == u32::MAX {
            return Err(usage(format!(
                "--uid {}: the jail runs the program as an unprivileged user (not 0 or 4294967295)",
                spec.uid
            )));
        }
        if spec.gid == 0 || spec.gid == u32::MAX {
            return Err(usage(format!(
                "--gid {}: the jail runs the program in an unprivileged group (not 0 or 4294967295)",
                spec.gid
            )));
        }
        // SAFETY: geteuid has no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err(usage(
                "kvmbox jail must run as root (it makes namespaces, mounts and device nodes)",
            ));
        }
        let netns = spec.netns.as_deref().map(open_netns).transpose()?;
        let cwd =
            std::env::current_dir().map_err(|e| setup(format!("the current directory: {e}")))?;

        // The executable and its libraries first, then the program's files.
        let exe = std::fs::read_link("/proc/self/exe")
            .map_err(|e| setup(format!("finding the kvmbox executable: {e}")))?;
        let mut placements: Vec<(Needed, PathBuf)> = Vec::new();
        placements.push((
            Needed {
                what: "the kvmbox executable".into(),
                path: exe.clone(),
                writable: false,
            },
            PathBuf::from(JAILED_EXE),
        ));
        placements.extend(shared_objects(&exe)?);
        for f in spec.files.iter().filter(|f| f.what == HELPER_PROGRAM) {
            placements.extend(shared_objects(&f.path)?);
        }
        for f in &spec.files {
            placements.push((f.clone(), jail_path(&cwd, &f.path)));
        }
        // A path named twice is placed once, writable if any use writes it.
        let mut merged: Vec<(Needed, PathBuf)> = Vec::new();
        for (n, at) in placements {
            match merged.iter_mut().find(|(_, a)| *a == at) {
                Some((m, _)) => {
                    let same = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.into());
                    if same(&m.path) != same(&n.path) {
                        return Err(usage(format!(
                            "{} {} and {} {} would both be {} in the jail",
                            m.what,
                            m.path.display(),
                            n.what,
                            n.path.display(),
                            at.display()
                        )));
                    }
                    m.writable |= n.writable;
                }
                None => merged.push((n, at)),
            }
        }

        // Check everything before making anything.
        let exec_bit = 1;
        let read_bit = 4;
        for (n, _) in &merged {
            let meta = std::fs::metadata(&n.path)
                .map_err(|e| usage(format!("{} {}: {e}", n.what, n.path.display())))?;
            // The kernel maps the executable and its interpreter only with execute permission.
            let bit = if n.what == "the kvmbox executable"
                || n.what == "the ELF interpreter"
                || n.what == HELPER_PROGRAM
            {
                exec_bit
            } else {
                read_bit
            };
            if !n.writable && !user_may(&meta, spec.uid, spec.gid, bit) {
                return Err(usage(format!(
                    "{} {}: not {} by uid {} gid {} (mode {:o}, owner {}:{}); the jailed VM runs as that user",
                    n.what,
                    n.path.display(),
                    if bit == exec_bit { "executable" } else { "readable" },
                    spec.uid,
                    spec.gid,
                    meta.mode() & 0o7777,
                    meta.uid(),
                    meta.gid()
                )));
            }
        }
        for l in &spec.host_links {
            if std::fs::symlink_metadata(l).is_ok() {
                return Err(usage(format!("{}: already exists", l.display())));
            }
        }

        // Absolute: the API socket's host symlink points into it.
        let kvmbox_dir = jail_path(&cwd, &spec.chroot_base).join("kvmbox");
        std::fs::create_dir_all(&kvmbox_dir)
            .map_err(|e| setup(format!("creating {}: {e}", kvmbox_dir.display())))?;
        let dir = kvmbox_dir.join(&spec.id);
        if let Err(e) = std::fs::create_dir(&dir) {
            return Err(if e.kind() == std::io::ErrorKind::AlreadyExists {
                usage(format!(
                    "jail {}: {} exists (a jail with this id runs, or an earlier one was not removed)",
                    spec.id,
                    dir.display()
                ))
            } else {
                setup(format!("creating {}: {e}", dir.display()))
            });
        }
        let root = dir.join("root");
        let mut jail = Jail {
            cwd: jail_path(&cwd, Path::new(".")),
            spec,
            dir,
            root,
            binds: Vec::new(),
            chowned: Vec::new(),
            made_links: Vec::new(),
            netns,
            cgroup: None,
        };
        jail.build(&merged)?;
        jail.make_cgroup()?;
        Ok(jail)
    }

    fn build(&mut self, placements: &[(Needed, PathBuf)]) -> Result<()> {
        let mkdir = |p: &Path| {
            std::fs::create_dir_all(p).map_err(|e| setup(format!("creating {}: {e}", p.display())))
        };
        mkdir(&self.root)?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o755))
            .and_then(|_| {
                std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o755))
            })
            .map_err(|e| setup(format!("{}: {e}", self.root.display())))?;
        let (uid, gid) = (self.spec.uid, self.spec.gid);
        for (n, at) in placements {
            let target = under(&self.root, at);
            if let Some(parent) = target.parent() {
                mkdir(parent)?;
            }
            let meta = std::fs::metadata(&n.path)
                .map_err(|e| usage(format!("{} {}: {e}", n.what, n.path.display())))?;
            let linked = !meta.is_dir() && std::fs::hard_link(&n.path, &target).is_ok();
            if !linked {
                // Another filesystem (or a directory): a placeholder to bind-mount onto.
                let made = if meta.is_dir() {
                    std::fs::create_dir(&target)
                } else {
                    std::fs::File::create(&target).map(drop)
                };
                made.map_err(|e| {
                    usage(format!(
                        "{} {}: cannot be placed in the jail at {}: {e}",
                        n.what,
                        n.path.display(),
                        target.display()
                    ))
                })?;
                self.binds.push(Bind {
                    source: cstr(n.path.as_os_str())?,
                    target: cstr(at.as_os_str())?,
                    writable: n.writable,
                });
            }
            if n.writable && (meta.uid() != uid || meta.gid() != gid) {
                std::os::unix::fs::chown(&n.path, Some(uid), Some(gid))
                    .map_err(|e| setup(format!("chown {}: {e}", n.path.display())))?;
                self.chowned.push((n.path.clone(), meta.uid(), meta.gid()));
            }
        }
        for d in self.spec.writable_dirs.clone() {
            let p = under(&self.root, &jail_path(&self.cwd, &d));
            mkdir(&p)?;
            std::os::unix::fs::chown(&p, Some(uid), Some(gid))
                .and_then(|_| std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)))
                .map_err(|e| setup(format!("{}: {e}", p.display())))?;
        }
        for d in self.spec.devices.clone() {
            self.make_device(d)?;
        }
        mkdir(&under(&self.root, &self.cwd))?;
        for l in self.spec.host_links.clone() {
            let inside = under(&self.root, &jail_path(&self.cwd, &l));
            std::os::unix::fs::symlink(&inside, &l)
                .map_err(|e| usage(format!("{}: {e}", l.display())))?;
            self.made_links.push(l);
        }
        Ok(())
    }

    /// The program's cgroup with the files the spec sets (none without `cgroup`).
    fn make_cgroup(&mut self) -> Result<()> {
        use kvmbox_cgroup::{Cgroup, Error as CgError, Hierarchy};
        let limits = &self.spec.limits;
        if self.spec.cgroup.is_empty() && !limits.any() {
            return Ok(());
        }
        let err = |e: CgError| match e {
            CgError::Invalid(m) => usage(format!("--cgroup: {m}")),
            e => setup(format!("--cgroup: {e}")),
        };
        // With any limit, both controllers (as kvmbox run's own group has): the limits not
        // set now can be set later by root.
        let mut controllers: Vec<&str> = Vec::new();
        if limits.any() {
            controllers.extend(["cpu", "memory"]);
        }
        for (k, _) in &self.spec.cgroup {
            let c = k.split_once('.').map_or(k.as_str(), |(c, _)| c);
            if !controllers.contains(&c) {
                controllers.push(c);
            }
        }
        let h = Hierarchy::detect(&controllers).map_err(err)?;
        let group = Cgroup::create(&h, limits.parent.as_deref(), &cgroup_name(&self.spec.id))
            .map_err(err)?;
        // Kept from here on, so that Drop removes it even if a file cannot be set.
        let group = self.cgroup.insert(group);
        if limits.cpu_max.is_some() {
            group.set_cpu_max(limits.cpu_max).map_err(err)?;
        }
        if let Some(w) = limits.cpu_weight {
            group.set_cpu_weight(w).map_err(err)?;
        }
        if limits.memory_limit.is_some() {
            group.set_memory_limit(limits.memory_limit).map_err(err)?;
        }
        for (k, v) in &self.spec.cgroup {
            group.set(k, v).map_err(err)?;
        }
        Ok(())
    }

    /// `mknod` `d` in the jail with the host's device numbers, owned by the jail's user.
    fn make_device(&self, d: Device) -> Result<()> {
        let host = Path::new(d.path());
        let meta = std::fs::metadata(host)
            .map_err(|e| usage(format!("{}: {e} (the VM needs it)", host.display())))?;
        let target = under(&self.root, host);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| setup(format!("creating {}: {e}", parent.display())))?;
        }
        let c = cstr(target.as_os_str())?;
        // SAFETY: `c` is a valid NUL-terminated path; mknod reads it and makes a node.
        let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, meta.rdev()) };
        if r != 0 {
            return Err(setup(format!("mknod {}: {}", target.display(), errno())));
        }
        std::os::unix::fs::chown(&target, Some(self.spec.uid), Some(self.spec.gid))
            .map_err(|e| setup(format!("chown {}: {e}", target.display())))
    }

    /// Run the program in the jail and wait for it; its exit status (128 + N if signal N ended
    /// it). With `daemonize`, this returns 0 in the first process once the program runs (its
    /// host PID printed on stdout), and the daemon waits and cleans up.
    pub fn run(self) -> Result<i32> {
        if !self.spec.daemonize {
            return self.supervise(&mut None);
        }
        let (read, write) = pipe()?;
        // SAFETY: kvmbox jail is single-threaded here; the child continues with its own copy.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(setup(format!("fork: {}", errno())));
        }
        if pid == 0 {
            drop(read);
            // The daemon: its own session, stdio on /dev/null.
            // SAFETY: setsid has no arguments; in a fresh child it cannot fail.
            unsafe { libc::setsid() };
            if let Ok(null) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                for fd in 0..3 {
                    // SAFETY: dup2 of an open descriptor onto 0-2.
                    unsafe { libc::dup2(null.as_raw_fd(), fd) };
                }
            }
            let mut notify = Some(std::fs::File::from(write));
            let status = match self.supervise(&mut notify) {
                Ok(s) => s,
                Err(e) => {
                    // Still there only if "pid N" was not sent.
                    if let Some(mut w) = notify.take() {
                        let _ = w.write_all(format!("error {e}").as_bytes());
                    }
                    1
                }
            };
            // Clean up before exiting (process::exit runs no destructors).
            drop(self);
            std::process::exit(status);
        }
        // The first process: the daemon's report is "pid N" or "error MESSAGE". The jail
        // belongs to the daemon now: this process must not remove it.
        drop(write);
        let mut report = String::new();
        let _ = std::fs::File::from(read).read_to_string(&mut report);
        std::mem::forget(self);
        if let Some(p) = report.strip_prefix("pid ") {
            println!("{p}");
            Ok(0)
        } else if let Some(e) = report.strip_prefix("error ") {
            Err(setup(e.to_string()))
        } else {
            Err(setup("the jail's daemon ended before the VM started"))
        }
    }

    /// Start the jailed program and wait for it, forwarding termination signals.
    fn supervise(&self, notify: &mut Option<std::fs::File>) -> Result<i32> {
        // SAFETY: a zeroed sigset_t is a valid argument to sigemptyset, which initialises it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` and `old` are valid sigset_t; the signal numbers are valid.
        unsafe {
            libc::sigemptyset(&mut set);
            for s in [
                libc::SIGTERM,
                libc::SIGINT,
                libc::SIGHUP,
                libc::SIGQUIT,
                libc::SIGCHLD,
            ] {
                libc::sigaddset(&mut set, s);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        }
        let (err_read, err_write) = pipe()?;
        // The child waits on this until it is in its cgroup.
        let (go_read, go_write) = pipe()?;
        // The next child is PID 1 of a new PID namespace.
        // SAFETY: unshare with a namespace flag; it affects only this process's later children.
        if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
            return Err(setup(format!("a new PID namespace: {}", errno())));
        }
        // SAFETY: single-threaded; the child only prepares and execs (or reports and exits).
        let child = unsafe { libc::fork() };
        if child < 0 {
            return Err(setup(format!("fork: {}", errno())));
        }
        if child == 0 {
            drop(err_read);
            drop(go_write);
            let mut byte = [0u8; 1];
            if std::fs::File::from(go_read).read_exact(&mut byte).is_err() {
                // The jailer ended or refused: nothing to do.
                // SAFETY: ends the child without running the parent's destructors.
                unsafe { libc::_exit(1) };
            }
            // The mask saved above, plus the stop signals: the program is PID 1 of its
            // namespace, where a signal it has no handler for is dropped. kvmbox blocks these
            // itself and takes them with sigwait; blocked from the start, one that comes before
            // kvmbox is ready stays pending until it is.
            let mut mask = old;
            // SAFETY: `mask` is an initialised sigset_t; the signal numbers are valid.
            unsafe {
                for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT] {
                    libc::sigaddset(&mut mask, s);
                }
                libc::pthread_sigmask(libc::SIG_SETMASK, &mask, std::ptr::null_mut());
            }
            let msg = match self.enter() {
                Ok(never) => match never {},
                Err(e) => e,
            };
            let mut w = std::fs::File::from(err_write);
            let _ = w.write_all(msg.as_bytes());
            // SAFETY: ends the child without running the parent's destructors (the jail).
            unsafe { libc::_exit(1) };
        }
        drop(err_write);
        drop(go_read);
        if let Some(g) = &self.cgroup {
            if let Err(e) = g.add_process(child as u32) {
                // SAFETY: ending and reaping our own child, which waits on the go pipe.
                unsafe {
                    libc::kill(child, libc::SIGKILL);
                    libc::waitpid(child, std::ptr::null_mut(), 0);
                }
                return Err(setup(format!("--cgroup: {e}")));
            }
        }
        if let Some(p) = &self.spec.pid_file {
            let tmp = p.with_extension("tmp");
            let written =
                std::fs::write(&tmp, format!("{child}\n")).and_then(|()| std::fs::rename(&tmp, p));
            if let Err(e) = written {
                // SAFETY: ending and reaping our own child, which waits on the go pipe.
                unsafe {
                    libc::kill(child, libc::SIGKILL);
                    libc::waitpid(child, std::ptr::null_mut(), 0);
                }
                return Err(setup(format!("writing the pid file {}: {e}", p.display())));
            }
        }
        let _ = std::fs::File::from(go_write).write_all(b"g");
        let mut msg = String::new();
        let _ = std::fs::File::from(err_read).read_to_string(&mut msg);
        if !msg.is_empty() {
            let mut st = 0;
            // SAFETY: reaping our own child.
            unsafe { libc::waitpid(child, &mut st, 0) };
            return Err(setup(msg));
        }
        if let Some(mut n) = notify.take() {
            // The first process reads to end-of-file: this closes our end.
            let _ = n.write_all(format!("pid {child}").as_bytes());
        }
        loop {
            // SAFETY: `set` is a valid, initialised sigset_t; no siginfo is asked for.
            let sig = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
            if sig == libc::SIGCHLD {
                let mut st = 0;
                // SAFETY: reaping our own child without blocking.
                let r = unsafe { libc::waitpid(child, &mut st, libc::WNOHANG) };
                if r == child {
                    return Ok(if libc::WIFEXITED(st) {
                        libc::WEXITSTATUS(st)
                    } else {
                        128 + libc::WTERMSIG(st)
                    });
                }
            } else if sig > 0 {
                // SAFETY: forwarding a signal to our own child.
                unsafe { libc::kill(child, sig) };
            }
        }
    }

    /// In the child: enter the jail and exec the program. Returns only on failure, with a
    /// message naming the step.
    fn enter(&self) -> std::result::Result<std::convert::Infallible, String> {
        let step = |what: &str| format!("jail: {what}: {}", errno());
        let check = |r: libc::c_int, what: &str| if r == 0 { Ok(()) } else { Err(step(what)) };
        let c = |p: &Path| cstr(p.as_os_str()).map_err(|e| e.to_string());
        if let Some(fd) = &self.netns {
            // SAFETY: `fd` is an open network-namespace file (checked when opened).
            let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            check(r, "entering --netns")?;
        }
        // SAFETY: unshare with a namespace flag, for this process only.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNS) };
        check(r, "a new mount namespace")?;
        let root = c(&self.root)?;
        let slash = c(Path::new("/"))?;
        // SAFETY: (this block's mount calls) every pointer is a valid NUL-terminated string or
        // null where mount(2) allows it; the mounts are in this process's own namespace.
        unsafe {
            check(
                libc::mount(
                    std::ptr::null(),
                    slash.as_ptr(),
                    std::ptr::null(),
                    libc::MS_PRIVATE | libc::MS_REC,
                    std::ptr::null(),
                ),
                "making mounts private",
            )?;
            check(
                libc::mount(
                    root.as_ptr(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ),
                "bind-mounting the jail's root",
            )?;
        }
        for b in &self.binds {
            let target = c(&under(
                &self.root,
                Path::new(OsStr::from_bytes(b.target.as_bytes())),
            ))?;
            // SAFETY: as above.
            unsafe {
                check(
                    libc::mount(
                        b.source.as_ptr(),
                        target.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ),
                    &format!("bind-mounting {}", b.source.to_string_lossy()),
                )?;
                if !b.writable {
                    check(
                        libc::mount(
                            std::ptr::null(),
                            target.as_ptr(),
                            std::ptr::null(),
                            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
                            std::ptr::null(),
                        ),
                        &format!("making {} read-only", b.source.to_string_lossy()),
                    )?;
                }
            }
        }
        let old_root = c(Path::new("old_root"))?;
        let old_root_abs = c(Path::new("/old_root"))?;
        // SAFETY: chdir/mkdir/pivot_root/umount2/rmdir with valid NUL-terminated paths.
        unsafe {
            check(libc::chdir(root.as_ptr()), "entering the jail's root")?;
            check(libc::mkdir(old_root.as_ptr(), 0o700), "mkdir old_root")?;
            check(
                libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), old_root.as_ptr())
                    as libc::c_int,
                "pivot_root",
            )?;
            check(libc::chdir(slash.as_ptr()), "chdir /")?;
            check(
                libc::umount2(old_root_abs.as_ptr(), libc::MNT_DETACH),
                "detaching the old root",
            )?;
            check(libc::rmdir(old_root_abs.as_ptr()), "rmdir /old_root")?;
        }
        if self.spec.proc {
            let proc = c(Path::new("/proc"))?;
            // SAFETY: mkdir and mount with valid NUL-terminated strings; a procfs of this
            // process's own (new) PID namespace, in its own mount namespace.
            unsafe {
                check(libc::mkdir(proc.as_ptr(), 0o555), "mkdir /proc")?;
                check(
                    libc::mount(
                        c"proc".as_ptr(),
                        proc.as_ptr(),
                        c"proc".as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                        c"subset=pid".as_ptr().cast(),
                    ),
                    "mounting /proc (subset=pid, Linux 5.8 or later)",
                )?;
            }
        }
        for l in &self.spec.rlimits {
            let r = libc::rlimit {
                rlim_cur: l.value,
                rlim_max: l.value,
            };
            // SAFETY: `r` is a valid rlimit for a known resource.
            let r = unsafe { libc::setrlimit(l.resource, &r) };
            check(r, "setting a resource limit")?;
        }
        let cwd = c(&self.cwd)?;
        // SAFETY: a valid NUL-terminated path.
        let r = unsafe { libc::chdir(cwd.as_ptr()) };
        check(r, "entering the working directory")?;
        // Capabilities: none in the bounding or ambient set, no way to gain privileges by exec.
        for cap in 0..64 {
            // SAFETY: PR_CAPBSET_DROP of a capability number; EINVAL past the last one.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
                break;
            }
        }
        // SAFETY: prctl with documented constant arguments.
        unsafe {
            check(
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_CLEAR_ALL,
                    0,
                    0,
                    0,
                ),
                "clearing ambient capabilities",
            )?;
            check(
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
                "setting no-new-privileges",
            )?;
        }
        let (uid, gid) = (self.spec.uid, self.spec.gid);
        // SAFETY: setgroups with an empty list; setresgid/setresuid with plain ids.
        unsafe {
            check(
                libc::setgroups(0, std::ptr::null()),
                "dropping supplementary groups",
            )?;
            check(libc::setresgid(gid, gid, gid), "switching to the gid")?;
            check(libc::setresuid(uid, uid, uid), "switching to the uid")?;
        }
        clear_capabilities().map_err(|e| format!("jail: clearing capabilities: {e}"))?;
        // The program ends with the jailer (set after the uid change, which clears it).
        // SAFETY: prctl with a signal number.
        let r = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
        check(r, "setting the parent-death signal")?;
        let exe = c(Path::new(JAILED_EXE))?;
        let mut argv: Vec<CString> = vec![c"kvmbox".to_owned()];
        for a in &self.spec.args {
            argv.push(cstr(a).map_err(|e| e.to_string())?);
        }
        let mut argp: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argp.push(std::ptr::null());
        let mut env: Vec<CString> = std::env::var_os("TERM")
            .and_then(|t| CString::new([b"TERM=", t.as_bytes()].concat()).ok())
            .into_iter()
            .collect();
        for (k, v) in &self.spec.env {
            let kv = [k.as_bytes(), b"=", v.as_bytes()].concat();
            env.push(cstr(OsStr::from_bytes(&kv)).map_err(|e| e.to_string())?);
        }
        let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
        envp.push(std::ptr::null());
        // SAFETY: `exe`, `argp` and `envp` are valid, NUL-terminated and null-terminated.
        unsafe { libc::execve(exe.as_ptr(), argp.as_ptr(), envp.as_ptr()) };
        Err(step(&format!("executing {JAILED_EXE}")))
    }
}

/// Zero the permitted, effective and inheritable capability sets.
fn clear_capabilities() -> std::io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut h = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let d = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads a version-3 header and two data records, both valid here.
    if unsafe { libc::syscall(libc::SYS_capset, &mut h, d.as_ptr()) } != 0 {
        return Err(errno());
    }
    Ok(())
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds: [RawFd; 2] = [-1; 2];
    // SAFETY: pipe2 fills two descriptors into a valid array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(setup(format!("pipe: {}", errno())));
    }
    // SAFETY: both descriptors were just opened and are owned here only.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Open `path` and check that it is a network namespace.
fn open_netns(path: &Path) -> Result<OwnedFd> {
    let f =
        std::fs::File::open(path).map_err(|e| usage(format!("--netns {}: {e}", path.display())))?;
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: NS_GET_NSTYPE takes no argument and returns the namespace type or -1.
    let t = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_NSTYPE) };
    if t != libc::CLONE_NEWNET {
        return Err(usage(format!(
            "--netns {}: not a network namespace (such as /var/run/netns/NAME from `ip netns add NAME`)",
            path.display()
        )));
    }
    Ok(f.into())
}

impl Drop for Jail {
    fn drop(&mut self) {
        for l in &self.made_links {
            let _ = std::fs::remove_file(l);
        }
        for (p, uid, gid) in &self.chowned {
            let _ = std::os::unix::fs::chown(p, Some(*uid), Some(*gid));
        }
        if let Some(g) = &self.cgroup {
            let _ = g.remove(kvmbox_cgroup::REMOVE_WAIT);
        }
        // remove_dir_all does not follow symlinks the jailed user may have made.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["a", "vm-1", "ABC-123", &"x".repeat(MAX_ID_LEN)] {
            assert!(check_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "../x",
            "a/b",
            "a b",
            ".",
            "é",
            &"x".repeat(MAX_ID_LEN + 1),
        ] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn jail_paths_stay_under_the_root() {
        let cwd = Path::new("/home/u/vm");
        assert_eq!(
            jail_path(cwd, Path::new("disk.img")),
            Path::new("/home/u/vm/disk.img")
        );
        assert_eq!(jail_path(cwd, Path::new("../k")), Path::new("/home/u/k"));
        assert_eq!(jail_path(cwd, Path::new("/a/./b/../c")), Path::new("/a/c"));
        assert_eq!(
            jail_path(cwd, Path::new("/../../etc/x")),
            Path::new("/etc/x")
        );
        assert_eq!(jail_path(cwd, Path::new("../../../../..")), Path::new("/"));
    }

    #[test]
    fn resource_limits_parse() {
        let l: Rlimit = "no-file=128".parse().unwrap();
        assert_eq!((l.resource, l.value), (libc::RLIMIT_NOFILE, 128));
        let l: Rlimit = "fsize=1048576".parse().unwrap();
        assert_eq!((l.resource, l.value), (libc::RLIMIT_FSIZE, 1 << 20));
        for bad in ["no-file", "nofile=1", "fsize=-1", "fsize=1M", "=5"] {
            assert!(bad.parse::<Rlimit>().is_err(), "{bad}");
        }
    }

    #[test]
    fn dynamic_executables_bring_their_interpreter_and_libraries() {
        // A dynamic executable of the host's (coreutils).
        let objects = shared_objects(Path::new("/bin/true")).unwrap();
        let (interp, at) = &objects[0];
        assert_eq!(interp.what, "the ELF interpreter");
        assert!(
            at.to_string_lossy().contains("ld-linux"),
            "{}",
            at.display()
        );
        assert!(interp.path.is_file(), "{}", interp.path.display());
        assert!(
            objects.iter().any(|(n, at)| n.what == "shared library"
                && at.to_string_lossy().ends_with("/libc.so.6")
                && n.path.is_file()),
            "{objects:?}"
        );
        // This test executable, like kvmbox, is static (.cargo/config.toml): nothing, so a
        // jail holds kvmbox alone.
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        assert_eq!(elf_interpreter(&exe).unwrap(), None);
        assert!(shared_objects(&exe).unwrap().is_empty());
    }
}
