//! kvmbox's control groups: one group per VM, in cgroup v2 or in the v1 per-controller
//! hierarchies, with the CPU quota, CPU weight and memory limit set in whichever files the
//! version has, and any controller file set by name ([`Cgroup::set`], as Firecracker's jailer's
//! `--cgroup cpu.shares=100`).
//!
//! Which version ([`Hierarchy::detect`]): cgroup v2 when the unified hierarchy is mounted and
//! its root lists every controller needed in `cgroup.controllers` (a controller bound to a v1
//! hierarchy is not listed there); otherwise v1 when every needed controller has a v1 mount;
//! otherwise an error naming the missing controller. Mounts come from `/proc/self/mountinfo`,
//! the process's own groups from `/proc/self/cgroup`.
//!
//! Where ([`Cgroup::create`]): under a parent the caller names (a path from the hierarchy's
//! root), `PARENT/NAME`; without one, under the process's own group, `OWN/kvmbox/NAME`, so that
//! whatever limits already confine the process keep confining the VM. On v2 every group from
//! the root down to the parent must hand the controllers down (`cgroup.subtree_control`);
//! kvmbox enables them where it can, and names the group where the kernel refuses (a v2 group
//! with processes of its own cannot hand controllers down, except the root).
//!
//! A group of the same name left by a run that crashed is removed and made again when no
//! process is in it ([`Cgroup::stale_removed`]); one with processes is an error.

use std::fs;
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

/// The folder made under the process's own group when no parent is given.
pub const DEFAULT_PARENT: &str = "kvmbox";

/// CFS period used when the caller gives none (the kernel's default, 100 ms).
pub const DEFAULT_PERIOD_US: u64 = 100_000;

/// Smallest CFS quota the kernel takes (1 ms).
pub const MIN_QUOTA_US: u64 = 1_000;

/// The default v2 CPU weight (`cpu.weight`), the v1 default `cpu.shares` 1024 maps to.
pub const DEFAULT_WEIGHT: u32 = 100;

/// How long [`Cgroup::remove`] waits for the group's last processes to leave.
pub const REMOVE_WAIT: Duration = Duration::from_secs(10);

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no cgroup hierarchy offers every controller needed ({needed}): {why}")]
    NoController { needed: String, why: String },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        source: io::Error,
    },
    #[error("cannot create cgroup {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot remove cgroup {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error(
        "cgroup {path} is in use by process {pid}; is another kvmbox running under that name?"
    )]
    InUse { path: PathBuf, pid: u32 },
    #[error("cannot enable the {controller} controller for the groups under {dir} (writing +{controller} to its cgroup.subtree_control: {source}); a cgroup v2 group with processes of its own cannot hand controllers down: give a parent group that does (one delegated to you, or one under the root)")]
    Enable {
        dir: PathBuf,
        controller: String,
        source: io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// The cgroup version in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    fn tag(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Version::V1 => "cgroup v1",
            Version::V2 => "cgroup v2",
        })
    }
}

/// One mounted hierarchy: its controllers (empty for v2), where it is mounted, and the
/// process's own group in it (a folder under the mount point).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Root {
    controllers: Vec<String>,
    mount: PathBuf,
    own: PathBuf,
}

/// The hierarchies to make groups in, for a set of controllers.
#[derive(Clone, Debug)]
pub struct Hierarchy {
    version: Version,
    /// v2: one root; v1: one per mount that holds a needed controller.
    roots: Vec<Root>,
    controllers: Vec<String>,
}

/// A mount line of `/proc/self/mountinfo` that matters here.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Mount {
    v2: bool,
    controllers: Vec<String>,
    /// The hierarchy's folder shown at the mount point (`/` unless bind-mounted or namespaced).
    root: String,
    point: PathBuf,
}

/// Undo mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup mounts in a `/proc/self/mountinfo` text.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 5 || r.is_empty() {
            continue;
        }
        let v2 = match r[0] {
            "cgroup2" => true,
            "cgroup" => false,
            _ => continue,
        };
        let controllers = if v2 {
            Vec::new()
        } else {
            r.get(2)
                .map(|opts| {
                    opts.split(',')
                        .filter(|o| !matches!(*o, "rw" | "ro") && !o.contains('='))
                        .filter(|o| {
                            !matches!(
                                *o,
                                "noprefix"
                                    | "xattr"
                                    | "clone_children"
                                    | "cpuset_v2_mode"
                                    | "none"
                                    | "all"
                                    | "favordynmods"
                            )
                        })
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
        };
        out.push(Mount {
            v2,
            controllers,
            root: unescape(l[3]),
            point: PathBuf::from(unescape(l[4])),
        });
    }
    out
}

/// The process's groups from a `/proc/self/cgroup` text: (controllers, path); v2's line has
/// no controllers.
fn parse_proc_cgroup(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|line| {
            let mut it = line.splitn(3, ':');
            let _id = it.next()?;
            let ctl = it.next()?;
            let path = it.next()?;
            let ctls = ctl
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect();
            Some((ctls, path.to_string()))
        })
        .collect()
}

/// `point` + the part of `path` under the mount's `root`.
fn own_dir(point: &Path, root: &str, path: &str) -> PathBuf {
    let rel = Path::new(path)
        .strip_prefix(root)
        .unwrap_or_else(|_| Path::new(""));
    let mut dir = point.to_path_buf();
    for c in rel.components() {
        if let Component::Normal(n) = c {
            dir.push(n);
        }
    }
    dir
}

/// Pick the version and the roots for `needed`, from the mount and membership tables and the
/// v2 root's `cgroup.controllers` (when v2 is mounted).
fn choose(
    mounts: &[Mount],
    own: &[(Vec<String>, String)],
    needed: &[String],
    v2_controllers: Option<&str>,
) -> Result<Hierarchy> {
    let mut v2_missing = None;
    if let (Some(m), Some(avail)) = (mounts.iter().find(|m| m.v2), v2_controllers) {
        let avail: Vec<&str> = avail.split_whitespace().collect();
        v2_missing = needed.iter().find(|c| !avail.contains(&c.as_str()));
        if v2_missing.is_none() {
            let path = own
                .iter()
                .find(|(c, _)| c.is_empty())
                .map_or("/", |(_, p)| p.as_str());
            return Ok(Hierarchy {
                version: Version::V2,
                roots: vec![Root {
                    controllers: Vec::new(),
                    mount: m.point.clone(),
                    own: own_dir(&m.point, &m.root, path),
                }],
                controllers: needed.to_vec(),
            });
        }
    }
    let mut roots: Vec<Root> = Vec::new();
    for c in needed {
        let Some(m) = mounts.iter().find(|m| !m.v2 && m.controllers.contains(c)) else {
            let v2 = match v2_missing {
                Some(c) => format!("cgroup v2 lacks {c}"),
                None => "cgroup v2 is not mounted".to_string(),
            };
            return Err(Error::NoController {
                needed: needed.join(", "),
                why: format!("{v2}, cgroup v1 lacks {c}"),
            });
        };
        if roots.iter().any(|r| r.mount == m.point) {
            continue;
        }
        let path = own
            .iter()
            .find(|(cs, _)| cs.contains(c))
            .map_or("/", |(_, p)| p.as_str());
        roots.push(Root {
            controllers: m.controllers.clone(),
            mount: m.point.clone(),
            own: own_dir(&m.point, &m.root, path),
        });
    }
    Ok(Hierarchy {
        version: Version::V1,
        roots,
        controllers: needed.to_vec(),
    })
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Write `value` to a control file in one `write`, as cgroupfs wants.
fn write(path: &Path, value: &str) -> Result<()> {
    let err = |source| Error::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    };
    let mut f = fs::OpenOptions::new().write(true).open(path).map_err(err)?;
    f.write_all(value.as_bytes()).map_err(err)
}

/// Check a controller name (`cpu`, `memory`, `cpuset` ...).
fn check_controller(c: &str) -> Result<()> {
    if c.is_empty() || !c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(Error::Invalid(format!(
            "{c:?} is not a cgroup controller name"
        )));
    }
    Ok(())
}

impl Hierarchy {
    /// Find where to make groups with `controllers` (see the crate docs for the rule).
    pub fn detect(controllers: &[&str]) -> Result<Self> {
        Self::detect_in(Path::new("/proc/self/cgroup"), controllers)
    }

    /// [`Hierarchy::detect`] as seen from process `pid`: its own groups are the ones
    /// [`Hierarchy::own_dir`] names (for instance to read a running VM's group files).
    pub fn detect_for(pid: u32, controllers: &[&str]) -> Result<Self> {
        Self::detect_in(Path::new(&format!("/proc/{pid}/cgroup")), controllers)
    }

    fn detect_in(proc_cgroup: &Path, controllers: &[&str]) -> Result<Self> {
        let needed = Self::needed(controllers)?;
        let mountinfo = read(Path::new("/proc/self/mountinfo"))?;
        let own = read(proc_cgroup)?;
        let mounts = parse_mountinfo(&mountinfo);
        let v2 = mounts
            .iter()
            .find(|m| m.v2)
            .and_then(|m| fs::read_to_string(m.point.join("cgroup.controllers")).ok());
        choose(&mounts, &parse_proc_cgroup(&own), &needed, v2.as_deref())
    }

    fn needed(controllers: &[&str]) -> Result<Vec<String>> {
        let mut needed: Vec<String> = Vec::new();
        for c in controllers {
            check_controller(c)?;
            if !needed.iter().any(|n| n == c) {
                needed.push(c.to_string());
            }
        }
        Ok(needed)
    }

    /// The version chosen.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The controllers this hierarchy was detected for.
    pub fn controllers(&self) -> &[String] {
        &self.controllers
    }

    /// The folder of the process's own group that holds `controller`'s files (the process
    /// [`Hierarchy::detect`] or [`Hierarchy::detect_for`] looked at).
    pub fn own_dir(&self, controller: &str) -> Option<&Path> {
        if !self.controllers.iter().any(|c| c == controller) {
            return None;
        }
        match self.version {
            Version::V2 => Some(self.roots[0].own.as_path()),
            Version::V1 => self
                .roots
                .iter()
                .find(|r| r.controllers.iter().any(|c| c == controller))
                .map(|r| r.own.as_path()),
        }
    }
}

/// A CFS bandwidth limit: `quota_us` of CPU time every `period_us` (both in microseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuMax {
    pub quota_us: u64,
    pub period_us: u64,
}

impl CpuMax {
    /// `cpus` host CPUs' worth of time (1.5: 150 ms every 100 ms), as docker's `--cpus`.
    pub fn from_cpus(cpus: f64) -> Result<Self> {
        if !cpus.is_finite() || cpus <= 0.0 {
            return Err(Error::Invalid(format!(
                "a CPU quota must be a positive number of CPUs, not {cpus}"
            )));
        }
        let quota = (cpus * DEFAULT_PERIOD_US as f64).round();
        if quota < MIN_QUOTA_US as f64 {
            return Err(Error::Invalid(format!(
                "a CPU quota of {cpus} CPUs is below the kernel's minimum of 0.01 CPUs (1 ms per 100 ms)"
            )));
        }
        if quota > 1e12 {
            return Err(Error::Invalid(format!(
                "a CPU quota of {cpus} CPUs is too large"
            )));
        }
        Ok(CpuMax {
            quota_us: quota as u64,
            period_us: DEFAULT_PERIOD_US,
        })
    }

    /// The limit in host CPUs.
    pub fn cpus(&self) -> f64 {
        self.quota_us as f64 / self.period_us as f64
    }
}

/// The v1 `cpu.shares` for a v2 `cpu.weight` (1-10000, default 100): proportional, so the
/// defaults match (100 -> 1024), clamped to the kernel's 2..262144.
pub fn weight_to_shares(weight: u32) -> u64 {
    (u64::from(weight) * 1024 / 100).clamp(2, 262_144)
}

/// Check a CPU weight: 1 to 10000 (cgroup v2's `cpu.weight` range).
pub fn check_weight(weight: u32) -> Result<()> {
    if !(1..=10_000).contains(&weight) {
        return Err(Error::Invalid(format!(
            "a CPU weight must be 1 to 10000 (default {DEFAULT_WEIGHT}), not {weight}"
        )));
    }
    Ok(())
}

/// Check a group name: one folder name.
fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 200
        || name.starts_with('.')
        || name.contains('/')
        || name.chars().any(char::is_control)
    {
        return Err(Error::Invalid(format!(
            "{name:?} cannot name a cgroup: one folder name, not starting with '.', up to 200 bytes"
        )));
    }
    Ok(())
}

/// Check a parent path: folders from the hierarchy's root, no `..`.
fn check_parent(parent: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in parent.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => {
                check_name(&n.to_string_lossy())?;
                out.push(n);
            }
            _ => {
                return Err(Error::Invalid(format!(
                    "cgroup parent {} must be a path from the hierarchy's root without '..'",
                    parent.display()
                )))
            }
        }
    }
    Ok(out)
}

/// One group, made in every hierarchy its controllers live in (one folder on v2).
#[derive(Debug)]
pub struct Cgroup {
    version: Version,
    controllers: Vec<String>,
    /// One folder per hierarchy, with the controllers each holds (v2: all).
    dirs: Vec<(Vec<String>, PathBuf)>,
    /// Also remove the parent folder when empty (the default `kvmbox` one).
    remove_parent: bool,
    stale_removed: bool,
}

impl Cgroup {
    /// Make the group `name` with the hierarchy's controllers: `PARENT/NAME` under each
    /// hierarchy's root, or `OWN/kvmbox/NAME` without a parent (see the crate docs).
    pub fn create(h: &Hierarchy, parent: Option<&Path>, name: &str) -> Result<Self> {
        check_name(name)?;
        let parent = parent.map(check_parent).transpose()?;
        let mut dirs = Vec::new();
        for r in &h.roots {
            let base = match &parent {
                Some(p) => r.mount.join(p),
                None => r.own.join(DEFAULT_PARENT),
            };
            let ctls = if h.version == Version::V2 {
                h.controllers.clone()
            } else {
                r.controllers.clone()
            };
            dirs.push((ctls, base.join(name)));
        }
        let mut cg = Cgroup {
            version: h.version,
            controllers: h.controllers.clone(),
            dirs,
            remove_parent: parent.is_none(),
            stale_removed: false,
        };
        for i in 0..cg.dirs.len() {
            let dir = cg.dirs[i].1.clone();
            let mount = h.roots[i].mount.clone();
            if let Err(e) = cg.make(&mount, &dir) {
                // Leave nothing behind: the folders made in the hierarchies before this one.
                for (_, d) in &cg.dirs[..i] {
                    let _ = fs::remove_dir(d);
                    if cg.remove_parent {
                        if let Some(p) = d.parent() {
                            let _ = fs::remove_dir(p);
                        }
                    }
                }
                return Err(e);
            }
        }
        Ok(cg)
    }

    /// Make `dir` and the folders above it under `mount`, handing the controllers down on v2
    /// and filling v1 cpuset's empty `cpus`/`mems` from the parent; a stale `dir` (no
    /// processes) is removed first.
    fn make(&mut self, mount: &Path, dir: &Path) -> Result<()> {
        if dir.exists() {
            if let Some(pid) = procs_in(dir)?.first() {
                return Err(Error::InUse {
                    path: dir.to_path_buf(),
                    pid: *pid,
                });
            }
            rmdir_waiting(dir, Duration::ZERO)?;
            self.stale_removed = true;
        }
        let rel = dir.strip_prefix(mount).unwrap_or(dir);
        // Another kvmbox may remove the shared parent (its `remove`) between our making or
        // finding it and making the group in it: then walk down again.
        let mut tries = 0;
        'walk: loop {
            let mut at = mount.to_path_buf();
            for c in rel.components() {
                if self.version == Version::V2 {
                    self.enable_below(&at)?;
                }
                at.push(c);
                match fs::create_dir(&at) {
                    Ok(()) => {
                        if self.version == Version::V1 {
                            fill_cpuset(&at)?;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists && at != dir => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound && tries < 10 => {
                        tries += 1;
                        continue 'walk;
                    }
                    Err(source) => {
                        return Err(Error::Create {
                            path: at.clone(),
                            source,
                        })
                    }
                }
            }
            return Ok(());
        }
    }

    /// v2: make `dir` hand this group's controllers down to its children.
    fn enable_below(&self, dir: &Path) -> Result<()> {
        let file = dir.join("cgroup.subtree_control");
        let on = read(&file)?;
        let on: Vec<&str> = on.split_whitespace().collect();
        for c in &self.controllers {
            if on.contains(&c.as_str()) {
                continue;
            }
            let mut f = fs::OpenOptions::new()
                .write(true)
                .open(&file)
                .map_err(|source| Error::Read {
                    path: file.clone(),
                    source,
                })?;
            f.write_all(format!("+{c}").as_bytes())
                .map_err(|source| Error::Enable {
                    dir: dir.to_path_buf(),
                    controller: c.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// The group process `pid` is in now, in the hierarchies of `controllers` (as
    /// [`Hierarchy::detect_for`] sees them), to read or set its files: nothing is made, and
    /// [`Cgroup::remove`] is the caller's to avoid.
    pub fn of_process(pid: u32, controllers: &[&str]) -> Result<Self> {
        let h = Hierarchy::detect_for(pid, controllers)?;
        let dirs = h
            .roots
            .iter()
            .map(|r| {
                let ctls = if h.version == Version::V2 {
                    h.controllers.clone()
                } else {
                    r.controllers.clone()
                };
                (ctls, r.own.clone())
            })
            .collect();
        Ok(Cgroup {
            version: h.version,
            controllers: h.controllers.clone(),
            dirs,
            remove_parent: false,
            stale_removed: false,
        })
    }

    /// The version the group lives in.
    pub fn version(&self) -> Version {
        self.version
    }

    /// True when a group of this name with no process in it (left by a run that crashed)
    /// was removed and made again.
    pub fn stale_removed(&self) -> bool {
        self.stale_removed
    }

    /// The group's folders: one on v2, one per hierarchy on v1.
    pub fn dirs(&self) -> Vec<&Path> {
        self.dirs.iter().map(|(_, d)| d.as_path()).collect()
    }

    /// The folder that holds `controller`'s files.
    pub fn dir_of(&self, controller: &str) -> Result<&Path> {
        self.dirs
            .iter()
            .find(|(cs, _)| cs.iter().any(|c| c == controller))
            .map(|(_, d)| d.as_path())
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "this cgroup has no {controller} controller (it has {})",
                    self.controllers.join(", ")
                ))
            })
    }

    /// The path of control file `key` (`cpu.shares`, `memory.max` ...): the controller is the
    /// part before the first dot, and must be one of the group's (`cgroup.*` files: v2 only).
    pub fn file(&self, key: &str) -> Result<PathBuf> {
        let bad = || {
            Error::Invalid(format!(
                "{key:?} is not a cgroup file name: CONTROLLER.FILE, such as cpu.shares or memory.max"
            ))
        };
        let (controller, rest) = key.split_once('.').ok_or_else(bad)?;
        if rest.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        {
            return Err(bad());
        }
        check_controller(controller)?;
        if controller == "cgroup" && self.version == Version::V2 {
            return Ok(self.dirs[0].1.join(key));
        }
        Ok(self.dir_of(controller)?.join(key))
    }

    /// Write `value` to control file `key` (see [`Cgroup::file`]), as Firecracker's jailer's
    /// `--cgroup KEY=VALUE`.
    pub fn set(&self, key: &str, value: &str) -> Result<()> {
        let path = self.file(key)?;
        if !path.exists() {
            return Err(Error::Invalid(format!(
                "{key} is not a file of this {} group ({} does not exist)",
                self.version,
                path.display()
            )));
        }
        write(&path, value)
    }

    /// Read control file `key` (see [`Cgroup::file`]), trimmed.
    pub fn get(&self, key: &str) -> Result<String> {
        Ok(read(&self.file(key)?)?.trim().to_string())
    }

    /// Set the CPU bandwidth limit (`None`: none): v2 `cpu.max`, v1 `cpu.cfs_period_us` and
    /// `cpu.cfs_quota_us`.
    pub fn set_cpu_max(&self, max: Option<CpuMax>) -> Result<()> {
        match self.version {
            Version::V2 => match max {
                Some(m) => self.set("cpu.max", &format!("{} {}", m.quota_us, m.period_us)),
                None => self.set("cpu.max", "max"),
            },
            Version::V1 => match max {
                Some(m) => {
                    // Lift the quota first: a period change must not meet an old quota that
                    // the new pair would refuse.
                    self.set("cpu.cfs_quota_us", "-1")?;
                    self.set("cpu.cfs_period_us", &m.period_us.to_string())?;
                    self.set("cpu.cfs_quota_us", &m.quota_us.to_string())
                }
                None => self.set("cpu.cfs_quota_us", "-1"),
            },
        }
    }

    /// Set the CPU weight (1-10000, see [`check_weight`]): v2 `cpu.weight`, v1 `cpu.shares`
    /// through [`weight_to_shares`].
    pub fn set_cpu_weight(&self, weight: u32) -> Result<()> {
        check_weight(weight)?;
        match self.version {
            Version::V2 => self.set("cpu.weight", &weight.to_string()),
            Version::V1 => self.set("cpu.shares", &weight_to_shares(weight).to_string()),
        }
    }

    /// Limit the memory of the group's processes to `bytes` (`None`: no limit), swap
    /// included: v2 `memory.max` with `memory.swap.max` 0 and `memory.oom.group` 1 (an OOM
    /// kill ends every process of the group); v1 `memory.limit_in_bytes` and
    /// `memory.memsw.limit_in_bytes` (where swap accounting exists) to the same value.
    pub fn set_memory_limit(&self, bytes: Option<u64>) -> Result<()> {
        match self.version {
            Version::V2 => {
                self.set(
                    "memory.max",
                    &bytes.map_or_else(|| "max".to_string(), |b| b.to_string()),
                )?;
                for (key, value) in [("memory.swap.max", "0"), ("memory.oom.group", "1")] {
                    if self.file(key)?.exists() {
                        self.set(key, value)?;
                    }
                }
                Ok(())
            }
            Version::V1 => {
                let value = bytes.map_or_else(|| "-1".to_string(), |b| b.to_string());
                let memsw = self.file("memory.memsw.limit_in_bytes")?;
                if !memsw.exists() {
                    return self.set("memory.limit_in_bytes", &value);
                }
                // memsw may never be below the memory limit: raise it first, lower it last.
                let now: u64 = self
                    .get("memory.limit_in_bytes")?
                    .parse()
                    .unwrap_or(u64::MAX);
                if bytes.is_none_or(|b| b > now) {
                    self.set("memory.memsw.limit_in_bytes", &value)?;
                    self.set("memory.limit_in_bytes", &value)
                } else {
                    self.set("memory.limit_in_bytes", &value)?;
                    self.set("memory.memsw.limit_in_bytes", &value)
                }
            }
        }
    }

    /// Move process `pid` (all its threads) into the group, in every hierarchy.
    pub fn add_process(&self, pid: u32) -> Result<()> {
        for (_, d) in &self.dirs {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// The processes in the group (its first folder's `cgroup.procs`).
    pub fn procs(&self) -> Result<Vec<u32>> {
        procs_in(&self.dirs[0].1)
    }

    /// The memory limit in force (`None`: none): v2 `memory.max`, v1
    /// `memory.limit_in_bytes` (the kernel's "no limit" is a huge number there).
    pub fn memory_limit(&self) -> Result<Option<u64>> {
        let key = match self.version {
            Version::V2 => "memory.max",
            Version::V1 => "memory.limit_in_bytes",
        };
        let v = self.get(key)?;
        // v1 reports no limit as LONG_MAX rounded down to a page.
        Ok(v.parse::<u64>().ok().filter(|&b| b < 1 << 62))
    }

    /// How many times the kernel's OOM killer killed a process of the group (v2
    /// `memory.events`, v1 `memory.oom_control`: `oom_kill N`).
    pub fn oom_kills(&self) -> Result<u64> {
        let key = match self.version {
            Version::V2 => "memory.events",
            Version::V1 => "memory.oom_control",
        };
        Ok(field(&self.get(key)?, "oom_kill").unwrap_or(0))
    }

    /// How many periods the group was throttled in for its CPU quota (`cpu.stat`
    /// `nr_throttled`).
    pub fn throttled_periods(&self) -> Result<u64> {
        Ok(field(&self.get("cpu.stat")?, "nr_throttled").unwrap_or(0))
    }

    /// Remove the group (and the default parent folder when nothing else is in it), waiting
    /// up to `wait` for the processes still in it to leave.
    pub fn remove(&self, wait: Duration) -> Result<()> {
        for (_, d) in &self.dirs {
            rmdir_waiting(d, wait)?;
            if self.remove_parent {
                if let Some(p) = d.parent() {
                    // Other kvmbox VMs' groups may be in it: then it stays.
                    let _ = fs::remove_dir(p);
                }
            }
        }
        Ok(())
    }

    /// The group as one string for another process ([`Cgroup::from_arg`]): the version, the
    /// controllers and the folders, one per line.
    pub fn to_arg(&self) -> String {
        let mut s = format!(
            "{}\n{}\n{}",
            self.version.tag(),
            self.controllers.join(","),
            u8::from(self.remove_parent)
        );
        for (cs, d) in &self.dirs {
            s.push_str(&format!("\n{}\n{}", cs.join(","), d.display()));
        }
        s
    }

    /// The group [`Cgroup::to_arg`] described (the folders must exist).
    pub fn from_arg(arg: &str) -> Result<Self> {
        let bad = || Error::Invalid("not a cgroup description from Cgroup::to_arg".into());
        let mut lines = arg.split('\n');
        let version = match lines.next() {
            Some("v1") => Version::V1,
            Some("v2") => Version::V2,
            _ => return Err(bad()),
        };
        let split = |s: &str| -> Vec<String> {
            s.split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect()
        };
        let controllers = split(lines.next().ok_or_else(bad)?);
        let remove_parent = lines.next().ok_or_else(bad)? == "1";
        let mut dirs = Vec::new();
        while let Some(cs) = lines.next() {
            let d = PathBuf::from(lines.next().ok_or_else(bad)?);
            if !d.is_absolute() {
                return Err(bad());
            }
            dirs.push((split(cs), d));
        }
        if dirs.is_empty() {
            return Err(bad());
        }
        Ok(Cgroup {
            version,
            controllers,
            dirs,
            remove_parent,
            stale_removed: false,
        })
    }
}

/// The number after `key` in a `key value` per line text.
fn field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

fn procs_in(dir: &Path) -> Result<Vec<u32>> {
    Ok(read(&dir.join("cgroup.procs"))?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

/// v1 cpuset: a new group has empty `cpus` and `mems` and takes no task until they are set;
/// give it its parent's.
fn fill_cpuset(dir: &Path) -> Result<()> {
    for key in ["cpuset.cpus", "cpuset.mems"] {
        let file = dir.join(key);
        if !file.exists() || !read(&file)?.trim().is_empty() {
            continue;
        }
        if let Some(parent) = dir.parent() {
            let v = read(&parent.join(key))?;
            write(&file, v.trim())?;
        }
    }
    Ok(())
}

/// Remove a group folder, retrying while processes are still leaving it (EBUSY), for up to
/// `wait`. A folder already gone is fine.
fn rmdir_waiting(dir: &Path, wait: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && start.elapsed() < wait => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(source) => {
                return Err(Error::Remove {
                    path: dir.to_path_buf(),
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests;
