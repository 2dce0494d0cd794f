//! The one place integration tests get guests, run `kvmbox`, capture the console and
//! enforce timeouts.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crate lives two levels below the repo root")
        .to_path_buf()
}

/// The kvmbox binary cargo built for these tests.
pub fn kvmbox() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kvmbox"))
}

/// Build (once per test process) and return the freestanding test guest.
pub fn testguest() -> PathBuf {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST
        .get_or_init(|| {
            let out = repo_root().join("target/guest");
            let status = Command::new("bash")
                .arg(repo_root().join("guest/testguest/build.sh"))
                .arg(&out)
                .status()
                .expect("run guest/testguest/build.sh");
            assert!(status.success(), "building the test guest failed");
            out.join("testguest.elf")
        })
        .clone()
}

/// True when /dev/kvm can be opened; otherwise prints one loud SKIP line for `test`.
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            let line = format!("SKIP: {test}: /dev/kvm unavailable ({e}); this test needs KVM");
            eprintln!("{line}");
            if let Ok(log) = std::env::var("KVMBOX_SKIP_LOG") {
                use std::io::Write;
                if let Ok(mut f) = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(log)
                {
                    let _ = writeln!(f, "{line}");
                }
            }
            false
        }
    }
}

/// What one kvmbox run produced.
#[derive(Debug)]
pub struct RunResult {
    /// Exit status (None when killed by a signal).
    pub status: Option<i32>,
    /// Everything the guest wrote to the serial console.
    pub stdout: String,
    /// kvmbox's own messages.
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
}

impl RunResult {
    /// `KVMBOX-TEST <scenario> k=v ...` lines, by scenario.
    pub fn results(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        let mut m = BTreeMap::new();
        for line in self.stdout.lines() {
            let line = line.trim_end_matches('\r');
            let Some(rest) = line.strip_prefix("KVMBOX-TEST ") else {
                continue;
            };
            let mut words = split_words(rest).into_iter();
            let Some(name) = words.next() else { continue };
            let kv = words
                .filter_map(|w| {
                    w.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                })
                .collect();
            m.insert(name, kv);
        }
        m
    }

    /// The value of `key` in scenario `scenario`'s line; panics with the whole console if absent.
    pub fn get(&self, scenario: &str, key: &str) -> String {
        self.results()
            .get(scenario)
            .and_then(|kv| kv.get(key).cloned())
            .unwrap_or_else(|| {
                panic!(
                    "no {key}= in the '{scenario}' line; console:\n{}\nstderr:\n{}",
                    self.stdout, self.stderr
                )
            })
    }

    /// Assert the guest finished all its scenarios and exited through the debug port with success.
    pub fn assert_guest_ok(&self) {
        assert_eq!(
            self.results()
                .get("done")
                .and_then(|d| d.get("result"))
                .map(String::as_str),
            Some("ok"),
            "guest did not report success; console:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        assert_eq!(
            self.status,
            Some(1),
            "debug-exit 0 must give status 1; stderr:\n{}",
            self.stderr
        );
    }
}

/// Split on spaces, keeping double-quoted values together.
fn split_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            _ => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Run kvmbox with `args`, stdin closed, killing it after `timeout`.
pub fn run_kvmbox(args: &[&str], timeout: Duration) -> RunResult {
    let start = Instant::now();
    let mut child = Command::new(kvmbox())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kvmbox");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let st = child.wait().expect("wait after kill");
            let stdout = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
            let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
            panic!("kvmbox {args:?} ran past {timeout:?} ({st}); console:\n{stdout}\nstderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    RunResult {
        status: status.code(),
        stdout: String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned(),
        stderr: String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned(),
        elapsed: start.elapsed(),
    }
}

/// Boot the test guest with `tests=<scenarios>` on `accel`.
pub fn run_testguest(
    accel: &str,
    cpus: u32,
    memory: &str,
    scenarios: &str,
    extra: &[&str],
) -> RunResult {
    let guest = testguest();
    let cmdline = format!("tests={scenarios}");
    let cpus = cpus.to_string();
    let mut args = vec![
        "run",
        "--accel",
        accel,
        "--kernel",
        guest.to_str().expect("utf-8 path"),
        "--cmdline",
        &cmdline,
        "--cpus",
        &cpus,
        "--memory",
        memory,
    ];
    args.extend_from_slice(extra);
    run_kvmbox(&args, Duration::from_secs(120))
}

/// Debian's cloud kernel bzImage, fetched (once, cached under ~/.cache/kvmbox) by the
/// project's own script.
pub fn debian_kernel() -> PathBuf {
    static KERNEL: OnceLock<PathBuf> = OnceLock::new();
    KERNEL
        .get_or_init(|| {
            let out = Command::new("bash")
                .arg(repo_root().join("guest/linux/fetch-kernel.sh"))
                .stderr(Stdio::inherit())
                .output()
                .expect("run guest/linux/fetch-kernel.sh");
            assert!(
                out.status.success(),
                "fetching Debian's cloud kernel failed"
            );
            let path = String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .unwrap_or("")
                .trim()
                .to_string();
            let p = PathBuf::from(path);
            assert!(
                p.is_file(),
                "fetch-kernel.sh printed {p:?}, which is not a file"
            );
            p
        })
        .clone()
}
