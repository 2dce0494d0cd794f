//! Resource limits of one VM: its CPU quota, CPU weight and memory limit (a control group
//! the whole kvmbox process runs in, through `kvmbox-cgroup`), and the host CPUs its vCPU
//! threads may run on (`sched_setaffinity`).
//!
//! The group is made before the machine is built (before any seccomp filter forbids it), by
//! [`VmCgroup::setup`]: kvmbox first starts a watcher (`kvmbox __cgroup-watch`, a child that
//! stays in kvmbox's original group), then moves itself into the new group. The watcher
//! waits for the end of a pipe only kvmbox holds; when kvmbox has gone, however it ended, it
//! waits for the group to empty (the exit child of `crate::exit` leaves it last), removes
//! it, and reports when the kernel's OOM killer ended kvmbox for going over its memory limit.

use crate::config::ConfigError;
use kvmbox_cgroup::{Cgroup, CpuMax, Hierarchy};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{ChildStdin, Command, Stdio};

/// What kvmbox itself needs beyond the guest's memory, at least: its code, heap, thread stacks
/// and KVM's own structures. Measured: 6-7 MiB beyond a 256 MiB test guest that touched all
/// its memory (cgroup v1 `memory.max_usage_in_bytes`); a `--memory-limit` under guest memory
/// plus this is refused at start.
pub const MIN_OVERHEAD: u64 = 16 << 20;

/// The hidden subcommand that runs [`watch`].
pub const WATCH_COMMAND: &str = "__cgroup-watch";

/// The limits a VM runs under (all off by default).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    /// CPU bandwidth, in host CPUs' worth of time (`--cpu-max`).
    pub cpu_max: Option<CpuMax>,
    /// CPU weight, 1-10000 (`--cpu-weight`).
    pub cpu_weight: Option<u32>,
    /// Memory of the whole kvmbox process, in bytes (`--memory-limit`).
    pub memory_limit: Option<u64>,
    /// Where the group goes (`--cgroup-parent`), from the hierarchy's root.
    pub cgroup_parent: Option<PathBuf>,
    /// Host CPUs per vCPU (`--cpu-affinity`).
    pub affinity: Affinity,
}

impl Limits {
    /// Check the limits against a VM of `cpus` vCPUs and `memory` bytes of guest memory.
    pub fn check(&self, cpus: u32, memory: u64) -> Result<(), ConfigError> {
        if let Some(l) = self.memory_limit {
            check_memory_limit(l, memory)?;
        }
        self.affinity.check(cpus)
    }

    /// The `kvmbox run` flags that give these limits (for a process that runs the VM again,
    /// as the store's keeper does for `--restore`).
    pub fn to_flags(&self) -> Vec<String> {
        let mut f = Vec::new();
        if let Some(c) = self.cpu_max {
            f.extend(["--cpu-max".to_string(), c.cpus().to_string()]);
        }
        if let Some(w) = self.cpu_weight {
            f.extend(["--cpu-weight".to_string(), w.to_string()]);
        }
        if let Some(b) = self.memory_limit {
            f.extend(["--memory-limit".to_string(), format!("{b}B")]);
        }
        if !self.affinity.is_empty() {
            f.extend(["--cpu-affinity".to_string(), self.affinity.to_string()]);
        }
        if let Some(p) = &self.cgroup_parent {
            f.extend(["--cgroup-parent".to_string(), p.display().to_string()]);
        }
        f
    }

    /// Whether a control group is needed.
    pub fn needs_cgroup(&self) -> bool {
        self.cpu_max.is_some() || self.cpu_weight.is_some() || self.memory_limit.is_some()
    }
}

/// Parse `--cpu-max`: host CPUs' worth of time, a decimal number (`0.5`, `2`).
pub fn parse_cpu_max(s: &str) -> Result<CpuMax, ConfigError> {
    let cpus: f64 = s.trim().parse().map_err(|_| {
        ConfigError::Invalid(format!(
            "invalid --cpu-max '{s}': expected a number of host CPUs such as 0.5 or 2"
        ))
    })?;
    check_cpu_max(cpus)
}

/// Check a CPU quota in host CPUs: at least 0.01, at most this host's CPUs.
pub fn check_cpu_max(cpus: f64) -> Result<CpuMax, ConfigError> {
    let host = host_cpus();
    if cpus > host as f64 {
        return Err(ConfigError::Invalid(format!(
            "--cpu-max {cpus} is more than this host's {host} CPUs"
        )));
    }
    CpuMax::from_cpus(cpus).map_err(|e| ConfigError::Invalid(format!("--cpu-max: {e}")))
}

/// Check a CPU weight.
pub fn check_cpu_weight(w: u32) -> Result<u32, ConfigError> {
    kvmbox_cgroup::check_weight(w)
        .map(|()| w)
        .map_err(|e| ConfigError::Invalid(format!("--cpu-weight: {e}")))
}

/// Refuse a memory limit the VM cannot live in: below its guest memory plus [`MIN_OVERHEAD`].
pub fn check_memory_limit(limit: u64, guest: u64) -> Result<(), ConfigError> {
    let need = guest.saturating_add(MIN_OVERHEAD);
    if limit < need {
        return Err(ConfigError::Invalid(format!(
            "--memory-limit {} is below the guest's memory ({}) plus kvmbox's minimum overhead ({}): give at least {}",
            kvmbox_arch::ByteSize(limit),
            kvmbox_arch::ByteSize(guest),
            kvmbox_arch::ByteSize(MIN_OVERHEAD),
            kvmbox_arch::ByteSize(need),
        )));
    }
    Ok(())
}

/// Online host CPUs.
fn host_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// The host CPUs this process may run on (its affinity mask).
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity writes at most size_of::<cpu_set_t>() bytes into `set`.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return (0..host_cpus()).collect();
    }
    // SAFETY: CPU_ISSET reads the set for an index below CPU_SETSIZE.
    (0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// A CPU list as the kernel writes one (`0-3,6`).
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    out.join(",")
}

/// Which host CPUs each vCPU thread may run on; empty: any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Affinity {
    /// For every vCPU not named in `vcpus`.
    pub all: Option<Vec<usize>>,
    /// Per vCPU.
    pub vcpus: Vec<(usize, Vec<usize>)>,
}

impl Affinity {
    /// Parse `--cpu-affinity`: entries separated by commas; `VCPU@[LIST]` (or `VCPU@CPU`) pins
    /// one vCPU, as Cloud Hypervisor's `0@[0-1],1@[2]`; a bare CPU, range or `[LIST]` adds
    /// to the host CPUs of every vCPU not named (so `0-1,3` pins every vCPU to 0, 1 and 3).
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let bad = |why: String| {
            ConfigError::Invalid(format!(
                "invalid --cpu-affinity '{spec}': {why} (expected a host CPU list such as 0-1,3 for every vCPU, and/or VCPU@[LIST] per vCPU such as 0@[0-1],1@[2])"
            ))
        };
        let mut entries = Vec::new();
        let (mut depth, mut start) = (0usize, 0usize);
        for (i, c) in spec.char_indices() {
            match c {
                '[' if depth == 0 => depth = 1,
                ']' if depth == 1 => depth = 0,
                '[' | ']' => return Err(bad("unbalanced brackets".into())),
                ',' if depth == 0 => {
                    entries.push(&spec[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        if depth != 0 {
            return Err(bad("unbalanced brackets".into()));
        }
        entries.push(&spec[start..]);
        let mut a = Affinity::default();
        for e in entries {
            let e = e.trim();
            let list = |s: &str| -> Result<Vec<usize>, ConfigError> {
                let inner = s.strip_prefix('[').and_then(|s| s.strip_suffix(']'));
                parse_cpu_list(inner.unwrap_or(s)).map_err(bad)
            };
            match e.split_once('@') {
                Some((v, l)) => {
                    let v: usize = v
                        .trim()
                        .parse()
                        .map_err(|_| bad(format!("'{v}' is not a vCPU number")))?;
                    if a.vcpus.iter().any(|(o, _)| *o == v) {
                        return Err(bad(format!("vCPU {v} is named twice")));
                    }
                    a.vcpus.push((v, list(l.trim())?));
                }
                None => {
                    let mut all = a.all.take().unwrap_or_default();
                    all.extend(list(e)?);
                    all.sort_unstable();
                    all.dedup();
                    a.all = Some(all);
                }
            }
        }
        a.vcpus.sort_unstable();
        Ok(a)
    }

    /// Check against the VM's vCPU count and the host CPUs this process may use.
    pub fn check(&self, vcpus: u32) -> Result<(), ConfigError> {
        let allowed = allowed_cpus();
        for (v, list) in &self.vcpus {
            if *v >= vcpus as usize {
                return Err(ConfigError::Invalid(format!(
                    "--cpu-affinity names vCPU {v}, but the VM has {vcpus} vCPU(s) (0-{})",
                    vcpus - 1
                )));
            }
            check_host_cpus(list, &allowed)?;
        }
        if let Some(list) = &self.all {
            check_host_cpus(list, &allowed)?;
        }
        Ok(())
    }

    /// The host CPUs of vCPU `id`, if it is pinned.
    pub fn of(&self, id: usize) -> Option<&[usize]> {
        self.vcpus
            .iter()
            .find(|(v, _)| *v == id)
            .map(|(_, l)| l.as_slice())
            .or(self.all.as_deref())
    }

    /// Whether any vCPU is pinned.
    pub fn is_empty(&self) -> bool {
        self.all.is_none() && self.vcpus.is_empty()
    }
}

impl std::fmt::Display for Affinity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some(all) = &self.all {
            parts.push(format!("[{}]", format_cpu_list(all)));
        }
        for (v, l) in &self.vcpus {
            parts.push(format!("{v}@[{}]", format_cpu_list(l)));
        }
        f.write_str(&parts.join(","))
    }
}

fn check_host_cpus(list: &[usize], allowed: &[usize]) -> Result<(), ConfigError> {
    if let Some(c) = list.iter().find(|c| !allowed.contains(c)) {
        return Err(ConfigError::Invalid(format!(
            "--cpu-affinity names host CPU {c}, but kvmbox may only run on host CPUs {}",
            format_cpu_list(allowed)
        )));
    }
    Ok(())
}

/// Parse a CPU list: `N`, `N-M`, separated by commas.
fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let max = libc::CPU_SETSIZE as usize - 1;
    let num = |t: &str| -> Result<usize, String> {
        let n: usize = t
            .trim()
            .parse()
            .map_err(|_| format!("'{t}' is not a host CPU number"))?;
        if n > max {
            return Err(format!("host CPU {n} is above {max}"));
        }
        Ok(n)
    };
    let mut out = Vec::new();
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("range {a}-{b} runs backwards"));
                }
                out.extend(a..=b);
            }
            None => out.push(num(part)?),
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Pin the calling thread to `cpus`.
pub fn pin_current_thread(cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: `c` is below CPU_SETSIZE (checked by parse_cpu_list).
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size given; 0 is the calling thread.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Set by `kvmbox run --cgroup-by-jail`: `kvmbox jail` made the process's group and set the
/// limits in it, so [`VmCgroup::setup`] makes none (a jailed process could not).
static PLACED_BY_JAIL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The limits of this process's configuration are in force already: its jail placed it in a
/// group with them (`kvmbox run --cgroup-by-jail`, which `kvmbox jail` adds).
pub fn set_placed_by_jail() {
    PLACED_BY_JAIL.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// The VM's control group and the pipe that keeps its watcher waiting.
pub(crate) struct VmCgroup {
    cg: Cgroup,
    /// Dropped only when the process ends: the watcher's signal.
    _watcher: ChildStdin,
}

impl VmCgroup {
    /// Make the group for `limits` (none when they need none), start its watcher and move
    /// this process (every thread) into it.
    pub(crate) fn setup(limits: &Limits) -> Result<Option<Self>, String> {
        if !limits.needs_cgroup() || PLACED_BY_JAIL.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(None);
        }
        let h = Hierarchy::detect(&["cpu", "memory"]).map_err(|e| e.to_string())?;
        let name = format!("pid-{}", std::process::id());
        let cg = Cgroup::create(&h, limits.cgroup_parent.as_deref(), &name)
            .map_err(|e| e.to_string())?;
        if cg.stale_removed() {
            eprintln!(
                "kvmbox: removed the empty cgroup {} that an earlier run left, and made it again",
                cg.dirs()[0].display()
            );
        }
        let set = || -> kvmbox_cgroup::Result<()> {
            if limits.cpu_max.is_some() {
                cg.set_cpu_max(limits.cpu_max)?;
            }
            if let Some(w) = limits.cpu_weight {
                cg.set_cpu_weight(w)?;
            }
            if limits.memory_limit.is_some() {
                cg.set_memory_limit(limits.memory_limit)?;
            }
            Ok(())
        };
        let fail = |e: String| {
            let _ = cg.remove(std::time::Duration::ZERO);
            e
        };
        set().map_err(|e| fail(e.to_string()))?;
        let mut child = Command::new("/proc/self/exe")
            .arg0("kvmbox")
            .arg(WATCH_COMMAND)
            .arg(cg.to_arg())
            .stdin(Stdio::piped())
            // Its one message goes to stderr; the console's stdout is not held open.
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| fail(format!("cannot start the cgroup watcher: {e}")))?;
        let watcher = child.stdin.take().ok_or_else(|| fail("no pipe".into()))?;
        // Its exit is never waited for: it outlives kvmbox.
        drop(child);
        cg.add_process(std::process::id())
            .map_err(|e| fail(e.to_string()))?;
        Ok(Some(VmCgroup {
            cg,
            _watcher: watcher,
        }))
    }

    /// Change the limits while the VM runs (`PATCH /machine-config`); `Some(None)` lifts one.
    pub(crate) fn change(
        &self,
        cpu_max: Option<Option<CpuMax>>,
        cpu_weight: Option<u32>,
        memory_limit: Option<Option<u64>>,
    ) -> Result<(), String> {
        let r = || -> kvmbox_cgroup::Result<()> {
            if let Some(m) = cpu_max {
                self.cg.set_cpu_max(m)?;
            }
            if let Some(w) = cpu_weight {
                self.cg.set_cpu_weight(w)?;
            }
            if let Some(m) = memory_limit {
                self.cg.set_memory_limit(m)?;
            }
            Ok(())
        };
        r().map_err(|e| e.to_string())
    }
}

/// `kvmbox __cgroup-watch GROUP`: wait until kvmbox has ended (end of file on stdin), then
/// remove its group; report when the OOM killer ended it. Returns the exit status (0; 1 when
/// the group could not be removed).
pub fn watch(group: &str) -> i32 {
    for sig in [libc::SIGINT, libc::SIGQUIT, libc::SIGHUP] {
        // SAFETY: ignoring a signal has no memory-safety preconditions; the watcher must
        // outlive a Ctrl-C or a closed terminal to clean up after kvmbox.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    let cg = match Cgroup::from_arg(group) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kvmbox: cgroup watcher: {e}");
            return 1;
        }
    };
    let mut buf = [0u8; 64];
    let mut stdin = std::io::stdin();
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    // Read before the group goes; the kill came before kvmbox's end.
    let oom = cg.oom_kills().unwrap_or(0);
    let limit = cg.memory_limit().ok().flatten();
    let memory_dir = cg.dir_of("memory").map(|d| d.display().to_string());
    let status = match cg.remove(kvmbox_cgroup::REMOVE_WAIT) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("kvmbox: {e}");
            1
        }
    };
    if oom > 0 {
        eprintln!(
            "kvmbox: the kernel's OOM killer ended kvmbox: the VM went over its memory limit of {} (--memory-limit; cgroup {}); kvmbox's exit status is that of SIGKILL (137 in a shell)",
            limit.map_or_else(|| "?".to_string(), |b| kvmbox_arch::ByteSize(b).to_string()),
            memory_dir.unwrap_or_default()
        );
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_syntax() {
        let a = Affinity::parse("0@[0-1],1@[2]").unwrap();
        assert_eq!(a.all, None);
        assert_eq!(a.vcpus, vec![(0, vec![0, 1]), (1, vec![2])]);
        assert_eq!(a.of(1), Some(&[2][..]));
        assert_eq!(a.of(2), None);
        let a = Affinity::parse("0-1,3").unwrap();
        assert_eq!(a.all, Some(vec![0, 1, 3]));
        assert_eq!(a.of(7), Some(&[0, 1, 3][..]));
        let a = Affinity::parse("[1],0@0").unwrap();
        assert_eq!(a.of(0), Some(&[0][..]));
        assert_eq!(a.of(1), Some(&[1][..]));
        assert_eq!(a.to_string(), "[1],0@[0]");
        assert_eq!(format_cpu_list(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        for bad in [
            "",
            "x",
            "0@",
            "0@[1",
            "0@]1[",
            "2-1",
            "a@[1]",
            "0@[1],0@[2]",
            "5000",
        ] {
            let e = Affinity::parse(bad).unwrap_err().to_string();
            assert!(e.contains("invalid --cpu-affinity"), "{bad}: {e}");
        }
    }

    #[test]
    fn affinity_is_checked_against_vcpus_and_host() {
        let a = Affinity::parse("3@[0]").unwrap();
        let e = a.check(2).unwrap_err().to_string();
        assert!(e.contains("names vCPU 3, but the VM has 2 vCPU(s)"), "{e}");
        let a = Affinity::parse("1023").unwrap();
        let e = a.check(1).unwrap_err().to_string();
        assert!(e.contains("names host CPU 1023"), "{e}");
        Affinity::parse("0").unwrap().check(4).unwrap();
    }

    #[test]
    fn limits_round_trip_through_their_flags() {
        let l = Limits {
            cpu_max: Some(CpuMax::from_cpus(1.5).unwrap()),
            cpu_weight: Some(300),
            memory_limit: Some(300 << 20),
            cgroup_parent: Some(PathBuf::from("vms/a")),
            affinity: Affinity::parse("0-1,1@[0]").unwrap(),
        };
        let flags = l.to_flags();
        let get = |name: &str| {
            flags
                .iter()
                .position(|f| f == name)
                .map(|i| flags[i + 1].clone())
        };
        let o = crate::Overrides {
            cpu_max: get("--cpu-max"),
            cpu_weight: get("--cpu-weight").map(|w| w.parse().unwrap()),
            memory_limit: get("--memory-limit"),
            cpu_affinity: get("--cpu-affinity"),
            cgroup_parent: get("--cgroup-parent").map(PathBuf::from),
            ..Default::default()
        };
        assert_eq!(Limits::from_flags(&o).unwrap(), l);
        assert!(Limits::default().to_flags().is_empty());
    }

    #[test]
    fn quota_weight_and_memory_limit_checks() {
        assert_eq!(parse_cpu_max("0.5").unwrap().quota_us, 50_000);
        for bad in ["", "x", "0", "-1", "100000"] {
            assert!(parse_cpu_max(bad).is_err(), "{bad}");
        }
        assert!(check_cpu_weight(0).is_err());
        assert_eq!(check_cpu_weight(300).unwrap(), 300);
        check_memory_limit(144 << 20, 128 << 20).unwrap();
        let e = check_memory_limit(143 << 20, 128 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("give at least 144 MiB"), "{e}");
    }
}
