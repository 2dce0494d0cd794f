//! `kvmbox jail`: a jailed test guest boots on KVM and completes, and while it runs the test
//! looks at it from the host: its root (`/proc/PID/root`) holds only its own files, its mount
//! and PID namespaces are new, it is in the network namespace given, it runs as the given
//! user with no capabilities, under seccomp and no-new-privileges, with the rlimits given; its
//! API socket answers at the host path. Bad inputs are refused with clear messages, and
//! everything the jail made is gone afterwards. Needs root (it makes namespaces and device
//! nodes); skips otherwise.

mod common;

use common::procfs::{assert_jail_holds, ns, status_field};
use common::{api, kvm_or_skip, kvmbox, repo_root, skip, testguest, CpuLease, Interactive};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// nobody/nogroup on Debian.
const UID: u32 = 65534;
const GID: u32 = 65534;

/// How long the jail's cleanup may take after its VM ends (it removes a few files).
const CLEANUP: Duration = Duration::from_secs(30);

fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    skip(test, "kvmbox jail needs root");
    false
}

/// A directory for one test (on the repository's filesystem, so files are hard-linked), with a
/// network namespace when asked; both removed on drop, after the jailer was asked to end.
struct Scratch {
    dir: PathBuf,
    netns: Option<String>,
    /// Sent SIGTERM on drop (the jailer, or a daemonized jail's VM), then waited for.
    jailer: Option<u32>,
    tmpfs: bool,
}

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = repo_root()
            .join("target/tmp")
            .join(format!("jail-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the test directory");
        Self {
            dir,
            netns: None,
            jailer: None,
            tmpfs: false,
        }
    }

    fn base(&self) -> PathBuf {
        self.dir.join("base")
    }

    /// Make the jails' base a tmpfs: another filesystem than the files', so nothing can be
    /// hard-linked.
    fn tmpfs_base(&mut self) {
        std::fs::create_dir_all(self.base()).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "kvmbox-jail-test"])
            .arg(self.base())
            .status()
            .expect("run mount");
        assert!(st.success(), "mount a tmpfs on {}", self.base().display());
        self.tmpfs = true;
    }

    fn add_netns(&mut self, name: &str) -> PathBuf {
        let name = format!("{name}-{}", std::process::id());
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip netns add");
        assert!(st.success(), "ip netns add {name}");
        self.netns = Some(name.clone());
        PathBuf::from("/var/run/netns").join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(pid) = self.jailer {
            // SAFETY: a signal to the jailer this test started (it ends its VM and cleans up).
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            let start = Instant::now();
            while self
                .base()
                .join("kvmbox")
                .read_dir()
                .is_ok_and(|mut d| d.next().is_some())
                && start.elapsed() < CLEANUP
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if self.tmpfs {
            let _ = Command::new("umount").arg(self.base()).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(n) = &self.netns {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// The jailer's child: the jailed kvmbox.
fn jailed_pid(jailer: u32) -> u32 {
    let start = Instant::now();
    loop {
        let children = std::fs::read_to_string(format!("/proc/{jailer}/task/{jailer}/children"))
            .unwrap_or_default();
        if let Some(p) = children.split_whitespace().next() {
            return p.parse().expect("a PID");
        }
        assert!(
            start.elapsed() < CLEANUP,
            "the jailer {jailer} started no VM"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn jailed_test_guest_sees_only_its_own_files_on_kvm() {
    let test = "jailed_test_guest_sees_only_its_own_files_on_kvm";
    if !root_or_skip(test) || !kvm_or_skip(test) {
        return;
    }
    let mut s = Scratch::new("files");
    let netns = s.add_netns("kvmbox-jail");
    let disk = s.dir.join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(64 << 20))
        .expect("create the disk");
    let sock = s.dir.join("api.sock");
    let guest = testguest();
    let id = format!("files-{}", std::process::id());
    // A cgroup file of whichever version has the cpu controller here.
    let version = kvmbox_cgroup::Hierarchy::detect(&["cpu"])
        .expect("a cgroup hierarchy with the cpu controller")
        .version();
    let (key, value) = match version {
        kvmbox_cgroup::Version::V2 => ("cpu.weight", "200"),
        kvmbox_cgroup::Version::V1 => ("cpu.shares", "512"),
    };
    let mut cmd = Command::new(kvmbox());
    cmd.arg("jail")
        .args([
            "--id",
            &id,
            "--uid",
            &UID.to_string(),
            "--gid",
            &GID.to_string(),
        ])
        .arg("--chroot-base")
        .arg(s.base())
        .arg("--netns")
        .arg(&netns)
        .args(["--resource-limit", "no-file=256"])
        .args(["--resource-limit", "fsize=1073741824"])
        .arg("--cgroup")
        .arg(format!("{key}={value}"))
        .arg("--")
        .args([
            "--accel",
            "kvm",
            "--memory",
            "128M",
            "--cmdline",
            "tests=shell",
        ])
        .arg("--kernel")
        .arg(&guest)
        .arg("--disk")
        .arg(&disk)
        .arg("--api-sock")
        .arg(&sock);
    let _lease = CpuLease::shared();
    let mut vm = Interactive::spawn_with(cmd);
    s.jailer = Some(vm.id());
    vm.expect("KVMBOX-TEST shell ready", common::TESTGUEST_TIMEOUT);
    let pid = jailed_pid(vm.id());

    // Its root: the executable, its libraries, three devices, the kernel, the disk and the
    // API socket, and the directories leading to them and to the working directory (the
    // host's); nothing else.
    let cwd = std::env::current_dir().expect("the working directory");
    assert_jail_holds(
        pid,
        &[guest.clone(), disk.clone(), sock.clone()],
        &[],
        &[cwd],
    );
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    // Hard links of the host's files (same inode), the disk lent to the jail's user.
    let inside = root.join(disk.strip_prefix("/").unwrap());
    assert_eq!(
        std::fs::metadata(&inside).unwrap().ino(),
        std::fs::metadata(&disk).unwrap().ino()
    );
    assert_eq!(std::fs::metadata(&disk).unwrap().uid(), UID);

    // Namespaces: new mount and PID namespaces (it is PID 1 in its own), the network one given.
    let me = std::process::id().to_string();
    let p = pid.to_string();
    assert_ne!(ns(&p, "mnt"), ns(&me, "mnt"));
    assert_ne!(ns(&p, "pid"), ns(&me, "pid"));
    assert_eq!(status_field(pid, "NSpid"), format!("{pid} 1"));
    let netns_ino = std::fs::metadata(&netns).expect("stat the netns").ino();
    assert_eq!(ns(&p, "net"), format!("net:[{netns_ino}]"));

    // The user, no capabilities, seccomp, no new privileges.
    let ids = |v: u32| format!("{v} {v} {v} {v}");
    assert_eq!(status_field(pid, "Uid"), ids(UID));
    assert_eq!(status_field(pid, "Gid"), ids(GID));
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(status_field(pid, "Seccomp"), "2");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");

    // The rlimits.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let limit = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in {limits}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(limit("Max open files"), "Max open files 256 256 files");
    assert_eq!(
        limit("Max file size"),
        "Max file size 1073741824 1073741824 bytes"
    );

    // Its own cgroup, with the file set.
    let h = kvmbox_cgroup::Hierarchy::detect_for(pid, &["cpu"]).expect("the VM's cgroup");
    let group = h.own_dir("cpu").expect("a cpu group").to_path_buf();
    assert!(
        group.ends_with(format!("kvmbox/jail-{id}")),
        "{}",
        group.display()
    );
    let set = std::fs::read_to_string(group.join(key)).expect("read the cgroup file");
    assert_eq!(set.trim(), value, "{key} in {}", group.display());

    // The API socket answers at the host path given.
    assert_eq!(api::state(&sock), "Running");

    // The guest completes through the debug-exit port: `exit 3` is status 7.
    vm.send(b"exit 3\n");
    assert_eq!(
        vm.wait_exit(common::TESTGUEST_TIMEOUT),
        Some(7),
        "{}",
        vm.stderr()
    );
    s.jailer = None;
    // Everything the jail made is gone, the disk's owner is back.
    assert!(!s.base().join("kvmbox").join(&id).exists());
    assert!(
        std::fs::symlink_metadata(&sock).is_err(),
        "the socket link stayed"
    );
    assert_eq!(std::fs::metadata(&disk).unwrap().uid(), 0);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    assert!(!group.exists(), "{} stayed", group.display());
}

/// Run `kvmbox jail ARGS`, expect status 2 and `needle` in its message, and no jail left.
fn refused(s: &Scratch, args: &[&str], needle: &str) {
    let out = Command::new(kvmbox())
        .arg("jail")
        .arg("--chroot-base")
        .arg(s.base())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run kvmbox jail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(
        err.contains(needle),
        "{args:?}: {err:?} does not say {needle:?}"
    );
    let left: Vec<_> = s
        .base()
        .join("kvmbox")
        .read_dir()
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{args:?} left {left:?}");
}

#[test]
fn jail_refuses_bad_inputs_clearly() {
    if !root_or_skip("jail_refuses_bad_inputs_clearly") {
        return;
    }
    let s = Scratch::new("errors");
    let guest = testguest();
    let k = guest.to_str().unwrap();
    let ids = ["--uid", "65534", "--gid", "65534"];
    let with = |id: &str, extra: &[&str], run: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec!["--id".into(), id.into()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v.push("--".into());
        v.extend(run.iter().map(|s| s.to_string()));
        v
    };
    let check = |args: Vec<String>, needle: &str| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(&s, &a, needle);
    };
    let missing = s.dir.join("no-such-kernel");
    let m = missing.to_str().unwrap();
    check(with("e1", &ids, &["--kernel", m]), "kernel");
    check(with("e1", &ids, &["--kernel", m]), "no-such-kernel");
    check(
        with("e1", &ids, &["--kernel", k, "--disk", "/nonexistent/d.img"]),
        "/nonexistent/d.img",
    );
    check(with("../x", &ids, &["--kernel", k]), "--id");
    check(with("a/b", &ids, &["--kernel", k]), "not allowed");
    check(
        with("e2", &["--uid", "0", "--gid", "65534"], &["--kernel", k]),
        "--uid 0",
    );
    check(
        with(
            "e2",
            &["--uid", "nobody", "--gid", "65534"],
            &["--kernel", k],
        ),
        "--uid",
    );
    check(
        with("e2", &["--uid", "65534", "--gid", "0"], &["--kernel", k]),
        "--gid 0",
    );
    check(
        with(
            "e3",
            &[&ids[..], &["--netns", "/nonexistent-netns"]].concat(),
            &["--kernel", k],
        ),
        "--netns /nonexistent-netns",
    );
    check(
        with(
            "e3",
            &[&ids[..], &["--netns", k]].concat(),
            &["--kernel", k],
        ),
        "not a network namespace",
    );
    check(
        with(
            "e4",
            &[&ids[..], &["--resource-limit", "nofile=5"]].concat(),
            &["--kernel", k],
        ),
        "unknown limit",
    );
    // The run's limits are the jail cgroup's, checked as kvmbox run checks them.
    check(
        with(
            "e5",
            &ids,
            &["--kernel", k, "--memory", "512M", "--memory-limit", "256M"],
        ),
        "below the guest's memory",
    );
    check(
        with(
            "e5",
            &[&ids[..], &["--share", m]].concat(),
            &["--kernel", k],
        ),
        "--share",
    );
    check(
        with(
            "e7",
            &[&ids[..], &["--cgroup", "cpu.shares"]].concat(),
            &["--kernel", k],
        ),
        "expected KEY=VALUE",
    );
    check(
        with(
            "e7",
            &[&ids[..], &["--cgroup", "../x=1"]].concat(),
            &["--kernel", k],
        ),
        "--cgroup",
    );
    check(with("e5", &ids, &["--kernel", k, "--bogus"]), "--bogus");
    // A file whose place in the jail is the executable's.
    check(
        with("e8", &ids, &["--kernel", "/kvmbox"]),
        "would both be /kvmbox",
    );
    // A kernel the jail's user cannot read.
    let secret = s.dir.join("secret.elf");
    std::fs::copy(&guest, &secret).unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    check(
        with("e6", &ids, &["--kernel", secret.to_str().unwrap()]),
        "not readable by uid 65534",
    );
    // A jail with this id exists.
    std::fs::create_dir_all(s.base().join("kvmbox/taken")).unwrap();
    let out = Command::new(kvmbox())
        .arg("jail")
        .arg("--chroot-base")
        .arg(s.base())
        .args(with("taken", &ids, &["--kernel", k]))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("exists"), "{err}");
}

#[test]
fn daemonized_jail_prints_the_vm_pid_and_cleans_up_after_sigterm() {
    let test = "daemonized_jail_prints_the_vm_pid_and_cleans_up_after_sigterm";
    if !root_or_skip(test) || !kvm_or_skip(test) {
        return;
    }
    let mut s = Scratch::new("daemon");
    let guest = testguest();
    let id = format!("daemon-{}", std::process::id());
    let _lease = CpuLease::shared();
    let out = Command::new(kvmbox())
        .arg("jail")
        .args([
            "--id",
            &id,
            "--uid",
            "65534",
            "--gid",
            "65534",
            "--daemonize",
        ])
        .arg("--chroot-base")
        .arg(s.base())
        .args([
            "--",
            "--accel",
            "kvm",
            "--memory",
            "128M",
            "--cmdline",
            "tests=shell",
        ])
        .arg("--kernel")
        .arg(&guest)
        .stdin(Stdio::null())
        .output()
        .expect("run kvmbox jail --daemonize");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid: i32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("the VM's PID on stdout");
    // On failure, the guard's SIGTERM to the VM makes the daemon end it and clean up.
    s.jailer = Some(pid as u32);
    assert_eq!(status_field(pid as u32, "Uid"), "65534 65534 65534 65534");
    let jail = s.base().join("kvmbox").join(&id);
    assert!(jail.join("root/kvmbox").exists());
    // SAFETY: a signal to the VM this test started (through its jail).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let start = Instant::now();
    while jail.exists() || Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            start.elapsed() < CLEANUP,
            "the daemon did not end the VM and remove {}",
            jail.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    s.jailer = None;
}

#[test]
fn jailed_restore_holds_the_snapshot_files_and_its_disk() {
    let test = "jailed_restore_holds_the_snapshot_files_and_its_disk";
    if !root_or_skip(test) || !kvm_or_skip(test) {
        return;
    }
    let mut s = Scratch::new("restore");
    let disk = s.dir.join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(16 << 20))
        .expect("create the disk");
    let (state, mem) = (s.dir.join("vm.state"), s.dir.join("vm.mem"));
    let sock = s.dir.join("snap.sock");
    let _lease = CpuLease::shared();
    // A snapshot of the waiting shell, taken outside any jail.
    {
        let guest = testguest();
        let mut vm = Interactive::spawn(&[
            "run",
            "--accel",
            "kvm",
            "--memory",
            "128M",
            "--cmdline",
            "tests=shell",
            "--kernel",
            guest.to_str().unwrap(),
            "--disk",
            disk.to_str().unwrap(),
            "--api-sock",
            sock.to_str().unwrap(),
        ]);
        vm.expect("KVMBOX-TEST shell ready", common::TESTGUEST_TIMEOUT);
        api::wait_for_socket(&mut vm, &sock);
        api::ok(&sock, "PATCH", "/vm", r#"{"state":"Paused"}"#);
        let body = format!(
            r#"{{"snapshot_path":"{}","mem_file_path":"{}"}}"#,
            state.display(),
            mem.display()
        );
        api::ok(&sock, "PUT", "/snapshot/create", &body);
    }
    let id = format!("restore-{}", std::process::id());
    let mut cmd = Command::new(kvmbox());
    cmd.arg("jail")
        .args(["--id", &id, "--uid", "65534", "--gid", "65534"])
        .arg("--chroot-base")
        .arg(s.base())
        .arg("--")
        .arg("--restore")
        .arg(&state)
        .arg("--restore-mem")
        .arg(&mem);
    let mut vm = Interactive::spawn_with(cmd);
    s.jailer = Some(vm.id());
    let pid = jailed_pid(vm.id());
    // Once it runs as the user (after its pivot into the jail and its exec), the snapshot's
    // files and the disk named inside the state file are in its root.
    let start = Instant::now();
    while status_field(pid, "Uid") != "65534 65534 65534 65534" {
        assert!(
            start.elapsed() < CLEANUP,
            "the jailed VM never switched user"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    assert!(root.join("kvmbox").exists());
    for f in [&state, &mem, &disk] {
        let inside = root.join(f.strip_prefix("/").unwrap());
        assert!(inside.exists(), "{} not in the jail", f.display());
    }
    // The restored shell answers: `exit 2` is status 5.
    vm.send(b"exit 2\n");
    assert_eq!(
        vm.wait_exit(common::TESTGUEST_TIMEOUT),
        Some(5),
        "{}",
        vm.stderr()
    );
    s.jailer = None;
    assert!(!s.base().join("kvmbox").join(&id).exists());
}

#[test]
fn jail_on_another_filesystem_bind_mounts_the_files() {
    let test = "jail_on_another_filesystem_bind_mounts_the_files";
    if !root_or_skip(test) || !kvm_or_skip(test) {
        return;
    }
    let mut s = Scratch::new("bind");
    s.tmpfs_base();
    let disk = s.dir.join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(16 << 20))
        .expect("create the disk");
    let guest = testguest();
    let id = format!("bind-{}", std::process::id());
    let mut cmd = Command::new(kvmbox());
    cmd.arg("jail")
        .args(["--id", &id, "--uid", "65534", "--gid", "65534"])
        .arg("--chroot-base")
        .arg(s.base())
        .args([
            "--",
            "--accel",
            "kvm",
            "--memory",
            "128M",
            "--cmdline",
            "tests=shell",
        ])
        .arg("--kernel")
        .arg(&guest)
        .arg("--disk")
        .arg(&disk);
    let _lease = CpuLease::shared();
    let mut vm = Interactive::spawn_with(cmd);
    s.jailer = Some(vm.id());
    vm.expect("KVMBOX-TEST shell ready", common::TESTGUEST_TIMEOUT);
    let pid = jailed_pid(vm.id());
    // The files are bind mounts in the VM's mount namespace: the kernel read-only, the disk
    // writable; none of them is visible in the host's.
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let options = |p: &Path| -> String {
        mounts
            .lines()
            .find(|l| l.split_whitespace().nth(4) == Some(p.to_str().unwrap()))
            .unwrap_or_else(|| panic!("{} is not a mount in the jail:\n{mounts}", p.display()))
            .split_whitespace()
            .nth(5)
            .unwrap()
            .to_string()
    };
    assert!(
        options(&guest).split(',').any(|o| o == "ro"),
        "{}",
        options(&guest)
    );
    assert!(
        options(&disk).split(',').any(|o| o == "rw"),
        "{}",
        options(&disk)
    );
    assert!(options(Path::new("/kvmbox")).split(',').any(|o| o == "ro"));
    let host_mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !host_mounts.contains(&format!("kvmbox/{id}/root")),
        "the jail's mounts leak to the host"
    );
    let inside = PathBuf::from(format!("/proc/{pid}/root")).join(disk.strip_prefix("/").unwrap());
    assert_eq!(
        std::fs::metadata(&inside).unwrap().ino(),
        std::fs::metadata(&disk).unwrap().ino()
    );
    vm.send(b"exit 1\n");
    assert_eq!(
        vm.wait_exit(common::TESTGUEST_TIMEOUT),
        Some(3),
        "{}",
        vm.stderr()
    );
    s.jailer = None;
    assert!(!s.base().join("kvmbox").join(&id).exists());
}
