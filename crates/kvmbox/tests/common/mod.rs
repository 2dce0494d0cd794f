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

/// The test guest's multiboot build (ELF32, entered at its multiboot entry), built beside it.
pub fn testguest_multiboot() -> PathBuf {
    testguest().with_file_name("testguest-multiboot.elf")
}

/// This test process's scratch folder `$TMPDIR/kvmbox-TAG-PID`, made on first use and removed
/// with everything in it when the process exits (tests of one binary run in parallel and
/// share it, so no single test may remove it).
#[allow(dead_code)]
pub fn scratch_dir(tag: &str) -> PathBuf {
    static DIRS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    extern "C" fn remove_all() {
        for d in DIRS.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    let dir = std::env::temp_dir().join(format!("kvmbox-{tag}-{}", std::process::id()));
    let mut dirs = DIRS.lock().unwrap_or_else(|e| e.into_inner());
    if !dirs.contains(&dir) {
        std::fs::create_dir_all(&dir).unwrap();
        if dirs.is_empty() {
            // SAFETY: registers a plain function with no arguments; it runs once, at exit.
            assert_eq!(unsafe { libc::atexit(remove_all) }, 0);
        }
        dirs.push(dir.clone());
    }
    dir
}

/// Is passt (the `--net user` backend) installed? Otherwise one `SKIP:` line and false.
#[allow(dead_code)]
pub fn passt_or_skip(test: &str) -> bool {
    if Command::new("passt").arg("--version").output().is_err() {
        skip(
            test,
            "passt is not installed (scripts/setup.sh installs it): --net user needs it",
        );
        return false;
    }
    true
}

/// True when /dev/kvm can be opened; otherwise prints one loud SKIP line for `test`.
pub fn kvm_or_skip(test: &str) -> bool {
    kvmbox_cpu::kvm::available_or_skip(test)
}

/// The /proc/PID/task directories of `pid`'s threads. One listing of /proc/PID/task stops
/// early when the thread it has reached ends during the listing (the kernel walks on from that
/// thread), so it can miss live threads: this lists until two listings in a row agree.
pub fn task_dirs(pid: u32) -> Vec<PathBuf> {
    let list = || -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        v.sort();
        v
    };
    let mut last = list();
    loop {
        let next = list();
        if next == last {
            return next;
        }
        last = next;
    }
}

/// The cgroup hierarchy with cpu and memory where this host lets the tests make groups (as
/// root); otherwise one SKIP line for `test` and None.
pub fn cgroups_or_skip(test: &str) -> Option<kvmbox_cgroup::Hierarchy> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip(test, "making cgroups needs root");
        return None;
    }
    kvmbox_cgroup::Hierarchy::detect(&["cpu", "memory"])
        .map_err(|e| skip(test, &e.to_string()))
        .ok()
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

    /// The `s3` scenario's result: suspended with `_S3_`'s SLP_TYP, resumed, exit status 1 (the
    /// resume code's debug-exit 0).
    pub fn check_s3(&self) {
        assert!(
            self.stdout
                .contains("KVMBOX-TEST s3 pm1a_cnt=0x604 slp_typ=1 waking_vector=0x7000"),
            "console:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        assert_eq!(self.get("s3", "resumed"), "yes");
        assert_eq!(self.get("done", "result"), "ok");
        assert_eq!(self.status, Some(1), "stderr:\n{}", self.stderr);
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

/// A claim on the host CPU for one guest run: an `flock` on a file in cargo's target
/// directory, so the claim holds across the threads of one test binary and across test
/// processes of the same checkout, and ends when the holder drops it or dies.
///
/// A Linux guest on the software engine keeps both cores of a 2-core host busy for 25 s or
/// more (one engine thread per busy vCPU), and the clock tests compare guest and host time:
/// such runs take the CPU [`CpuLease::exclusive`]ly and so run one at a time. Short guest runs
/// (the test guest, ~1 s; kvmbox's error paths) take it [`CpuLease::shared`]: many at once,
/// but never beside an exclusive holder. Timeouts start once the lease is held. A test that
/// holds an exclusive lease must not call [`run_kvmbox`] or [`Interactive::testguest`] (their
/// shared lease would wait for it forever: flock locks of one process conflict too).
pub struct CpuLease {
    _file: std::fs::File,
}

impl CpuLease {
    fn take(kind: libc::c_int) -> Self {
        use std::os::fd::AsRawFd;
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kvmbox-guest-cpu.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot open the CPU lease file {path:?}: {e}"));
        loop {
            // SAFETY: flock on a descriptor this function owns; no memory is involved.
            if unsafe { libc::flock(file.as_raw_fd(), kind) } == 0 {
                return Self { _file: file };
            }
            let e = std::io::Error::last_os_error();
            assert_eq!(
                e.kind(),
                std::io::ErrorKind::Interrupted,
                "flock {path:?}: {e}"
            );
        }
    }

    /// The whole CPU: waits for every other lease holder to finish.
    pub fn exclusive() -> Self {
        Self::take(libc::LOCK_EX)
    }

    /// A share of the CPU beside other short runs; waits while an exclusive holder runs.
    pub fn shared() -> Self {
        Self::take(libc::LOCK_SH)
    }
}

/// Run kvmbox with `args`, stdin closed, killing it after `timeout` (a short guest run: it
/// holds a shared [`CpuLease`] while it runs).
pub fn run_kvmbox(args: &[&str], timeout: Duration) -> RunResult {
    run_kvmbox_env(args, &[], timeout)
}

/// [`run_kvmbox`] with `env` added to its environment.
pub fn run_kvmbox_env(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> RunResult {
    let _lease = CpuLease::shared();
    let start = Instant::now();
    let mut child = Command::new(kvmbox())
        .args(args)
        .envs(env.iter().copied())
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

/// Longest one test-guest run may take. Measured on this 2-core host with
/// `tests=hello,cpuid,acpi,smp,mem,pio:100,mmio:100,compute:200000`, 4 vCPUs, 128 MiB, at load
/// average 53 (other developers' builds and a Linux guest test): 168 s on the engine, 33 s on
/// KVM (2026-12-02). Twice the worst.
pub const TESTGUEST_TIMEOUT: Duration = Duration::from_secs(360);

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
    run_kvmbox(&args, TESTGUEST_TIMEOUT)
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

/// A kvmbox run the test types into: stdin piped, the console collected as it arrives, read
/// like `expect`. The process is killed (by its own handle) when this is dropped.
pub struct Interactive {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    out: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    err: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    cursor: usize,
    args: Vec<String>,
    /// Held for as long as the guest runs (test-guest runs; Linux tests hold their own).
    lease: Option<CpuLease>,
}

impl Interactive {
    /// Start kvmbox with `args`.
    pub fn spawn(args: &[&str]) -> Self {
        let mut cmd = Command::new(kvmbox());
        cmd.args(args);
        Self::spawn_with(cmd)
    }

    /// Start `cmd` (kvmbox, possibly wrapped, e.g. by `ip netns exec`, which execs it).
    pub fn spawn_with(mut cmd: Command) -> Self {
        use std::sync::{Arc, Mutex};
        let args: Vec<String> = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kvmbox");
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        fn collect(mut r: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = r.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    into.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend_from_slice(&buf[..n]);
                }
            });
        }
        collect(child.stdout.take().expect("stdout"), out.clone());
        collect(child.stderr.take().expect("stderr"), err.clone());
        Self {
            stdin: child.stdin.take(),
            child,
            out,
            err,
            cursor: 0,
            args,
            lease: None,
        }
    }

    /// Start the test guest with `tests=<scenarios>` on KVM.
    pub fn testguest(cpus: u32, memory: &str, scenarios: &str, extra: &[&str]) -> Self {
        let guest = testguest();
        let cmdline = format!("tests={scenarios}");
        let cpus = cpus.to_string();
        let mut args = vec![
            "run",
            "--accel",
            "kvm",
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
        let lease = CpuLease::shared();
        let mut vm = Self::spawn(&args);
        vm.lease = Some(lease);
        vm
    }

    /// The kvmbox process's PID.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Everything the guest has written to the console so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// kvmbox's own messages so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "kvmbox {:?}: {what}; console:\n{}\nstderr:\n{}",
            self.args,
            self.console(),
            self.stderr()
        )
    }

    /// Wait for `needle` in the console after the previous match; returns the text from the
    /// previous match up to and including `needle`. Panics with the console after `timeout`.
    pub fn expect(&mut self, needle: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            let found = {
                let out = self.out.lock().unwrap_or_else(|e| e.into_inner());
                out.get(self.cursor..)
                    .and_then(|rest| {
                        rest.windows(needle.len())
                            .position(|w| w == needle.as_bytes())
                    })
                    .map(|p| {
                        let end = self.cursor + p + needle.len();
                        let text = String::from_utf8_lossy(&out[self.cursor..end]).into_owned();
                        (end, text)
                    })
            };
            if let Some((end, text)) = found {
                self.cursor = end;
                return text;
            }
            if start.elapsed() > timeout {
                self.fail(&format!("no {needle:?} within {timeout:?}"));
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                // Let the reader threads catch up before giving up.
                std::thread::sleep(Duration::from_millis(100));
                let out = self.out.lock().unwrap_or_else(|e| e.into_inner());
                let seen = out
                    .get(self.cursor..)
                    .is_some_and(|r| r.windows(needle.len()).any(|w| w == needle.as_bytes()));
                drop(out);
                if !seen {
                    self.fail(&format!("exited ({st}) before printing {needle:?}"));
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// How many times `needle` occurs in the whole console so far.
    pub fn count(&self, needle: &str) -> usize {
        self.console().matches(needle).count()
    }

    /// Type `bytes` on kvmbox's stdin.
    pub fn send(&mut self, bytes: &[u8]) {
        use std::io::Write;
        let Some(stdin) = self.stdin.as_mut() else {
            self.fail("stdin already closed")
        };
        if let Err(e) = stdin.write_all(bytes).and_then(|()| stdin.flush()) {
            self.fail(&format!("writing to stdin: {e}"));
        }
    }

    /// Wait for kvmbox to exit; its status (None if killed by a signal). Panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => return st.code(),
                Ok(None) if start.elapsed() > timeout => {
                    self.fail(&format!("still running after {timeout:?}"))
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => self.fail(&format!("wait: {e}")),
            }
        }
    }

    /// Kill this kvmbox (by its own process handle) and reap it; true if it was still running.
    pub fn kill(&mut self) -> bool {
        let running = matches!(self.child.try_wait(), Ok(None));
        let _ = self.child.kill();
        let _ = self.child.wait();
        running
    }
}

impl Drop for Interactive {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Prints one loud `SKIP: <test>: <why>` line (also appended to `$KVMBOX_SKIP_LOG`), the same
/// way [`kvm_or_skip`] reports a missing /dev/kvm.
/// FNV-1a 64 of `data`, as the test guest prints its `checksum=`.
pub fn fnv1a(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("0x{h:x}")
}

pub fn skip(test: &str, why: &str) {
    kvmbox_cpu::kvm::report_skip(test, why);
}

/// The default Linux guest kit: Debian's cloud kernel and the busybox initramfs
/// (guest/linux/build-initramfs.sh, cached under ~/.cache/kvmbox).
pub fn linux_kit() -> (PathBuf, PathBuf) {
    static INITRD: OnceLock<PathBuf> = OnceLock::new();
    let initrd = INITRD
        .get_or_init(|| {
            let out = Command::new("bash")
                .arg(repo_root().join("guest/linux/build-initramfs.sh"))
                .stderr(Stdio::inherit())
                .output()
                .expect("run guest/linux/build-initramfs.sh");
            assert!(out.status.success(), "building the initramfs failed");
            let p = PathBuf::from(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .last()
                    .unwrap_or("")
                    .trim(),
            );
            assert!(
                p.is_file(),
                "build-initramfs.sh printed {p:?}, which is not a file"
            );
            p
        })
        .clone();
    (debian_kernel(), initrd)
}

/// `text` as the kit's `kvmbox.cmd=` value: `%XX` for bytes the kernel command line cannot carry.
/// The command line every Linux test boots with (before its own `kvmbox.*` words): the serial
/// console, reboot and panic ending kvmbox, and no crypto self-tests — on the software engine
/// they are more than half of the boot's CPU time (Debian 6.1: 78.8 s of user time against
/// 34.2 s without them). One boot keeps them (`cryptomgr.notests=0`, the later word wins) and
/// checks that every one passed: linux_emu's `boots_to_userspace_with_1_and_2_cpus_and_powers_off`.
#[allow(dead_code)]
pub const LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 cryptomgr.notests";

pub fn kit_cmd(text: &str) -> String {
    let mut out = String::from("kvmbox.cmd=");
    for b in text.bytes() {
        match b {
            b' ' | b'%' | b'"' | b'\n' | b'\t' | b'\\' => out.push_str(&format!("%{b:02X}")),
            _ => out.push(b as char),
        }
    }
    out
}

/// Talking to `kvmbox run --api-sock` as a Firecracker client does: plain HTTP/1.1 over the
/// Unix socket, one exchange per connection.
#[allow(dead_code)]
pub mod api {
    use super::Interactive;
    use serde_json::Value;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    /// Longest the API socket may take to appear (measured: a few ms).
    pub const API_READY: Duration = Duration::from_secs(10);

    pub fn sock_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join("kvmbox-lifecycle-tests");
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    /// One HTTP exchange on a fresh connection: (status, JSON body or Null).
    pub fn http(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let raw = match body {
            Some(b) => format!(
                "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
                b.len()
            ),
            None => format!(
                "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
            ),
        };
        exchange(sock, raw.as_bytes())
    }

    pub fn exchange(sock: &Path, raw: &[u8]) -> (u16, Value) {
        let mut s = UnixStream::connect(sock).expect("connect to the API socket");
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        s.write_all(raw).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).expect("read the answer");
        let text = String::from_utf8_lossy(&out).into_owned();
        let status: u16 = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {text:?}"));
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let v = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(body).unwrap_or_else(|e| panic!("body {body:?}: {e}"))
        };
        (status, v)
    }

    pub fn ok(sock: &Path, method: &str, path: &str, body: &str) {
        let (st, v) = http(sock, method, path, Some(body));
        assert_eq!(st, 204, "{method} {path} {body}: {v}");
    }

    /// Expect a 400 whose fault_message contains `needle`.
    pub fn refused(sock: &Path, method: &str, path: &str, body: Option<&str>, needle: &str) {
        let (st, v) = http(sock, method, path, body);
        assert_eq!(st, 400, "{method} {path} {body:?}: {v}");
        let msg = v["fault_message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(needle),
            "{method} {path}: fault_message {msg:?} does not name {needle:?}"
        );
    }

    pub fn state(sock: &Path) -> String {
        let (st, v) = http(sock, "GET", "/", None);
        assert_eq!(st, 200, "{v}");
        v["state"].as_str().unwrap_or_default().to_string()
    }

    pub fn wait_for_socket(vm: &mut Interactive, sock: &Path) {
        let start = Instant::now();
        while UnixStream::connect(sock).is_err() {
            assert!(
                start.elapsed() < API_READY,
                "no API socket after {API_READY:?}; stderr: {}",
                vm.stderr()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The test guest computing `iters` iterations in ring 3 on 2 vCPUs on KVM (128 MiB),
    /// controlled through an API socket at `sock`; returns once the socket answers.
    pub fn compute_guest_on_kvm(sock: &Path, iters: &str) -> Interactive {
        compute_guest(sock, "kvm", &[], iters)
    }

    /// [`compute_guest_on_kvm`] on backend `accel`, with `extra` flags.
    pub fn compute_guest(sock: &Path, accel: &str, extra: &[&str], iters: &str) -> Interactive {
        scenario_guest(sock, accel, extra, "compute", iters)
    }

    /// The test guest running `scenario:arg` on 2 vCPUs on `accel` (128 MiB) with `extra`
    /// flags, controlled through an API socket at `sock`; returns once the socket answers.
    pub fn scenario_guest(
        sock: &Path,
        accel: &str,
        extra: &[&str],
        scenario: &str,
        arg: &str,
    ) -> Interactive {
        let guest = super::testguest();
        let cmdline = format!("tests={scenario}:{arg}");
        let mut args = vec![
            "run",
            "--accel",
            accel,
            "--cpus",
            "2",
            "--memory",
            "128M",
            "--kernel",
            guest.to_str().unwrap(),
            "--cmdline",
            &cmdline,
            "--api-sock",
            sock.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let mut vm = Interactive::spawn(&args);
        wait_for_socket(&mut vm, sock);
        vm
    }
}

/// A `kvmbox vm` store of a test's own: `KVMBOX_HOME` in a temporary folder.
pub mod store {
    use serde_json::Value;
    use std::path::PathBuf;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    /// A store in a temporary folder; dropping it force-deletes its VMs (ending their
    /// processes) and removes the folder.
    pub struct Home(pub PathBuf);

    impl Home {
        pub fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("kvmbox-vm-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Home(p)
        }

        /// `kvmbox vm ARGS` in this store (not yet run; `KVMBOX_JAIL` not inherited).
        pub fn cmd(&self, args: &[&str]) -> Command {
            let mut c = Command::new(super::kvmbox());
            c.env("KVMBOX_HOME", &self.0)
                .env_remove("KVMBOX_JAIL")
                .arg("vm")
                .args(args);
            c
        }

        /// Run `c` without stdin: (exit status, stdout, stderr).
        pub fn run(&self, mut c: Command) -> (i32, String, String) {
            let out = c.stdin(Stdio::null()).output().expect("run kvmbox vm");
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }

        /// Run `kvmbox vm ARGS`: (exit status, stdout, stderr).
        pub fn vm(&self, args: &[&str]) -> (i32, String, String) {
            self.run(self.cmd(args))
        }

        /// `kvmbox vm ARGS`, which must succeed; its stdout.
        pub fn ok(&self, args: &[&str]) -> String {
            let (st, out, err) = self.vm(args);
            assert_eq!(st, 0, "kvmbox vm {args:?}: {out}{err}");
            out
        }

        /// `kvmbox vm ARGS`, which must fail with `status` and a message containing `needle`.
        pub fn fails(&self, args: &[&str], status: i32, needle: &str) {
            let (st, out, err) = self.vm(args);
            assert_eq!(st, status, "kvmbox vm {args:?}: {out}{err}");
            assert!(
                err.contains(needle),
                "kvmbox vm {args:?}: {err:?} lacks {needle:?}"
            );
        }

        pub fn show(&self, name: &str) -> Value {
            serde_json::from_str(&self.ok(&["show", name, "--json"])).unwrap()
        }

        pub fn state(&self, name: &str) -> String {
            self.show(name)["state"].as_str().unwrap().to_string()
        }

        pub fn log(&self, name: &str) -> String {
            self.ok(&["log", name])
        }

        /// Wait until the VM's console log (this run's) contains `needle`; the log.
        pub fn expect_log(&self, name: &str, needle: &str, timeout: Duration) -> String {
            let t0 = Instant::now();
            loop {
                let log = self.log(name);
                if log.contains(needle) {
                    return log;
                }
                assert!(
                    t0.elapsed() < timeout,
                    "VM {name}: no {needle:?} in the console log within {timeout:?}:\n{log}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    impl Drop for Home {
        fn drop(&mut self) {
            if let Ok(list) = serde_json::from_str::<Value>(&self.vm(&["list", "--json"]).1) {
                for v in list.as_array().into_iter().flatten() {
                    let name = v["name"].as_str().unwrap_or_default().to_string();
                    self.vm(&["delete", "--force", &name]);
                }
            }
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// What /proc says about a process (the jail tests look at jailed VMs from the host).
pub mod procfs {
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    /// The value of `key` in /proc/PID/status, its fields joined by single spaces.
    pub fn status_field(pid: u32, key: &str) -> String {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
        s.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}:")))
            .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The namespace `kind` (`mnt`, `pid`, `net`...) of `pid`, e.g. `mnt:[4026531841]`.
    pub fn ns(pid: impl std::fmt::Display, kind: &str) -> String {
        std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
            .expect("read a namespace link")
            .to_string_lossy()
            .into_owned()
    }

    /// The PIDs of `pid`'s children.
    pub fn children(pid: u32) -> Vec<u32> {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// Check from the host what the jail of process `pid` holds: exactly the executable
    /// `/kvmbox`, `/dev/kvm`, `/dev/urandom`, `/dev/null` and `files` (kvmbox is static: the
    /// only shared libraries are those of a helper program in `files`), besides any of
    /// `optional`; and no directory that leads to none of them nor to one of `leads_to`.
    pub fn assert_jail_holds(
        pid: u32,
        files: &[PathBuf],
        optional: &[PathBuf],
        leads_to: &[PathBuf],
    ) {
        let entries = walk(Path::new(&format!("/proc/{pid}/root")));
        let found: BTreeSet<PathBuf> = entries
            .iter()
            .filter(|(_, d)| !d)
            .map(|(p, _)| p.clone())
            .collect();
        let mut expected: BTreeSet<PathBuf> = ["/kvmbox", "/dev/kvm", "/dev/urandom", "/dev/null"]
            .iter()
            .map(PathBuf::from)
            .collect();
        expected.extend(files.iter().cloned());
        // A helper program's (passt's) interpreter and libraries.
        let is_library = |p: &Path| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            let dir = p.to_string_lossy();
            (dir.starts_with("/lib") || dir.starts_with("/usr/lib"))
                && (name.starts_with("lib") || name.starts_with("ld-linux"))
                && name.contains(".so")
        };
        let unexpected: Vec<_> = found
            .iter()
            .filter(|p| !expected.contains(*p) && !optional.contains(*p) && !is_library(p))
            .collect();
        assert!(
            unexpected.is_empty(),
            "unexpected files in the jail: {unexpected:?}"
        );
        let missing: Vec<_> = expected.iter().filter(|p| !found.contains(*p)).collect();
        assert!(
            missing.is_empty(),
            "missing in the jail: {missing:?} (has {found:?})"
        );
        for (dir, _) in entries.iter().filter(|(_, d)| *d) {
            assert!(
                found.iter().chain(leads_to).any(|f| f.starts_with(dir)),
                "directory {} in the jail leads to none of its files",
                dir.display()
            );
        }
    }

    /// Every entry under `root` except below its `/proc` (a jail's own procfs), as paths
    /// inside it, without following symlinks; the value says whether it is a directory.
    pub fn walk(root: &Path) -> Vec<(PathBuf, bool)> {
        let mut out = Vec::new();
        let mut todo = vec![root.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
                let p = e.expect("directory entry").path();
                let inside = Path::new("/").join(p.strip_prefix(root).expect("under root"));
                let is_dir = std::fs::symlink_metadata(&p).expect("lstat").is_dir();
                out.push((inside.clone(), is_dir));
                if is_dir && inside != Path::new("/proc") {
                    todo.push(p);
                }
            }
        }
        out
    }
}
