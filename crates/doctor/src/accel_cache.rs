//! The `--accel auto` answer, kept for the rest of this boot of the host.
//!
//! [`crate::choose_accel`] creates a VM and times guest code (a few milliseconds, a large
//! share of a tiny guest's start). Its answer only changes when the host does, so
//! [`choose_accel_cached`] keeps it in a small file:
//! - where: `$XDG_RUNTIME_DIR/kvmbox/accel-probe` (a tmpfs emptied at every boot), else
//!   `$HOME/.cache/kvmbox/accel-probe`;
//! - keyed by a hash of: this file format, kvmbox's version, the host's boot ID
//!   (`/proc/sys/kernel/random/boot_id`), the kernel (`/proc/version`), and the identity of each
//!   loaded KVM module (its `/proc/modules` line, whose size and load address change when it is
//!   reloaded, its `srcversion` and its parameters' values). Any difference, or a file that does not parse, means probing again and
//!   rewriting the file (written to a temporary name, then renamed, so readers never see half
//!   of one);
//! - only answers that a completed timing probe gave are kept: "cannot open /dev/kvm" or "a
//!   capability is missing" are cheap to find again and may be fixed without a reboot;
//! - `KVMBOX_ACCEL_CACHE=off` skips the file (probe every time, write nothing). `kvmbox doctor`
//!   always probes for real.
//!
//! A stale or forged file can only pick between two accelerators the host offers: a wrong
//! `kvm` ends with the backend's error at VM creation, never with a crash.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use kvmbox_cpu::Accel;

use crate::AccelChoice;

/// Bumped when the file's meaning changes.
const FORMAT: &str = "kvmbox-accel-probe 1";
/// Environment variable that turns the cache off (`off` or `0`).
pub const CACHE_ENV: &str = "KVMBOX_ACCEL_CACHE";

/// One cache file and the key an entry in it must have to be believed.
#[derive(Debug, Clone)]
pub struct ProbeCache {
    path: PathBuf,
    key: String,
}

impl ProbeCache {
    /// The cache of this host and boot, or None when there is nowhere to keep it (no
    /// `$XDG_RUNTIME_DIR` or `$HOME`), no boot ID, or `KVMBOX_ACCEL_CACHE=off`.
    pub fn for_host() -> Option<Self> {
        if matches!(std::env::var(CACHE_ENV).as_deref(), Ok("off" | "0")) {
            return None;
        }
        let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
            Some(d) => PathBuf::from(d).join("kvmbox"),
            None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/kvmbox"),
        };
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        Some(Self::at(
            dir.join("accel-probe"),
            &host_identity(boot_id.trim()),
        ))
    }

    /// A cache at `path` whose entries must carry the hash of `identity`.
    pub fn at(path: PathBuf, identity: &str) -> Self {
        let mut h = std::hash::DefaultHasher::new();
        FORMAT.hash(&mut h);
        env!("CARGO_PKG_VERSION").hash(&mut h);
        identity.hash(&mut h);
        Self {
            path,
            key: format!("{:016x}", h.finish()),
        }
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The kept answer, if the file is there, parses and has this key.
    pub fn load(&self) -> Option<AccelChoice> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        let mut lines = text.lines();
        if lines.next()? != format!("key={}", self.key) {
            return None;
        }
        let accel = match lines.next()?.strip_prefix("accel=")? {
            "kvm" => Accel::Kvm,
            "emu" => Accel::Emu,
            _ => return None,
        };
        let reason = lines.next()?.strip_prefix("reason=")?.to_string();
        Some(AccelChoice {
            accel,
            reason: format!("{reason} (probed earlier in this boot; {CACHE_ENV}=off probes again)"),
        })
    }

    /// Keep `choice`. Best effort: a cache that cannot be written only costs the next start
    /// another probe.
    pub fn store(&self, choice: &AccelChoice) {
        let Some(dir) = self.path.parent() else {
            return;
        };
        if std::fs::create_dir_all(dir).is_err() {
            return;
        }
        let accel = match choice.accel {
            Accel::Kvm => "kvm",
            Accel::Emu => "emu",
        };
        let reason = choice.reason.replace('\n', " ");
        let text = format!("key={}\naccel={accel}\nreason={reason}\n", self.key);
        let tmp = self
            .path
            .with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, text).is_ok() && std::fs::rename(&tmp, &self.path).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

/// What must be unchanged for a kept answer to hold: the boot and kernel, and each loaded KVM
/// module: its /proc/modules line (size and load address, which a reload changes), its
/// `srcversion` and its parameters' values (all that some sandboxed kernels show).
fn host_identity(boot_id: &str) -> String {
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let mut id = format!("boot {boot_id}\n{}", read(Path::new("/proc/version")));
    let proc_modules = read(Path::new("/proc/modules"));
    let mut names: Vec<String> = std::fs::read_dir("/sys/module")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n == "kvm" || n.starts_with("kvm_"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    for name in names {
        id.push_str(&format!("module {name}\n"));
        if let Some(line) = proc_modules
            .lines()
            .find(|l| l.split(' ').next() == Some(name.as_str()))
        {
            id.push_str(line);
            id.push('\n');
        }
        let dir = Path::new("/sys/module").join(&name);
        id.push_str(read(&dir.join("srcversion")).trim());
        let mut params: Vec<_> = std::fs::read_dir(dir.join("parameters"))
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        params.sort();
        for p in params {
            let value = read(&p);
            id.push_str(&format!(
                "\n{}={}",
                p.file_name().unwrap_or_default().to_string_lossy(),
                value.trim()
            ));
        }
        id.push('\n');
    }
    id
}

/// [`crate::choose_accel`], answered from this boot's cache when it can be.
pub fn choose_accel_cached() -> AccelChoice {
    let Some(cache) = ProbeCache::for_host() else {
        return crate::choose_accel();
    };
    if let Some(choice) = cache.load() {
        return choice;
    }
    let (choice, probed) = crate::choose_accel_probed();
    if probed {
        cache.store(&choice);
    }
    choice
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("kvmbox-accel-cache-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn kept_answers_hold_only_for_the_same_identity() {
        let dir = temp_dir("identity");
        let path = dir.join("sub/accel-probe");
        let cache = ProbeCache::at(path.clone(), "boot A\nkvm 1 2\n");
        assert!(cache.load().is_none(), "nothing kept yet");
        cache.store(&AccelChoice {
            accel: Accel::Kvm,
            reason: "ring 0 at hardware speed\nsecond line".into(),
        });
        let got = cache.load().expect("kept");
        assert_eq!(got.accel, Accel::Kvm);
        assert!(got
            .reason
            .starts_with("ring 0 at hardware speed second line (probed earlier"));
        // Another boot, or a reloaded module: not believed.
        assert!(ProbeCache::at(path.clone(), "boot B\nkvm 1 2\n")
            .load()
            .is_none());
        assert!(ProbeCache::at(path.clone(), "boot A\nkvm 1 3\n")
            .load()
            .is_none());
        // The newer answer replaces the file.
        let other = ProbeCache::at(path.clone(), "boot B\n");
        other.store(&AccelChoice {
            accel: Accel::Emu,
            reason: "emulated".into(),
        });
        assert_eq!(other.load().unwrap().accel, Accel::Emu);
        assert!(cache.load().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn damaged_files_are_not_believed() {
        let dir = temp_dir("damaged");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("accel-probe");
        let cache = ProbeCache::at(path.clone(), "boot A");
        cache.store(&AccelChoice {
            accel: Accel::Emu,
            reason: "r".into(),
        });
        let good = std::fs::read_to_string(&path).unwrap();
        for bad in [
            String::new(),
            good.replace("accel=emu", "accel=tcg"),
            good.replace("reason=", "why="),
            good.lines().next().unwrap().to_string(),
            "\u{0}\u{ff}garbage".into(),
        ] {
            std::fs::write(&path, bad.as_bytes()).unwrap();
            assert!(cache.load().is_none(), "{bad:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn host_identity_names_the_boot_and_kvm_modules() {
        let id = host_identity("b00t");
        assert!(id.starts_with("boot b00t\n"));
        if Path::new("/sys/module/kvm").exists() {
            assert!(id.lines().any(|l| l == "module kvm"), "{id}");
        }
        assert_eq!(id, host_identity("b00t"), "stable while nothing changes");
    }
}
