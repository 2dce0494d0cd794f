//! kvmbox's VM store: named VMs, each a folder under `$KVMBOX_HOME/vms/NAME` holding its
//! settings (`vm.toml`, the format of `kvmbox run --config`), its disks, its saved state and its
//! console log; and the runtime files of a running VM under `$KVMBOX_HOME/run/NAME` (the keeper's
//! lock and pid, the VM process's pid, the API and console sockets), which the keeper removes
//! when the VM ends and the next `start` or `delete` removes when the keeper itself died.
//!
//! Every command that changes a VM holds the VM's lock ([`Vm::lock`], an `flock` on
//! `vms/NAME/.lock`), so two commands on one VM never interleave: the second gets
//! [`Error::Busy`]. A running VM is a keeper process ([`keeper`]) holding `run/NAME/keeper.lock`
//! for its whole life and its child, the VM process (`kvmbox run` with the VM's settings and
//! an API socket). Whether a VM runs is therefore a lock probe, never a guess from a pid file.
//!
//! The crate knows no VM internals: it drives the VM process through the control API
//! ([`api`]), the same API any other client uses.

pub mod api;
mod clone;
pub mod console;
pub mod jail;
pub mod keep;
pub mod keeper;
mod lock;
pub mod net;
pub mod settings;
pub mod snapshots;
mod space;

pub use lock::VmLock;
pub use settings::{CreateOptions, DefaultGuest, LimitOptions, Modified, ModifyOptions};

use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// What went wrong, by kind: each kind has its own exit status in the CLI.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The user's input is wrong (a bad name, a bad size, a malformed settings file).
    #[error("{0}")]
    Usage(String),
    /// No VM of that name.
    #[error("no VM named '{0}' (kvmbox vm list shows the VMs)")]
    NotFound(String),
    /// A VM of that name exists already.
    #[error("a VM named '{0}' exists already")]
    Exists(String),
    /// Another kvmbox command holds the VM's lock, or another client its console.
    #[error("{0}")]
    Busy(String),
    /// The VM is in a state that does not allow the command.
    #[error("{0}")]
    State(String),
    /// The host or the VM failed.
    #[error("{0}")]
    Failed(String),
    /// A filesystem has too little free space for what the command would write (checked
    /// before anything is written).
    #[error("{0}")]
    NoSpace(String),
}

/// A result of this crate.
pub type Result<T> = std::result::Result<T, Error>;

fn io_err(what: impl std::fmt::Display, e: std::io::Error) -> Error {
    Error::Failed(format!("{what}: {e}"))
}

/// The longest VM name.
pub const MAX_NAME: usize = 64;

/// Check a VM name: 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit.
/// So a name is always one path component, never `.`, `..`, hidden, or an option.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "invalid VM name '{}': use 1 to {MAX_NAME} letters, digits, '.', '_' or '-', starting with a letter or digit",
            name.escape_default()
        )))
    }
}

/// The store: `$KVMBOX_HOME`, by default `$XDG_DATA_HOME/kvmbox` or `~/.local/share/kvmbox`.
#[derive(Debug, Clone)]
pub struct Store {
    home: PathBuf,
}

impl Store {
    /// The store named by the environment.
    pub fn from_env() -> Result<Self> {
        let home = match std::env::var_os("KVMBOX_HOME").filter(|v| !v.is_empty()) {
            Some(h) => PathBuf::from(h),
            None => match std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
                Some(d) => PathBuf::from(d).join("kvmbox"),
                None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
                    Some(h) => PathBuf::from(h).join(".local/share/kvmbox"),
                    None => {
                        return Err(Error::Usage(
                            "neither KVMBOX_HOME nor HOME is set: set KVMBOX_HOME to the folder for kvmbox's VMs".into(),
                        ))
                    }
                },
            },
        };
        Ok(Self::at(home))
    }

    /// The store at `home`.
    pub fn at(home: impl Into<PathBuf>) -> Self {
        Self { home: home.into() }
    }

    /// The store's folder.
    pub fn home(&self) -> &Path {
        &self.home
    }

    fn handle(&self, name: &str) -> Vm {
        Vm {
            name: name.to_string(),
            dir: self.home.join("vms").join(name),
            run_dir: self.home.join("run").join(name),
        }
    }

    /// The VM called `name`, which must exist.
    pub fn vm(&self, name: &str) -> Result<Vm> {
        check_name(name)?;
        let vm = self.handle(name);
        if !vm.settings_path().exists() {
            return Err(Error::NotFound(name.to_string()));
        }
        Ok(vm)
    }

    /// Create the VM `name` from `opts`: its folder, its new disks and its settings file.
    pub fn create(&self, name: &str, opts: &CreateOptions) -> Result<Vm> {
        self.create_with(name, |dir| settings::write_new(dir, opts))
    }

    /// Create the VM `name` whose folder `fill` fills. The folder appears complete or not at
    /// all: it is filled under a temporary name, then renamed.
    fn create_with(&self, name: &str, fill: impl FnOnce(&Path) -> Result<()>) -> Result<Vm> {
        check_name(name)?;
        let vms = self.home.join("vms");
        std::fs::create_dir_all(&vms)
            .map_err(|e| io_err(format_args!("creating {}", vms.display()), e))?;
        let vm = self.handle(name);
        if vm.dir.exists() {
            return Err(Error::Exists(name.to_string()));
        }
        // Dot names are never VM names (check_name), so this cannot collide with one.
        let tmp = vms.join(format!(".new-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp)
            .map_err(|e| io_err(format_args!("creating {}", tmp.display()), e))?;
        let built = fill(&tmp).and_then(|()| {
            // rename(2) of a directory onto an existing one fails unless that one is empty;
            // check again so a racing create of the same name loses cleanly.
            if vm.dir.exists() {
                return Err(Error::Exists(name.to_string()));
            }
            std::fs::rename(&tmp, &vm.dir)
                .map_err(|e| io_err(format_args!("creating {}", vm.dir.display()), e))
        });
        if let Err(e) = built {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        Ok(vm)
    }

    /// Every VM, by name.
    pub fn list(&self) -> Result<Vec<Vm>> {
        let vms = self.home.join("vms");
        let rd = match std::fs::read_dir(&vms) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(format_args!("reading {}", vms.display()), e)),
        };
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| check_name(n).is_ok())
            .collect();
        names.sort();
        Ok(names
            .iter()
            .map(|n| self.handle(n))
            .filter(|vm| vm.settings_path().exists())
            .collect())
    }
}

/// One VM of the store.
#[derive(Debug, Clone)]
pub struct Vm {
    name: String,
    dir: PathBuf,
    run_dir: PathBuf,
}

/// What a VM is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Not running; no saved state.
    Stopped,
    /// Not running; its saved state resumes on the next start.
    Saved,
    /// Its keeper runs and the guest runs.
    Running,
    /// Its keeper runs and the guest is paused.
    Paused,
    /// Its keeper runs but its API has not reported the guest running or paused: it is
    /// starting, or its API did not answer within [`api::STATE_TIMEOUT`].
    Starting,
    /// Its last run ended abnormally: the VM process was killed or failed, or the keeper died.
    Crashed,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            State::Stopped => "stopped",
            State::Saved => "saved",
            State::Running => "running",
            State::Paused => "paused",
            State::Starting => "starting",
            State::Crashed => "crashed",
        };
        f.write_str(s)
    }
}

/// How the last run of a VM ended, as its keeper recorded it in `last-run.json`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct LastRun {
    /// When it ended (seconds since the Unix epoch).
    pub ended_at: u64,
    /// The VM process's exit status (kvmbox run's: 0 power-off, 4 reset, 6 error, 8 stop signal).
    pub exit_status: Option<i32>,
    /// The signal that killed the VM process.
    pub signal: Option<i32>,
}

impl LastRun {
    /// Whether the VM ran before it ended: not refused at start (kvmbox's usage or error
    /// status) nor killed by a signal.
    pub fn ran(&self) -> bool {
        self.signal.is_none()
            && !matches!(
                self.exit_status,
                None | Some(kvmbox_vmm::EXIT_USAGE | kvmbox_vmm::EXIT_ERROR)
            )
    }

    /// Whether this end counts as a crash: killed by a signal, or kvmbox's error status.
    pub fn crashed(&self) -> bool {
        self.signal.is_some() || self.exit_status == Some(kvmbox_vmm::EXIT_ERROR)
    }

    /// One line for people.
    pub fn describe(&self) -> String {
        match (self.exit_status, self.signal) {
            (_, Some(sig)) => format!("the VM process was killed by signal {sig}"),
            (Some(0), _) => "the guest powered off".into(),
            (Some(4), _) => "the guest reset (on_reboot = exit)".into(),
            (Some(6), _) => "the VM failed (kvmbox error, status 6; see the log)".into(),
            (Some(8), _) => {
                "stopped by a signal to the VM process (vm stop --force or save)".into()
            }
            (Some(s), _) => format!("the VM process exited with status {s}"),
            (None, None) => "unknown".into(),
        }
    }
}

/// A VM's state and runtime facts at one moment.
#[derive(Debug, Clone)]
pub struct Status {
    /// The state.
    pub state: State,
    /// The VM process's pid, while it runs.
    pub pid: Option<u32>,
    /// When the VM process started (seconds since the Unix epoch), while it runs.
    pub started_at: Option<u64>,
    /// Why it is [`State::Crashed`], or how the last run ended.
    pub last_run: Option<LastRun>,
    /// Set when the keeper died and left its runtime files behind.
    pub stale_runtime: bool,
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Vm {
    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The VM's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// Its runtime folder.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }
    /// Its settings file.
    pub fn settings_path(&self) -> PathBuf {
        self.dir.join("vm.toml")
    }
    /// Its console log (the output of the current or last run).
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// The saved state: (state file, memory file).
    pub fn saved_state(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("saved/state"), self.dir.join("saved/mem"))
    }
    /// Whether a complete saved state is there.
    pub fn has_saved_state(&self) -> bool {
        let (s, m) = self.saved_state();
        s.is_file() && m.is_file()
    }
    /// How the last run ended, when recorded.
    pub fn last_run_path(&self) -> PathBuf {
        self.dir.join("last-run.json")
    }
    /// The API socket of the running VM.
    pub fn api_sock(&self) -> PathBuf {
        self.run_dir.join("api.sock")
    }
    /// The console socket of the running VM.
    pub fn console_sock(&self) -> PathBuf {
        self.run_dir.join("console.sock")
    }
    /// The lock the keeper holds for its whole life.
    pub fn keeper_lock_path(&self) -> PathBuf {
        self.run_dir.join("keeper.lock")
    }
    /// The VM process's pid file.
    pub fn vm_pid_path(&self) -> PathBuf {
        self.run_dir.join("vm.pid")
    }

    /// Take this VM's command lock, or fail with [`Error::Busy`] at once.
    pub fn lock(&self, command: &str) -> Result<VmLock> {
        VmLock::take(&self.dir.join(".lock"), &self.name, command)
    }

    /// Load and check the settings file (the same parser and checks as `kvmbox run --config`:
    /// an error names the file and the line).
    pub fn config(&self) -> Result<kvmbox_vmm::VmConfig> {
        let file = kvmbox_vmm::FileConfig::load(&self.settings_path())
            .map_err(|e| Error::Usage(e.to_string()))?;
        kvmbox_vmm::VmConfig::build(Some(file), kvmbox_vmm::Overrides::default())
            .map_err(|e| Error::Usage(format!("{}: {e}", self.settings_path().display())))
    }

    /// The `nets` specs as written in the settings file (their meaning is `kvmbox run --net`'s).
    pub fn net_specs(&self) -> Vec<String> {
        std::fs::read_to_string(self.settings_path())
            .ok()
            .and_then(|t| t.parse::<toml::Table>().ok())
            .and_then(|t| t.get("nets").cloned())
            .and_then(|n| n.try_into::<Vec<String>>().ok())
            .unwrap_or_default()
    }

    /// Whether a keeper holds this VM's runtime lock now.
    pub fn keeper_alive(&self) -> bool {
        lock::held_by_other(&self.keeper_lock_path())
    }

    fn last_run(&self) -> Option<LastRun> {
        let text = std::fs::read_to_string(self.last_run_path()).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// How the VM's last run ended, if it ended at or after `t` (the keeper records it as the
    /// VM process ends).
    pub fn last_run_since(&self, t: SystemTime) -> Option<LastRun> {
        let written = std::fs::metadata(self.last_run_path())
            .and_then(|m| m.modified())
            .ok()?;
        if written < t {
            return None;
        }
        self.last_run()
    }

    /// The VM process's pid, read from the runtime folder.
    pub fn vm_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.vm_pid_path())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The state now. A running VM is asked through its API whether it is paused.
    pub fn status(&self) -> Status {
        let last_run = self.last_run();
        if self.keeper_alive() {
            let started_at = std::fs::metadata(self.vm_pid_path())
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs());
            let state = match api::instance_state(&self.api_sock()).as_deref() {
                Ok("Running") => State::Running,
                Ok("Paused") => State::Paused,
                _ => State::Starting,
            };
            return Status {
                state,
                pid: self.vm_pid(),
                started_at,
                last_run,
                stale_runtime: false,
            };
        }
        let stale_runtime = self.run_dir.exists();
        let state = if self.has_saved_state() {
            State::Saved
        } else if stale_runtime || last_run.as_ref().is_some_and(LastRun::crashed) {
            State::Crashed
        } else {
            State::Stopped
        };
        Status {
            state,
            pid: None,
            started_at: None,
            last_run,
            stale_runtime,
        }
    }

    /// Remove the runtime folder a dead keeper left (call with the VM's lock held and no
    /// keeper alive).
    pub fn clean_stale_runtime(&self) -> Result<()> {
        match std::fs::remove_dir_all(&self.run_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(
                format_args!("removing {}", self.run_dir.display()),
                e,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_single_safe_path_components() {
        for ok in ["a", "web-1", "db_2.old", "X", &"n".repeat(MAX_NAME)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            ".hidden",
            "-opt",
            "_x",
            "a b",
            "a\0b",
            "\u{e9}",
            "a\nb",
            &"n".repeat(MAX_NAME + 1),
        ] {
            assert!(matches!(check_name(bad), Err(Error::Usage(_))), "{bad:?}");
        }
    }
}
