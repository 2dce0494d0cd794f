//! `kvmbox vm start` as root runs the VM process in a jail (`kvmbox jail`): the test looks at
//! it from the host (its root holds only its own files, it runs as a jail user of its own with
//! no capabilities, in new mount and PID namespaces, under its jail's cgroup with the VM's
//! limits, its passt beside it in the jail), drives it (limits changed while it runs, console,
//! pause, resume, live snapshot, save, resume from the saved state, stop) and checks that everything the jail made
//! is gone afterwards and the files it lent are root's again. `--no-jail` and `KVMBOX_JAIL=off`
//! run it unjailed. A VM with a TAP network runs jailed too, in a network namespace the test
//! makes, its TAP devices untouched (owners, persistence). Needs root and KVM; skips otherwise.

mod common;

use common::procfs::{assert_jail_holds, children, ns, status_field};
use common::store::Home;
use common::{kvm_or_skip, kvmbox, skip, testguest, CpuLease, Interactive, TESTGUEST_TIMEOUT};
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Longest a command, a console attach or a cleanup takes (milliseconds when idle).
const CMD: Duration = Duration::from_secs(30);

/// Create VM `name` in `home`: the test guest's shell on KVM, 128 MiB, a new 16 MiB disk and
/// the default network (user-mode NAT through passt), with `extra` options.
fn create(home: &Home, name: &str, extra: &[&str]) {
    create_running(home, name, "tests=shell", extra);
}

/// As [`create`], with the test guest's `cmdline`.
fn create_running(home: &Home, name: &str, cmdline: &str, extra: &[&str]) {
    // (The disk options add to the 16 MiB one.)
    let tg = testguest();
    let mut args = vec![
        "create",
        name,
        "--kernel",
        tg.to_str().unwrap(),
        "--cmdline",
        cmdline,
        "--memory",
        "128M",
        "--accel",
        "kvm",
        "--disk-size",
        "16M",
    ];
    args.extend_from_slice(extra);
    home.ok(&args);
}

fn root_kvm_passt_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        skip(test, "jails need root");
        return false;
    }
    common::passt_or_skip(test) && kvm_or_skip(test)
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < CMD, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn vm_start_as_root_runs_the_vm_in_a_jail_on_kvm() {
    let test = "vm_start_as_root_runs_the_vm_in_a_jail_on_kvm";
    if !root_kvm_passt_or_skip(test) {
        return;
    }
    let Ok(h) = kvmbox_cgroup::Hierarchy::detect(&["cpu"]) else {
        skip(test, "no cgroup hierarchy with the cpu controller");
        return;
    };
    let _cpu = CpuLease::shared();
    let home = Home::new("on");
    create(&home, "j", &["--cpu-max", "0.5"]);
    let out = home.ok(&["start", "j"]);
    assert!(out.contains("runs jailed as uid"), "{out}");
    home.expect_log("j", "kvmbox-testguest# ", TESTGUEST_TIMEOUT);
    let v = home.show("j");
    assert_eq!(v["jailed"], true, "{v}");
    let uid = v["jail"]["uid"].as_u64().unwrap() as u32;
    assert_eq!(uid, 1_900_000_000, "the first jail user: {v}");
    assert_eq!(v["jail"]["gid"], uid, "{v}");
    let jail_root = PathBuf::from(v["jail"]["root"].as_str().unwrap());
    let jail_dir = jail_root.parent().unwrap().to_path_buf();
    assert!(jail_dir.starts_with(home.0.join("jails/kvmbox")), "{v}");
    assert!(home
        .ok(&["show", "j"])
        .contains(&format!("jail:      uid {uid} gid {uid}")));
    let pid = v["pid"].as_u64().unwrap() as u32;
    let dir = home.0.join("vms/j");
    let disk = dir.join("disk0.qcow2");
    let api = home.0.join("run/j/api.sock");

    // Its root: kvmbox, its libraries and three devices, the settings, kernel and disk, the
    // API socket and the share folder, passt (and its AVX2 build) and resolv.conf; /proc holds
    // the jail's own processes only.
    let passt = std::fs::canonicalize(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|d| d.join("passt"))
            .find(|p| p.is_file())
            .expect("passt on $PATH"),
    )
    .unwrap();
    assert_jail_holds(
        pid,
        &[
            testguest(),
            dir.join("vm.toml"),
            disk.clone(),
            api.clone(),
            passt.clone(),
        ],
        &[
            PathBuf::from(format!("{}.avx2", passt.display())),
            PathBuf::from("/etc/resolv.conf"),
        ],
        &[home.0.join("run/j/share"), PathBuf::from("/proc")],
    );
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let procs: BTreeSet<String> = std::fs::read_dir(root.join("proc"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        procs
            .iter()
            .all(|p| p == "self" || p == "thread-self" || p.parse::<u32>().is_ok()),
        "the jail's /proc shows more than its processes: {procs:?}"
    );
    assert!(procs.contains("1"), "{procs:?}");

    // Its user (no capabilities), its namespaces, the disk lent to its user.
    let ids = format!("{uid} {uid} {uid} {uid}");
    assert_eq!(status_field(pid, "Uid"), ids);
    assert_eq!(status_field(pid, "Gid"), ids);
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "Seccomp"), "2");
    let me = std::process::id();
    assert_ne!(ns(pid, "mnt"), ns(me, "mnt"));
    assert_ne!(ns(pid, "pid"), ns(me, "pid"));
    assert_eq!(status_field(pid, "NSpid"), format!("{pid} 1"));
    assert_eq!(std::fs::metadata(&disk).unwrap().uid(), uid);
    // passt runs in the jail beside it, as its user (in a user namespace of its own).
    let kids = children(pid);
    let passt_pid = *kids
        .iter()
        .find(|k| {
            std::fs::read_to_string(format!("/proc/{k}/comm")).is_ok_and(|c| c.starts_with("passt"))
        })
        .unwrap_or_else(|| panic!("no passt among {kids:?}"));
    assert_eq!(status_field(passt_pid, "Uid"), ids);
    assert_eq!(ns(passt_pid, "pid"), ns(pid, "pid"));

    // The settings' CPU quota, in the jail's cgroup.
    let seen = kvmbox_cgroup::Hierarchy::detect_for(pid, &["cpu"]).unwrap();
    let group = seen.own_dir("cpu").unwrap().to_path_buf();
    let id = v["jail"]["id"].as_str().unwrap();
    assert!(
        group.ends_with(format!("kvmbox/jail-{id}")),
        "{}",
        group.display()
    );
    let read = |dir: &Path, f: &str| {
        std::fs::read_to_string(dir.join(f))
            .unwrap()
            .trim()
            .to_string()
    };
    let v1 = h.version() == kvmbox_cgroup::Version::V1;
    if v1 {
        assert_eq!(read(&group, "cpu.cfs_quota_us"), "50000");
    } else {
        assert_eq!(read(&group, "cpu.max"), "50000 100000");
    }
    // Changed while it runs: root sets the jail's group (the memory one too, made at start).
    home.ok(&["modify", "j", "--cpu-max", "1", "--memory-limit", "300M"]);
    let mem = kvmbox_cgroup::Hierarchy::detect_for(pid, &["memory"])
        .unwrap()
        .own_dir("memory")
        .unwrap()
        .to_path_buf();
    assert!(
        mem.ends_with(format!("kvmbox/jail-{id}")),
        "{}",
        mem.display()
    );
    if v1 {
        assert_eq!(read(&group, "cpu.cfs_quota_us"), "100000");
        assert_eq!(
            read(&mem, "memory.limit_in_bytes"),
            (300u64 << 20).to_string()
        );
    } else {
        assert_eq!(read(&group, "cpu.max"), "100000 100000");
        assert_eq!(read(&mem, "memory.max"), (300u64 << 20).to_string());
    }
    home.fails(
        &["modify", "j", "--memory-limit", "100M"],
        2,
        "below the guest's memory",
    );
    home.fails(
        &["modify", "j", "--cpu-affinity", "0"],
        4,
        "--cpu-affinity cannot change",
    );

    // Console, pause and resume.
    let mut c = Interactive::spawn_with({
        let mut c = home.cmd(&["console", "j"]);
        c.stdin(Stdio::piped());
        c
    });
    wait_until("console attach", || c.stderr().contains("attached to VM"));
    c.send(b"echo in-jail\r");
    c.expect("\r\nin-jail\r\n", CMD);
    c.send(b"\x01d");
    c.wait_exit(CMD);
    home.ok(&["pause", "j"]);
    assert_eq!(home.state("j"), "paused");
    home.ok(&["resume", "j"]);
    assert_eq!(home.state("j"), "running");

    // A live snapshot and a save: the files the jailed VM wrote are root's, in the VM's folder.
    home.ok(&["snapshot", "j", "take", "s1"]);
    home.ok(&["save", "j"]);
    for f in [
        "snapshots/s1/state",
        "snapshots/s1/mem",
        "saved/state",
        "saved/mem",
    ] {
        let m = std::fs::metadata(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!((m.uid(), m.gid()), (0, 0), "{f}");
    }
    assert!(
        !jail_dir.exists(),
        "{} stayed after save",
        jail_dir.display()
    );
    assert_eq!(std::fs::metadata(&disk).unwrap().uid(), 0);
    wait_until("the jail's cgroup goes", || !group.exists());

    // Resumed from the saved state, in a jail again; then stopped.
    let out = home.ok(&["start", "j"]);
    assert!(
        out.contains("resumed from its saved state") && out.contains("runs jailed"),
        "{out}"
    );
    let v = home.show("j");
    assert_eq!(v["jailed"], true, "{v}");
    let pid = v["pid"].as_u64().unwrap() as u32;
    assert_eq!(status_field(pid, "Uid"), ids);
    let mut c = Interactive::spawn_with({
        let mut c = home.cmd(&["console", "j"]);
        c.stdin(Stdio::piped());
        c
    });
    wait_until("console attach", || c.stderr().contains("attached to VM"));
    c.send(b"echo resumed-in-jail\r");
    c.expect("\r\nresumed-in-jail\r\n", CMD);
    c.send(b"\x01d");
    c.wait_exit(CMD);
    home.ok(&["stop", "--force", "j"]);
    assert_eq!(home.state("j"), "stopped");
    assert!(
        !jail_dir.exists(),
        "{} stayed after stop",
        jail_dir.display()
    );
    assert!(!home.0.join("run/j").exists());
    assert_eq!(std::fs::metadata(&disk).unwrap().uid(), 0);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    wait_until("the jail's cgroup goes", || {
        !group.exists() && !mem.exists()
    });
    assert_eq!(home.show("j")["jailed"], false);
}

#[test]
fn no_jail_and_kvmbox_jail_off_run_the_vm_unjailed() {
    let test = "no_jail_and_kvmbox_jail_off_run_the_vm_unjailed";
    if !root_kvm_passt_or_skip(test) {
        return;
    }
    let _cpu = CpuLease::shared();
    let home = Home::new("off");
    create(&home, "u", &["--net", "none"]);
    let me = std::process::id();
    for how in ["--no-jail", "KVMBOX_JAIL=off"] {
        let mut c = home.cmd(&["start", "u"]);
        if how == "--no-jail" {
            c.arg("--no-jail");
        } else {
            c.env("KVMBOX_JAIL", "off");
        }
        let (st, out, err) = home.run(c);
        assert_eq!(st, 0, "{how}: {out}{err}");
        assert!(!out.contains("jailed"), "{how}: {out}");
        let v = home.show("u");
        assert_eq!(v["jailed"], false, "{how}: {v}");
        assert!(v["jail"].is_null(), "{how}: {v}");
        let pid = v["pid"].as_u64().unwrap() as u32;
        assert_eq!(status_field(pid, "Uid"), "0 0 0 0", "{how}");
        assert_eq!(ns(pid, "mnt"), ns(me, "mnt"), "{how}");
        assert_eq!(ns(pid, "pid"), ns(me, "pid"), "{how}");
        assert!(home.ok(&["show", "u"]).contains("jail:      none"), "{how}");
        assert!(!home
            .0
            .join("jails/kvmbox")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some()));
        home.ok(&["stop", "--force", "u"]);
    }
    let mut c = home.cmd(&["start", "u"]);
    c.env("KVMBOX_JAIL", "maybe");
    let (st, _, err) = home.run(c);
    assert_eq!(st, 2, "{err}");
    assert!(
        err.contains("KVMBOX_JAIL=maybe: expected on or off"),
        "{err}"
    );
    assert_eq!(home.state("u"), "stopped");
}

/// The keeper's pid (run/NAME/keeper.pid).
fn keeper_pid(home: &Home, name: &str) -> i32 {
    std::fs::read_to_string(home.0.join("run").join(name).join("keeper.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A saved state that names a disk the settings do not have is not resumed in a jail (the
/// VM process wrote it, and the jail would lend that disk to the VM's user); a keeper killed
/// with SIGKILL leaves its jail and the disks lent, which the next start gives back and removes.
#[test]
fn a_forged_saved_state_is_refused_and_a_dead_keepers_jail_is_cleaned_up() {
    let test = "a_forged_saved_state_is_refused_and_a_dead_keepers_jail_is_cleaned_up";
    if !root_kvm_passt_or_skip(test) {
        return;
    }
    let _cpu = CpuLease::shared();
    let home = Home::new("forged");
    create(&home, "f", &["--net", "none", "--disk-size", "16M"]);
    let dir = home.0.join("vms/f");
    let (disk0, disk1) = (dir.join("disk0.qcow2"), dir.join("disk1.qcow2"));
    home.ok(&["start", "f"]);
    home.expect_log("f", "kvmbox-testguest# ", TESTGUEST_TIMEOUT);
    home.ok(&["save", "f"]);
    // As if the VM's settings had only one disk: the saved state names the other.
    let toml_path = dir.join("vm.toml");
    let toml = std::fs::read_to_string(&toml_path).unwrap();
    let one = toml.replace(
        r#"disks = ["disk0.qcow2", "disk1.qcow2"]"#,
        r#"disks = ["disk0.qcow2"]"#,
    );
    assert_ne!(one, toml, "{toml}");
    std::fs::write(&toml_path, &one).unwrap();
    let (st, out, err) = home.run(home.cmd(&["start", "f"]));
    assert_eq!(st, 1, "{out}{err}");
    assert!(
        err.contains(&format!("names the disk {}", disk1.display())),
        "{err}"
    );
    assert_eq!(home.state("f"), "saved");
    assert!(
        !home.0.join("run/f").exists(),
        "the refused start left run/f"
    );
    for d in [&disk0, &disk1] {
        assert_eq!(std::fs::metadata(d).unwrap().uid(), 0, "{}", d.display());
    }
    std::fs::write(&toml_path, &toml).unwrap();
    assert!(home
        .ok(&["start", "f"])
        .contains("resumed from its saved state"));
    let v = home.show("f");
    let uid = v["jail"]["uid"].as_u64().unwrap() as u32;
    let jail_dir = PathBuf::from(v["jail"]["root"].as_str().unwrap())
        .parent()
        .unwrap()
        .to_path_buf();
    let pid = v["pid"].as_u64().unwrap() as i32;

    // SIGKILL to the keeper: the VM dies with it, the jail and the loan of the disks stay.
    let keeper = keeper_pid(&home, "f");
    // SAFETY: a signal to the keeper this test's VM start made.
    let killed = unsafe { libc::kill(keeper, libc::SIGKILL) };
    assert_eq!(killed, 0);
    wait_until("the VM process ends with its keeper", || {
        !Path::new(&format!("/proc/{pid}")).exists()
    });
    assert_eq!(home.state("f"), "crashed");
    assert!(jail_dir.exists());
    assert_eq!(std::fs::metadata(&disk0).unwrap().uid(), uid);
    // The next start removes the old jail and gives the disks back before its own jail lends
    // them again; after a stop they are root's.
    home.ok(&["start", "f"]);
    home.ok(&["stop", "--force", "f"]);
    assert!(!jail_dir.exists(), "{} stayed", jail_dir.display());
    for d in [&disk0, &disk1] {
        assert_eq!(std::fs::metadata(d).unwrap().uid(), 0, "{}", d.display());
    }
}

/// A network namespace the test makes; deleted (with its devices) on drop.
struct NetNs(String);

impl NetNs {
    /// None (after one SKIP line) when `ip netns add` cannot be run here.
    fn new(test: &str) -> Option<Self> {
        let name = format!("kvmbox-jt-{}", std::process::id());
        match Command::new("ip").args(["netns", "add", &name]).output() {
            Ok(o) if o.status.success() => Some(NetNs(name)),
            Ok(o) => {
                skip(
                    test,
                    &format!(
                        "'ip netns add' failed: {}",
                        String::from_utf8_lossy(&o.stderr).trim()
                    ),
                );
                None
            }
            Err(e) => {
                skip(test, &format!("cannot run 'ip' ({e}); install iproute2"));
                None
            }
        }
    }

    /// `ip -n NS args...`, which must succeed.
    fn ip(&self, args: &[&str]) {
        let out = Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip -n {} {args:?}: {}",
            self.0,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A file of TAP `tap` under /sys/class/net as the namespace shows it (None: no such device).
    fn sys(&self, tap: &str, file: &str) -> Option<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "cat"])
            .arg(format!("/sys/class/net/{tap}/{file}"))
            .stderr(Stdio::null())
            .output()
            .expect("ip netns exec cat");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `kvmbox vm args...` of `home`, run in the namespace.
    fn vm(&self, home: &Home, args: &[&str]) -> (i32, String, String) {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0])
            .arg(kvmbox())
            .arg("vm")
            .args(args)
            .env("KVMBOX_HOME", &home.0)
            .env_remove("KVMBOX_JAIL");
        home.run(c)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The `key=value` field of the console log line that starts with `line`.
fn log_field(log: &str, line: &str, key: &str) -> String {
    let l = log
        .lines()
        .find(|l| l.contains(line))
        .unwrap_or_else(|| panic!("no {line:?} in the console log:\n{log}"));
    l.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {l:?}"))
        .to_string()
}

/// A VM with `--net tap=NAME`, started as root inside a network namespace, runs jailed: the
/// keeper attaches each TAP and the VM process inherits the descriptor, so no TAP's owner or
/// persistence changes. A TAP made beforehand (owner 4242, persistent, 10.0.0.1/24, up)
/// carries the test guest's ARP exchange with the kernel; it and one made without an owner
/// keep their owners (4242, none) while the VM runs and after; one kvmbox made exists while
/// the VM runs and is gone after a stop, and after a killed keeper (the VM process dies with
/// it).
#[test]
fn a_tap_network_runs_jailed_and_its_taps_keep_their_owners_in_a_netns() {
    let test = "a_tap_network_runs_jailed_and_its_taps_keep_their_owners_in_a_netns";
    if !root_kvm_passt_or_skip(test) {
        return;
    }
    let Some(ns) = NetNs::new(test) else { return };
    let _cpu = CpuLease::shared();
    let home = Home::new("tap");
    let ok = |args: &[&str]| {
        let (st, out, err) = ns.vm(&home, args);
        assert_eq!(st, 0, "ip netns exec kvmbox vm {args:?}: {out}{err}");
        out
    };
    let jailed_uid = |name: &str| {
        let v = home.show(name);
        assert_eq!(v["jailed"], true, "{v}");
        let uid = v["jail"]["uid"].as_u64().unwrap() as u32;
        let pid = v["pid"].as_u64().unwrap() as u32;
        assert_ne!(uid, 0);
        assert_eq!(status_field(pid, "Uid"), format!("{uid} {uid} {uid} {uid}"));
        assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
        (uid, pid)
    };
    let persistent = |tap: &str| {
        let flags = ns.sys(tap, "tun_flags").unwrap();
        u32::from_str_radix(flags.trim_start_matches("0x"), 16).unwrap() & 0x0800 != 0
    };

    // A TAP made beforehand, owned by uid 4242, and one without an owner.
    let (made, free) = ("kjtmade0", "kjtfree0");
    ns.ip(&["tuntap", "add", "dev", made, "mode", "tap", "user", "4242"]);
    ns.ip(&["addr", "add", "10.0.0.1/24", "dev", made]);
    ns.ip(&["link", "set", made, "up"]);
    ns.ip(&["tuntap", "add", "dev", free, "mode", "tap"]);
    assert_eq!(ns.sys(made, "owner").as_deref(), Some("4242"));
    assert_eq!(ns.sys(free, "owner").as_deref(), Some("-1"));
    let rx_before: u64 = ns
        .sys(made, "statistics/rx_packets")
        .unwrap()
        .parse()
        .unwrap();
    create_running(
        &home,
        "m",
        "tests=net,shell",
        &[
            "--net",
            &format!("tap={made}"),
            "--net",
            &format!("tap={free}"),
        ],
    );
    let out = ok(&["start", "m"]);
    assert!(out.contains("runs jailed as uid"), "{out}");
    home.expect_log("m", "kvmbox-testguest# ", TESTGUEST_TIMEOUT);
    let (_, pid) = jailed_uid("m");
    // Used by the VM process, which holds both, with their owners unchanged.
    assert_eq!(ns.sys(made, "owner").as_deref(), Some("4242"));
    assert_eq!(ns.sys(free, "owner").as_deref(), Some("-1"));
    // (the descriptor the keeper handed over, and the device's duplicate of it).
    let held: std::collections::BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|info| {
            let l = info.lines().find_map(|l| l.strip_prefix("iff:\t"))?;
            Some(l.to_string())
        })
        .collect();
    assert_eq!(
        held,
        [free, made].map(String::from).into(),
        "TAPs the VM holds"
    );
    // The guest's ARP requests went out through the TAP and the kernel answered them.
    let log = home.ok(&["log", "m"]);
    assert_eq!(log_field(&log, "KVMBOX-TEST net ", "sent"), "8", "{log}");
    assert_eq!(
        log_field(&log, "KVMBOX-TEST net ", "arp_replies"),
        "8",
        "{log}"
    );
    assert_eq!(
        log_field(&log, "KVMBOX-TEST net ", "peer_mac"),
        ns.sys(made, "address").unwrap()
    );
    let rx: u64 = ns
        .sys(made, "statistics/rx_packets")
        .unwrap()
        .parse()
        .unwrap();
    assert!(rx >= rx_before + 8, "TAP rx_packets {rx_before} -> {rx}");
    home.ok(&["stop", "--force", "m"]);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    // As they were: owners 4242 and none, both persistent.
    assert_eq!(ns.sys(made, "owner").as_deref(), Some("4242"));
    assert_eq!(ns.sys(free, "owner").as_deref(), Some("-1"));
    assert!(persistent(made) && persistent(free));

    // A TAP kvmbox makes: there (no owner, not persistent) while the VM runs, gone after.
    let new = "kjtnew0";
    create(&home, "n", &["--net", &format!("tap={new}")]);
    assert_eq!(ns.sys(new, "owner"), None);
    ok(&["start", "n"]);
    home.expect_log("n", "kvmbox-testguest# ", TESTGUEST_TIMEOUT);
    jailed_uid("n");
    assert_eq!(ns.sys(new, "owner").as_deref(), Some("-1"));
    assert!(!persistent(new));
    home.ok(&["stop", "--force", "n"]);
    assert_eq!(
        ns.sys(new, "owner"),
        None,
        "kvmbox's TAP stayed after the stop"
    );

    // A killed keeper: the VM process dies with it, and the TAP with the VM process.
    ok(&["start", "n"]);
    let (_, pid) = jailed_uid("n");
    let keeper = keeper_pid(&home, "n");
    // SAFETY: a signal to the keeper this test's VM start made.
    assert_eq!(unsafe { libc::kill(keeper, libc::SIGKILL) }, 0);
    wait_until("the VM process ends with its keeper", || {
        !Path::new(&format!("/proc/{pid}")).exists()
    });
    wait_until("kvmbox's TAP goes with the VM process", || {
        ns.sys(new, "owner").is_none()
    });
    ok(&["delete", "--force", "n"]);
}
