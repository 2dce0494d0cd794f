//! The jail of a VM that `kvmbox vm start` runs as root: its keeper starts the VM process
//! through `kvmbox jail` (crate `kvmbox-jailer`), as an unprivileged user of its own, in a
//! chroot under `$KVMBOX_HOME/jails/kvmbox/<id>/root`.
//!
//! - **User**: each running jailed VM gets a uid (and a gid of the same number) of its own,
//!   the lowest free one from [`UID_BASE`] (1900000000; [`UID_SLOTS`] of them), above the
//!   ranges that Debian's `adduser` and systemd hand out (regular users up to 60000, dynamic
//!   users 61184-65519, container ranges up to 1879048191), so no account needs to be made and
//!   no two running VMs share a user. The keeper picks it under `jails/uids.lock` and records it
//!   in `run/NAME/jail.json` (which `vm show` reads).
//! - **Files**: the jail places the VM's settings file, kernel, initrd, disks and passt at
//!   their host paths (the jail chowns the disks to the VM's user while it runs and gives them
//!   back after). What the VM process writes through its API (saved state, live snapshots)
//!   goes to `run/NAME/share/` (bind-mounted at the same path in the jail) and is moved to
//!   its place in the VM's folder and given to root by the command that asked for it. A saved
//!   state is lent to the VM's user for the restore and given back after.
//! - **Sockets and pid**: the API socket is made in the jail, with `run/NAME/api.sock` a
//!   symlink to it; the console socket and console log stay the keeper's (outside); the jail
//!   writes the VM process's host PID to `run/NAME/vm.pid`.
//! - **Limits**: the settings' CPU quota, CPU weight and memory limit are set in the jail's
//!   cgroup (`kvmbox/jail-<id>` under the keeper's group), made by root; the VM cannot
//!   change them; `vm modify` of a running VM sets them there, as root.
//! - **TAP networks**: the keeper, as root, attaches a descriptor to each TAP device the VM
//!   uses (creating the device, not persistent, if there is none) and hands it to the VM
//!   process (`KVMBOX_TAP_FDS`, which `kvmbox jail` passes on), so the jailed process uses the
//!   TAP without CAP_NET_ADMIN and without the device's owner or persistence being changed;
//!   a device it created goes when the VM process (its last holder) ends.

use crate::{io_err, Error, Result, Vm};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The first uid (and gid) of jailed VMs.
pub const UID_BASE: u32 = 1_900_000_000;
/// How many uids from [`UID_BASE`] jailed VMs use.
pub const UID_SLOTS: u32 = 65_536;

/// The environment setting that turns jails off for every `vm start` (`KVMBOX_JAIL=off`).
pub const ENV: &str = "KVMBOX_JAIL";

/// A running VM's jail, as `run/NAME/jail.json` records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JailInfo {
    /// The jail's id (`kvmbox jail --id`).
    pub id: String,
    /// The VM process's user.
    pub uid: u32,
    /// Its group.
    pub gid: u32,
    /// The chroot (`$KVMBOX_HOME/jails/kvmbox/<id>/root`).
    pub root: PathBuf,
}

/// Whether `vm start` jails the VM: as root, unless `--no-jail` or `KVMBOX_JAIL=off`; an
/// error for a `KVMBOX_JAIL` value other than `on` or `off`.
pub fn wanted(no_jail: bool) -> Result<bool> {
    match std::env::var(ENV).as_deref() {
        Ok("off") => return Ok(false),
        Ok("on" | "") | Err(_) => {}
        Ok(other) => return Err(Error::Usage(format!("{ENV}={other}: expected on or off"))),
    }
    // SAFETY: geteuid has no arguments and cannot fail.
    Ok(!no_jail && unsafe { libc::geteuid() } == 0)
}

/// 32-bit FNV-1a, to tell names apart that map to one jail id.
fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

impl Vm {
    /// `$KVMBOX_HOME`.
    fn home(&self) -> &Path {
        self.run_dir
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("/"))
    }

    /// The jail id of this VM: its name with `.` and `_` as `-` (a jail id allows only
    /// letters, digits and `-`) and a hash of the name, so `a.b` and `a_b` differ.
    pub fn jail_id(&self) -> String {
        let clean: String = self
            .name
            .chars()
            .take(40)
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        format!("vm-{clean}-{:08x}", fnv1a(&self.name))
    }

    /// Where the store's jails are made (`kvmbox jail --chroot-base`): `$KVMBOX_HOME/jails`, on
    /// the disks' filesystem, so the jail hard-links them.
    pub fn jail_base(&self) -> PathBuf {
        self.home().join("jails")
    }

    /// This VM's jail folder (`<base>/kvmbox/<id>`, the chroot is its `root/`).
    pub fn jail_dir(&self) -> PathBuf {
        self.jail_base().join("kvmbox").join(self.jail_id())
    }

    /// The folder the jailed VM process writes API output in (`kvmbox jail --share`).
    pub fn jail_share_dir(&self) -> PathBuf {
        self.run_dir.join("share")
    }

    fn jail_info_path(&self) -> PathBuf {
        self.run_dir.join("jail.json")
    }

    /// The jail of the running VM (None when it runs unjailed or not at all).
    pub fn jail_info(&self) -> Option<JailInfo> {
        let text = std::fs::read_to_string(self.jail_info_path()).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Pick the lowest uid no other running jailed VM of the store has, and record it in
    /// `run/NAME/jail.json` (the keeper calls this with its runtime folder made).
    pub(crate) fn allocate_jail(&self) -> Result<JailInfo> {
        let runs = self.home().join("run");
        let base = self.jail_base();
        std::fs::create_dir_all(&base)
            .map_err(|e| io_err(format_args!("creating {}", base.display()), e))?;
        let lock_path = base.join("uids.lock");
        let _lock = crate::lock::lock_wait(&lock_path)?;
        let mut taken = Vec::new();
        for e in std::fs::read_dir(&runs).into_iter().flatten().flatten() {
            let p = e.path();
            if p == self.run_dir || !p.join("jail.json").is_file() {
                continue;
            }
            // A record of a keeper that died stays until its VM starts again: only live ones count.
            if !crate::lock::held_by_other(&p.join("keeper.lock")) {
                continue;
            }
            if let Some(i) = std::fs::read_to_string(p.join("jail.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<JailInfo>(&t).ok())
            {
                taken.push(i.uid);
            }
        }
        let uid = (UID_BASE..UID_BASE + UID_SLOTS)
            .find(|u| !taken.contains(u))
            .ok_or_else(|| {
                Error::Failed(format!(
                    "every jail user ({UID_BASE}-{}) is taken by a running VM",
                    UID_BASE + UID_SLOTS - 1
                ))
            })?;
        let info = JailInfo {
            id: self.jail_id(),
            uid,
            gid: uid,
            root: self.jail_dir().join("root"),
        };
        let text = serde_json::to_string(&info).unwrap_or_default();
        crate::keeper::write_atomic(&self.jail_info_path(), &text)?;
        Ok(info)
    }

    /// A descriptor attached to each TAP device of the VM (see the module's notes), by name,
    /// for the VM process to inherit.
    pub(crate) fn attach_taps(&self) -> Result<Vec<(String, std::fs::File)>> {
        let cfg = self.config()?;
        let mut taps = Vec::new();
        for n in &cfg.nets {
            let kvmbox_virtio::net::NetBackendConfig::Tap(name) = &n.backend else {
                continue;
            };
            let file = kvmbox_virtio::net::attach_tap_for_another_process(name).map_err(|e| {
                Error::Failed(format!(
                    "VM '{}': attaching its TAP network for the jail: {e}",
                    self.name
                ))
            })?;
            taps.push((name.clone(), file));
        }
        Ok(taps)
    }

    /// Remove the jail folder a keeper that died left (call with the VM's lock held and no
    /// keeper alive; the jail's mounts lived only in its process's namespace).
    pub fn clean_stale_jail(&self) -> Result<()> {
        if !self.jail_dir().exists() {
            return Ok(());
        }
        // The dead jail lent the disks and a saved state to its user and could not give them
        // back: they go back to this process's user (root, who started it).
        // SAFETY: geteuid/getegid have no arguments and cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let mut lent: Vec<PathBuf> = match self.config() {
            Ok(c) => c.disks.into_iter().map(|d| d.path).collect(),
            Err(_) => Vec::new(),
        };
        let (state, mem) = self.saved_state();
        lent.extend([state, mem]);
        let refs: Vec<&Path> = lent.iter().map(PathBuf::as_path).collect();
        chown_all(&refs, uid, gid)?;
        match std::fs::remove_dir_all(self.jail_dir()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(
                format_args!("removing {}", self.jail_dir().display()),
                e,
            )),
        }
    }

    /// Where the VM process is to write a file the store keeps at `dest`: in the jail's share
    /// folder when the VM runs jailed (the only folder it may write in), else `dest` itself.
    pub fn api_output_path(&self, dest: &Path) -> PathBuf {
        match (self.jail_info(), dest.file_name()) {
            (Some(_), Some(name)) => self.jail_share_dir().join(name),
            _ => dest.to_path_buf(),
        }
    }

    /// Move a file the VM process wrote at [`Self::api_output_path`]`(dest)` to `dest`, owned
    /// by this process's user (the jail's user wrote it).
    pub fn take_api_output(&self, dest: &Path) -> Result<()> {
        let written = self.api_output_path(dest);
        if written == dest {
            return Ok(());
        }
        std::fs::rename(&written, dest).map_err(|e| {
            io_err(
                format_args!("moving {} to {}", written.display(), dest.display()),
                e,
            )
        })?;
        // SAFETY: geteuid/getegid have no arguments and cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        std::os::unix::fs::chown(dest, Some(uid), Some(gid))
            .map_err(|e| io_err(format_args!("chown {}", dest.display()), e))
    }

    /// Refuse a saved state that names a disk the settings do not: the jail lends the saved
    /// state's disks to the VM's user, and the state file was written by the VM process.
    pub(crate) fn check_saved_disks(&self, state: &Path) -> Result<()> {
        let saved = kvmbox_vmm::snapshot::read_machine_state(state)
            .map_err(|e| Error::Failed(format!("{}: {e}", state.display())))?;
        let same = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let ours: Vec<PathBuf> = self.config()?.disks.iter().map(|d| same(&d.path)).collect();
        for d in &saved.config.disks {
            if !ours.contains(&same(&d.path)) {
                return Err(Error::Failed(format!(
                    "VM '{}': the saved state {} names the disk {}, which is not one of the VM's disks in {}: refused (a jailed VM's disks are lent to its user)",
                    self.name,
                    state.display(),
                    d.path.display(),
                    self.settings_path().display()
                )));
            }
        }
        Ok(())
    }
}

impl Vm {
    /// Set the limits `given` names (their values now in `vm.toml`) in the running jailed VM's
    /// cgroup, `kvmbox/jail-<id>`. A controller whose group the jail did not make (the VM was
    /// started without that kind of limit) is refused as the API refuses it for an unjailed VM.
    pub(crate) fn set_jail_limits(
        &self,
        jail: &JailInfo,
        given: &crate::LimitOptions,
    ) -> Result<()> {
        let limits = self.config()?.limits;
        let pid = self
            .vm_pid()
            .ok_or_else(|| Error::Failed(format!("VM '{}': no VM process pid", self.name)))?;
        let group = |controller: &str| -> Result<kvmbox_cgroup::Cgroup> {
            let cg = kvmbox_cgroup::Cgroup::of_process(pid, &[controller])
                .map_err(|e| Error::Failed(e.to_string()))?;
            let ours = cg.dir_of(controller).is_ok_and(|d| {
                d.file_name()
                    .is_some_and(|n| *n == *format!("jail-{}", jail.id))
            });
            if !ours {
                return Err(Error::State(format!(
                    "the VM runs without a cgroup for {controller} limits: give it a CPU quota, CPU weight or memory limit before it starts"
                )));
            }
            Ok(cg)
        };
        let failed = |e: kvmbox_cgroup::Error| Error::Failed(e.to_string());
        // Both groups found before anything is set: a refusal changes nothing.
        let cpu = (given.cpu_max.is_some() || given.cpu_weight.is_some())
            .then(|| group("cpu"))
            .transpose()?;
        let memory = given
            .memory_limit
            .is_some()
            .then(|| group("memory"))
            .transpose()?;
        if let Some(cg) = &cpu {
            if given.cpu_max.is_some() {
                cg.set_cpu_max(limits.cpu_max).map_err(failed)?;
            }
            if given.cpu_weight.is_some() {
                cg.set_cpu_weight(limits.cpu_weight.unwrap_or(kvmbox_cgroup::DEFAULT_WEIGHT))
                    .map_err(failed)?;
            }
        }
        if let Some(cg) = &memory {
            cg.set_memory_limit(limits.memory_limit).map_err(failed)?;
        }
        Ok(())
    }
}

/// Give `paths` (those that exist) to `uid`:`gid`.
pub(crate) fn chown_all(paths: &[&Path], uid: u32, gid: u32) -> Result<()> {
    for p in paths.iter().filter(|p| p.exists()) {
        std::os::unix::fs::chown(p, Some(uid), Some(gid))
            .map_err(|e| io_err(format_args!("chown {}", p.display()), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::Store;

    #[test]
    fn jail_ids_are_valid_and_tell_similar_names_apart() {
        let s = Store::at("/tmp/kvmbox-home");
        let a = s.handle("a.b").jail_id();
        let b = s.handle("a_b").jail_id();
        assert_ne!(a, b);
        for name in ["a.b", "a_b", &"x".repeat(64)] {
            let id = s.handle(name).jail_id();
            assert!(kvmbox_jailer::check_id(&id).is_ok(), "{id}");
        }
        assert_eq!(
            s.handle("web").jail_dir(),
            std::path::Path::new("/tmp/kvmbox-home/jails/kvmbox").join(s.handle("web").jail_id())
        );
    }
}
