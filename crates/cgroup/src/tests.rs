use super::*;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// This host's shape: v1 controllers each on its own mount, name=systemd, and a v2 mount
/// with no controller of interest; the process's memory group is nested.
const MOUNTINFO_V1: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpu\\040acct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/both rw,relatime - cgroup cgroup rw,cpuset,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

const PROC_CGROUP_V1: &str = "\
9:name=systemd:/
4:memory:/outer/job1
3:cpuset,pids:/
1:cpu:/
0::/
";

/// A systemd host on cgroup v2 only, inside a cgroup namespace-like bind of /user.slice.
const MOUNTINFO_V2: &str = "\
28 22 0:26 /user.slice /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
";

#[test]
fn mountinfo_lists_cgroup_mounts_with_their_controllers() {
    let m = parse_mountinfo(MOUNTINFO_V1);
    assert_eq!(m.len(), 6, "{m:?}");
    assert_eq!(m[0].controllers, ["cpu"]);
    assert_eq!(m[1].point, Path::new("/sys/fs/cgroup/cpu acct"));
    assert_eq!(m[3].controllers, ["cpuset", "pids"]);
    assert!(m[4].controllers.is_empty(), "name=systemd is no controller");
    assert!(m[5].v2 && m[5].controllers.is_empty());
    let m = parse_mountinfo(MOUNTINFO_V2);
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].root, "/user.slice");
}

#[test]
fn proc_cgroup_gives_each_hierarchy_its_path() {
    let own = parse_proc_cgroup(PROC_CGROUP_V1);
    assert_eq!(own.len(), 5);
    assert_eq!(
        own[1],
        (vec!["memory".to_string()], "/outer/job1".to_string())
    );
    assert_eq!(own[2].0, ["cpuset", "pids"]);
    assert!(own[4].0.is_empty());
}

fn needed(c: &[&str]) -> Vec<String> {
    Hierarchy::needed(c).unwrap()
}

#[test]
fn v1_is_chosen_when_v2_lacks_a_controller() {
    let mounts = parse_mountinfo(MOUNTINFO_V1);
    let own = parse_proc_cgroup(PROC_CGROUP_V1);
    let h = choose(
        &mounts,
        &own,
        &needed(&["cpu", "memory"]),
        Some("hugetlb\n"),
    )
    .unwrap();
    assert_eq!(h.version(), Version::V1);
    assert_eq!(h.roots.len(), 2);
    assert_eq!(h.roots[0].own, Path::new("/sys/fs/cgroup/cpu"));
    assert_eq!(
        h.roots[1].own,
        Path::new("/sys/fs/cgroup/memory/outer/job1")
    );
    // Two controllers on one mount: one folder.
    let h = choose(&mounts, &own, &needed(&["cpuset", "pids"]), None).unwrap();
    assert_eq!(h.roots.len(), 1);
    assert_eq!(h.roots[0].controllers, ["cpuset", "pids"]);
    let e = choose(&mounts, &own, &needed(&["io"]), Some("hugetlb")).unwrap_err();
    assert!(
        e.to_string()
            .contains("cgroup v2 lacks io, cgroup v1 lacks io"),
        "{e}"
    );
    let e = choose(&mounts, &own, &needed(&["io"]), None).unwrap_err();
    assert!(
        e.to_string()
            .contains("cgroup v2 is not mounted, cgroup v1 lacks io"),
        "{e}"
    );
}

#[test]
fn v2_is_chosen_when_its_root_offers_every_controller() {
    let mounts = parse_mountinfo(MOUNTINFO_V2);
    let own = parse_proc_cgroup("0::/user.slice/user-0.slice/session-1.scope\n");
    let h = choose(
        &mounts,
        &own,
        &needed(&["cpu", "memory"]),
        Some("cpuset cpu io memory pids\n"),
    )
    .unwrap();
    assert_eq!(h.version(), Version::V2);
    // The mount shows /user.slice at /sys/fs/cgroup.
    assert_eq!(
        h.roots[0].own,
        Path::new("/sys/fs/cgroup/user-0.slice/session-1.scope")
    );
    let e = choose(&mounts, &own, &needed(&["cpu", "memory"]), Some("cpu pids")).unwrap_err();
    assert!(
        e.to_string()
            .contains("cgroup v2 lacks memory, cgroup v1 lacks cpu"),
        "{e}"
    );
}

#[test]
fn cpu_quota_weight_and_names_are_checked() {
    assert_eq!(
        CpuMax::from_cpus(1.5).unwrap(),
        CpuMax {
            quota_us: 150_000,
            period_us: 100_000
        }
    );
    assert_eq!(CpuMax::from_cpus(0.01).unwrap().quota_us, 1_000);
    for bad in [0.0, -1.0, 0.004, f64::NAN, f64::INFINITY] {
        assert!(CpuMax::from_cpus(bad).is_err(), "{bad}");
    }
    assert_eq!(weight_to_shares(100), 1024);
    assert_eq!(weight_to_shares(1), 10);
    assert_eq!(weight_to_shares(10_000), 102_400);
    assert!(check_weight(0).is_err() && check_weight(10_001).is_err());
    for bad in ["", ".x", "a/b", "a\nb"] {
        assert!(check_name(bad).is_err(), "{bad:?}");
    }
    assert_eq!(check_parent(Path::new("/a/b")).unwrap(), Path::new("a/b"));
    assert!(check_parent(Path::new("a/../b")).is_err());
}

#[test]
fn description_round_trips() {
    let cg = Cgroup {
        version: Version::V1,
        controllers: vec!["cpu".into(), "memory".into()],
        dirs: vec![
            (
                vec!["cpu".into()],
                PathBuf::from("/sys/fs/cgroup/cpu/kvmbox/x"),
            ),
            (
                vec!["memory".into()],
                PathBuf::from("/sys/fs/cgroup/memory/kvmbox/x"),
            ),
        ],
        remove_parent: true,
        stale_removed: false,
    };
    let back = Cgroup::from_arg(&cg.to_arg()).unwrap();
    assert_eq!(back.dirs, cg.dirs);
    assert_eq!(back.controllers, cg.controllers);
    assert!(back.remove_parent);
    assert_eq!(
        back.file("memory.max").unwrap(),
        Path::new("/sys/fs/cgroup/memory/kvmbox/x/memory.max")
    );
    for bad in [
        "cpu",
        "cpu.",
        "cpu/../x",
        "../cpu.x",
        "io.max",
        "cgroup.procs",
    ] {
        assert!(back.file(bad).is_err(), "{bad}");
    }
    assert!(Cgroup::from_arg("v3\n").is_err());
    assert!(Cgroup::from_arg("v1\ncpu\n1").is_err());
}

/// A group name no other test run uses.
fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "unit-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The real hierarchy for cpu and memory, or None (with a SKIP line) where this host has no
/// writable one.
fn host(test: &str) -> Option<Hierarchy> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: {test}: needs root to make cgroups");
        return None;
    }
    match Hierarchy::detect(&["cpu", "memory"]) {
        Ok(h) => Some(h),
        Err(e) => {
            eprintln!("SKIP: {test}: {e}");
            None
        }
    }
}

#[test]
fn a_real_group_holds_the_limits_and_a_process_and_goes_away() {
    let Some(h) = host("a_real_group_holds_the_limits_and_a_process_and_goes_away") else {
        return;
    };
    let name = unique("real");
    let cg = Cgroup::create(&h, None, &name).unwrap();
    assert!(!cg.stale_removed());
    for d in cg.dirs() {
        assert!(d.is_dir(), "{}", d.display());
        assert!(d.ends_with(Path::new(DEFAULT_PARENT).join(&name)));
    }
    cg.set_cpu_max(Some(CpuMax::from_cpus(0.25).unwrap()))
        .unwrap();
    cg.set_cpu_weight(50).unwrap();
    cg.set_memory_limit(Some(64 << 20)).unwrap();
    match cg.version() {
        Version::V1 => {
            assert_eq!(cg.get("cpu.cfs_quota_us").unwrap(), "25000");
            assert_eq!(cg.get("cpu.cfs_period_us").unwrap(), "100000");
            assert_eq!(cg.get("cpu.shares").unwrap(), "512");
            assert_eq!(cg.get("memory.limit_in_bytes").unwrap(), "67108864");
            if cg.file("memory.memsw.limit_in_bytes").unwrap().exists() {
                assert_eq!(cg.get("memory.memsw.limit_in_bytes").unwrap(), "67108864");
            }
            // Raising the limit moves memsw first (the kernel refuses memsw < limit).
            cg.set_memory_limit(Some(128 << 20)).unwrap();
            assert_eq!(cg.get("memory.limit_in_bytes").unwrap(), "134217728");
            // The generic setter, as the jailer's --cgroup cpu.shares=100.
            cg.set("cpu.shares", "100").unwrap();
            assert_eq!(cg.get("cpu.shares").unwrap(), "100");
        }
        Version::V2 => {
            assert_eq!(cg.get("cpu.max").unwrap(), "25000 100000");
            assert_eq!(cg.get("cpu.weight").unwrap(), "50");
            assert_eq!(cg.get("memory.max").unwrap(), "67108864");
            cg.set("cpu.weight", "100").unwrap();
            assert_eq!(cg.get("cpu.weight").unwrap(), "100");
        }
    }
    // The kernel's refusal names the file and the value.
    let e = cg
        .set(cg.dirs().len().to_string().as_str(), "x")
        .unwrap_err();
    assert!(e.to_string().contains("not a cgroup file name"), "{e}");
    let key = if cg.version() == Version::V1 {
        "cpu.shares"
    } else {
        "cpu.weight"
    };
    let e = cg.set(key, "lots").unwrap_err();
    assert!(e.to_string().contains("cannot write \"lots\""), "{e}");
    let e = cg.set("cpu.no_such_file", "1").unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");

    // A process moves in with its threads; the group cannot go while it is there.
    let mut child = Command::new("sleep")
        .arg("30")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    cg.add_process(child.id()).unwrap();
    assert_eq!(cg.procs().unwrap(), [child.id()]);
    // Seen from the process, its own group is this one.
    let seen = Hierarchy::detect_for(child.id(), &["cpu", "memory"]).unwrap();
    assert_eq!(seen.own_dir("memory"), Some(cg.dir_of("memory").unwrap()));
    assert_eq!(seen.own_dir("cpu"), Some(cg.dir_of("cpu").unwrap()));
    assert_eq!(seen.own_dir("io"), None);
    let groups = fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
    assert!(
        groups.contains(&format!("/{DEFAULT_PARENT}/{name}\n")),
        "{groups}"
    );
    // A second kvmbox under the same name is refused, naming the process.
    let e = Cgroup::create(&h, None, &name).unwrap_err();
    assert!(
        e.to_string()
            .contains(&format!("in use by process {}", child.id())),
        "{e}"
    );
    assert!(cg.remove(Duration::ZERO).is_err());
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(cg.oom_kills().unwrap(), 0);
    let limit = if cg.version() == Version::V1 {
        128 << 20
    } else {
        64 << 20
    };
    assert_eq!(cg.memory_limit().unwrap(), Some(limit));
    cg.set_memory_limit(None).unwrap();
    assert_eq!(cg.memory_limit().unwrap(), None);
    cg.remove(REMOVE_WAIT).unwrap();
    for d in cg.dirs() {
        assert!(!d.exists(), "{}", d.display());
    }
}

#[test]
fn a_stale_group_is_made_again_and_a_given_parent_is_used() {
    let Some(h) = host("a_stale_group_is_made_again_and_a_given_parent_is_used") else {
        return;
    };
    let parent = PathBuf::from(unique("parent"));
    let own_parent = |cg: &Cgroup| cg.dirs()[0].parent().unwrap().to_path_buf();
    let first = Cgroup::create(&h, Some(&parent), "vm").unwrap();
    first.set_cpu_weight(200).unwrap();
    // As if that kvmbox had crashed: the group is left behind, empty.
    let again = Cgroup::create(&h, Some(&parent), "vm").unwrap();
    assert!(again.stale_removed());
    let key = if again.version() == Version::V1 {
        "cpu.shares"
    } else {
        "cpu.weight"
    };
    let default = if again.version() == Version::V1 {
        "1024"
    } else {
        "100"
    };
    assert_eq!(again.get(key).unwrap(), default, "made afresh");
    let parents: Vec<PathBuf> = again
        .dirs()
        .iter()
        .map(|d| d.parent().unwrap().to_path_buf())
        .collect();
    assert!(own_parent(&again).ends_with(&parent));
    again.remove(REMOVE_WAIT).unwrap();
    // A parent the caller named stays: it is theirs.
    for p in parents {
        assert!(p.is_dir());
        fs::remove_dir(&p).unwrap();
    }
}

#[test]
fn groups_made_and_removed_at_once_share_the_default_parent() {
    let Some(h) = host("groups_made_and_removed_at_once_share_the_default_parent") else {
        return;
    };
    // Each remove also tries to remove the shared `kvmbox` folder, which the other thread
    // may be about to make its group in: create walks down again then.
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let h = h.clone();
            std::thread::spawn(move || {
                for _ in 0..100 {
                    let cg = Cgroup::create(&h, None, &unique("race")).unwrap();
                    cg.remove(REMOVE_WAIT).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn a_group_that_cannot_be_made_everywhere_is_made_nowhere() {
    let Some(h) = host("a_group_that_cannot_be_made_everywhere_is_made_nowhere") else {
        return;
    };
    if h.version() != Version::V1 {
        eprintln!("SKIP: a_group_that_cannot_be_made_everywhere_is_made_nowhere: one folder on v2");
        return;
    }
    // The memory hierarchy (made second) holds a group of this name with a process in it.
    let name = unique("half");
    let mem_parent = h.own_dir("memory").unwrap().join(DEFAULT_PARENT);
    let busy = mem_parent.join(&name);
    // Other tests remove the shared parent when they leave it empty: make both again then.
    let mut tries = 0;
    while let Err(e) = fs::create_dir_all(&mem_parent).and_then(|()| fs::create_dir(&busy)) {
        tries += 1;
        assert!(tries < 100, "{}: {e}", busy.display());
    }
    let mut child = Command::new("sleep")
        .arg("30")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    fs::write(busy.join("cgroup.procs"), child.id().to_string()).unwrap();
    let e = Cgroup::create(&h, None, &name).unwrap_err();
    assert!(e.to_string().contains("in use by process"), "{e}");
    let cpu_dir = h.own_dir("cpu").unwrap().join(DEFAULT_PARENT).join(&name);
    assert!(!cpu_dir.exists(), "{} was left behind", cpu_dir.display());
    child.kill().unwrap();
    child.wait().unwrap();
    rmdir_waiting(&busy, REMOVE_WAIT).unwrap();
    let _ = fs::remove_dir(&mem_parent);
}
