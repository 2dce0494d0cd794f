//! Bad input gets one line naming the problem and exit status 2: never a panic, a backtrace
//! or a VM that half-starts.

mod common;

use common::{debian_kernel, kvm_or_skip, run_kvmbox, run_kvmbox_env, testguest};
use std::time::Duration;

fn expect_usage_error(args: &[&str], needle: &str) {
    expect_usage_error_env(args, &[], needle);
}

/// [`expect_usage_error`] with `env` added to kvmbox's environment.
fn expect_usage_error_env(args: &[&str], env: &[(&str, &str)], needle: &str) {
    let r = run_kvmbox_env(args, env, Duration::from_secs(60));
    assert_eq!(r.status, Some(2), "{args:?}: status; stderr:\n{}", r.stderr);
    let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: want exactly one line, got:\n{}",
        r.stderr
    );
    assert!(
        lines[0].contains(needle),
        "{args:?}: '{}' does not mention '{needle}'",
        lines[0]
    );
    assert!(
        !r.stderr.contains("panicked") && !r.stderr.contains("backtrace"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.is_empty(), "nothing may run: {}", r.stdout);
}

fn tmpfile(name: &str, contents: &[u8]) -> std::path::PathBuf {
    let p = common::scratch_dir("cli").join(name);
    std::fs::write(&p, contents).unwrap();
    p
}

#[test]
fn missing_kernel_file() {
    expect_usage_error(
        &["run", "--accel", "kvm", "--kernel", "/nonexistent/vmlinuz"],
        "/nonexistent/vmlinuz",
    );
}

#[test]
fn unreadable_kernel_file() {
    // A directory cannot be read as a file, even by root.
    let dir = std::env::temp_dir();
    expect_usage_error(
        &["run", "--accel", "kvm", "--kernel", dir.to_str().unwrap()],
        dir.to_str().unwrap(),
    );
}

#[test]
fn garbage_kernel_file() {
    let p = tmpfile("garbage.bin", &[0x5a; 8192]);
    expect_usage_error(
        &["run", "--accel", "kvm", "--kernel", p.to_str().unwrap()],
        "not a bzImage or ELF",
    );
}

#[test]
fn empty_kernel_file() {
    let p = tmpfile("empty.bin", b"");
    expect_usage_error(
        &["run", "--accel", "kvm", "--kernel", p.to_str().unwrap()],
        p.to_str().unwrap(),
    );
}

#[test]
fn memory_too_small_for_init_size() {
    if !kvm_or_skip("memory_too_small_for_init_size") {
        return;
    }
    let k = debian_kernel();
    expect_usage_error(
        &[
            "run",
            "--accel",
            "kvm",
            "--kernel",
            k.to_str().unwrap(),
            "--memory",
            "48M",
        ],
        "init_size",
    );
}

#[test]
fn cmdline_longer_than_the_kernel_accepts() {
    if !kvm_or_skip("cmdline_longer_than_the_kernel_accepts") {
        return;
    }
    let k = debian_kernel();
    let long = "x".repeat(5000);
    expect_usage_error(
        &[
            "run",
            "--accel",
            "kvm",
            "--kernel",
            k.to_str().unwrap(),
            "--cmdline",
            &long,
        ],
        "command line",
    );
}

#[test]
fn zero_cpus() {
    let g = testguest();
    expect_usage_error(
        &[
            "run",
            "--accel",
            "kvm",
            "--kernel",
            g.to_str().unwrap(),
            "--cpus",
            "0",
        ],
        "vCPU",
    );
}

#[test]
fn a_bad_engine_jit_setting() {
    let g = testguest();
    for bad in ["abc", "-1", "16x", ""] {
        expect_usage_error_env(
            &["run", "--accel", "emu", "--kernel", g.to_str().unwrap()],
            &[("KVMBOX_EMU_JIT", bad)],
            &format!("KVMBOX_EMU_JIT={bad}:"),
        );
    }
}

#[test]
fn more_cpus_than_kvmbox_supports() {
    // The boot tables (xAPIC IDs in the MADT and MP table) stop at 254 vCPUs, below KVM's
    // own limit, whichever backend runs the guest.
    let g = testguest();
    for accel in ["kvm", "emu"] {
        expect_usage_error(
            &[
                "run",
                "--accel",
                accel,
                "--kernel",
                g.to_str().unwrap(),
                "--cpus",
                "100000",
            ],
            "100000 vCPUs",
        );
    }
}

#[test]
fn malformed_cpus_and_sizes() {
    let g = testguest();
    let g = g.to_str().unwrap();
    expect_usage_error(&["run", "--kernel", g, "--cpus", "two"], "--cpus");
    expect_usage_error(&["run", "--kernel", g, "--memory", "12Q"], "12Q");
    expect_usage_error(&["run", "--kernel", g, "--memory", "1.5G"], "1.5G");
    expect_usage_error(&["run", "--kernel", g, "--memory", ""], "size");
    expect_usage_error(&["run", "--kernel", g, "--accel", "hvf"], "hvf");
    expect_usage_error(&["run", "--kernel", g, "--on-reboot", "maybe"], "maybe");
}

#[test]
fn memory_below_the_minimum() {
    let g = testguest();
    expect_usage_error(
        &[
            "run",
            "--accel",
            "kvm",
            "--kernel",
            g.to_str().unwrap(),
            "--memory",
            "1M",
        ],
        "memory",
    );
}

#[test]
fn config_file_errors() {
    let g = testguest();
    let bad_key = tmpfile(
        "bad-key.toml",
        format!("kernel = {:?}\nmemroy = \"1G\"\n", g).as_bytes(),
    );
    expect_usage_error(&["run", "--config", bad_key.to_str().unwrap()], "memroy");
    let bad_toml = tmpfile("bad.toml", b"kernel = \n");
    expect_usage_error(&["run", "--config", bad_toml.to_str().unwrap()], "bad.toml");
    expect_usage_error(
        &["run", "--config", "/nonexistent.toml"],
        "/nonexistent.toml",
    );
    let bad_type = tmpfile(
        "bad-type.toml",
        format!("kernel = {:?}\ncpus = \"many\"\n", g).as_bytes(),
    );
    expect_usage_error(&["run", "--config", bad_type.to_str().unwrap()], "cpus");
}

#[test]
fn no_kernel_at_all() {
    expect_usage_error(&["run"], "kernel");
}

#[test]
fn unknown_flag() {
    expect_usage_error(&["run", "--kernal", "x"], "--kernal");
}

/// A terminal's settings, as the fields `tcgetattr` reports.
fn term_settings(fd: i32) -> (u32, u32, u32, u32, Vec<u8>) {
    // SAFETY: termios is plain data, filled by tcgetattr (checked).
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an open terminal and `t` a valid termios.
    assert_eq!(unsafe { libc::tcgetattr(fd, &mut t) }, 0, "tcgetattr");
    (t.c_iflag, t.c_oflag, t.c_cflag, t.c_lflag, t.c_cc.to_vec())
}

/// `kill -TERM` (and INT, HUP, QUIT) while the guest runs on a terminal: kvmbox stops the VM,
/// says "terminating on signal N", exits with status 8 and leaves the terminal as it found it.
#[test]
fn stop_signals_restore_the_terminal() {
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::process::{Command, Stdio};
    use std::sync::{Arc, Mutex};
    let g = testguest();
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT] {
        let (mut master, mut slave) = (0, 0);
        // SAFETY: openpty writes two fds into the given ints; the other arguments may be null.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty");
        // SAFETY: both fds were just opened by openpty and are owned here alone.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        use std::os::fd::AsRawFd;
        let before = term_settings(slave.as_raw_fd());
        let mut child = Command::new(common::kvmbox())
            .args([
                "run",
                "--accel",
                "emu",
                "--memory",
                "64M",
                "--cmdline",
                "tests=shell",
            ])
            .arg("--kernel")
            .arg(&g)
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kvmbox");
        let out = Arc::new(Mutex::new(Vec::new()));
        let mut stdout = child.stdout.take().unwrap();
        let sink = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let start = std::time::Instant::now();
        while !String::from_utf8_lossy(&out.lock().unwrap()).contains("KVMBOX-TEST shell ready") {
            assert!(
                start.elapsed() < Duration::from_secs(60) && child.try_wait().unwrap().is_none(),
                "the shell did not start: {}",
                String::from_utf8_lossy(&out.lock().unwrap())
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_ne!(
            term_settings(slave.as_raw_fd()),
            before,
            "kvmbox should have put the terminal in raw mode"
        );
        // SAFETY: kill sends a signal to the child this test started.
        assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
        let start = std::time::Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!("kvmbox did not stop on signal {sig}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert_eq!(
            status.code(),
            Some(8),
            "signal {sig}: {status}; stderr:\n{err}"
        );
        assert!(
            err.contains(&format!("terminating on signal {sig}")),
            "signal {sig}: stderr:\n{err}"
        );
        assert_eq!(
            term_settings(slave.as_raw_fd()),
            before,
            "signal {sig} left the terminal changed"
        );
        drop(master);
    }
}

/// A FIFO in a fresh temporary directory (nothing ever writes to it).
fn fifo(name: &str) -> std::path::PathBuf {
    let p = tmpfile(name, b"");
    std::fs::remove_file(&p).unwrap();
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    p
}

#[test]
fn config_that_is_not_a_regular_file() {
    // /dev/zero and /dev/urandom never end; a FIFO nobody writes to blocks forever.
    for dev in ["/dev/zero", "/dev/urandom"] {
        expect_usage_error(
            &["run", "--config", dev],
            "is a character device, not a regular file",
        );
    }
    let f = fifo("config.fifo");
    expect_usage_error(
        &["run", "--config", f.to_str().unwrap()],
        "is a FIFO, not a regular file",
    );
    let big = tmpfile("big.toml", &vec![b'#'; (1 << 20) + 1]);
    expect_usage_error(
        &["run", "--config", big.to_str().unwrap()],
        "larger than 1024 KiB",
    );
}

#[test]
fn images_that_are_not_regular_files() {
    let g = testguest();
    let g = g.to_str().unwrap();
    let f = fifo("image.fifo");
    let f = f.to_str().unwrap();
    expect_usage_error(&["run", "--kernel", f], "kernel");
    expect_usage_error(&["run", "--kernel", f], "is a FIFO, not a regular file");
    expect_usage_error(&["run", "--kernel", "/dev/zero"], "is a character device");
    expect_usage_error(&["run", "--kernel", g, "--initrd", f], "initrd");
    expect_usage_error(
        &["run", "--kernel", g, "--initrd", "/dev/urandom"],
        "character device",
    );
    expect_usage_error(
        &["run", "--kernel", g, "--disk", f],
        "is a FIFO, not a regular file or a block device",
    );
    expect_usage_error(
        &["run", "--kernel", g, "--disk", "/dev/null,ro"],
        "is a character device, not a regular file or a block device",
    );
}

#[test]
fn memory_beyond_the_host_is_refused_alike_by_both_engines() {
    let g = testguest();
    let g = g.to_str().unwrap();
    for accel in ["kvm", "emu"] {
        expect_usage_error(
            &["run", "--accel", accel, "--kernel", g, "--memory", "16T"],
            "guest memory of 16 TiB: more than this host's RAM + swap",
        );
        // A size is never rounded away in a message.
        expect_usage_error(
            &["run", "--accel", accel, "--kernel", g, "--memory", "4095B"],
            "guest memory of 4095 bytes: less than the minimum of 16 MiB",
        );
        expect_usage_error(
            &["run", "--accel", accel, "--kernel", g, "--memory", "65537K"],
            "guest memory of 65537 KiB: 67109888 bytes is not a multiple of the 4 KiB page size",
        );
    }
}

/// Relative paths in a config file are relative to the file, wherever kvmbox runs from.
#[test]
fn config_paths_are_relative_to_the_file() {
    let dir = std::env::temp_dir().join(format!("kvmbox-cli-rel-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::copy(testguest(), dir.join("images/guest.elf")).unwrap();
    let cfg = dir.join("vm.toml");
    std::fs::write(
        &cfg,
        "kernel = \"images/guest.elf\"\ncmdline = \"tests=hello\"\nmemory = 64\naccel = \"emu\"\n",
    )
    .unwrap();
    // The test runs in the crate's directory, where images/guest.elf does not exist.
    assert!(!std::path::Path::new("images/guest.elf").exists());
    let r = run_kvmbox(
        &["run", "--config", cfg.to_str().unwrap()],
        Duration::from_secs(60),
    );
    r.assert_guest_ok();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `kvmbox disk check` exit statuses (those of `qemu-img check`): 0 clean, 3 leaked clusters
/// only, 2 corruption, 1 the check could not run; raw images have nothing to check; `--repair`
/// frees leaks and leaves a damaged image alone.
#[test]
fn disk_check_exit_statuses() {
    let t = Duration::from_secs(60);
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
    let raw = tmpfile("chk.raw", &data);
    let q = raw.with_file_name("chk.qcow2");
    let _ = std::fs::remove_file(&q);
    let (rs, qs) = (raw.to_str().unwrap(), q.to_str().unwrap());
    let r = run_kvmbox(&["disk", "check", rs], t);
    assert_eq!(r.status, Some(0), "{}", r.stderr);
    assert!(r.stdout.contains("nothing to check"), "{}", r.stdout);
    assert_eq!(run_kvmbox(&["disk", "convert", rs, qs], t).status, Some(0));
    let r = run_kvmbox(&["disk", "check", qs], t);
    assert_eq!(r.status, Some(0), "{}", r.stdout);
    assert!(r.stdout.contains("No errors were found"), "{}", r.stdout);

    // Drop L2 entry 1: its cluster keeps refcount 1, referenced by nothing.
    let l2_entry = |v: &[u8], i: usize| {
        let l1 = u64::from_be_bytes(v[40..48].try_into().unwrap()) as usize;
        let l2 = u64::from_be_bytes(v[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00;
        l2 as usize + i * 8
    };
    let mut v = std::fs::read(&q).unwrap();
    let at = l2_entry(&v, 1);
    v[at..at + 8].fill(0);
    std::fs::write(&q, &v).unwrap();
    let r = run_kvmbox(&["disk", "check", qs], t);
    assert_eq!(r.status, Some(3), "{}", r.stdout);
    assert!(r.stdout.contains("1 leaked clusters"), "{}", r.stdout);
    let r = run_kvmbox(&["disk", "check", "--json", qs], t);
    assert_eq!(r.status, Some(3), "{}", r.stdout);
    assert!(r.stdout.contains("\"leaks\": 1"), "{}", r.stdout);
    let r = run_kvmbox(&["disk", "check", "--repair", qs], t);
    assert_eq!(r.status, Some(0), "{}", r.stdout);
    assert_eq!(run_kvmbox(&["disk", "check", qs], t).status, Some(0));

    // An L2 entry past the end of the file: corruption, not repaired.
    let mut v = std::fs::read(&q).unwrap();
    let at = l2_entry(&v, 2);
    v[at..at + 8].copy_from_slice(&((1u64 << 63) | (1 << 40)).to_be_bytes());
    std::fs::write(&q, &v).unwrap();
    let r = run_kvmbox(&["disk", "check", "--repair", qs], t);
    assert_eq!(r.status, Some(2), "{}", r.stdout);
    assert!(r.stdout.contains("Not repaired"), "{}", r.stdout);
    assert!(
        std::fs::read(&q).unwrap() == v,
        "a damaged image was changed"
    );

    let gone = raw.with_file_name("no-such.qcow2");
    let r = run_kvmbox(&["disk", "check", gone.to_str().unwrap()], t);
    assert_eq!(r.status, Some(1));
    assert!(r.stderr.contains("no-such.qcow2"), "{}", r.stderr);
    expect_usage_error(&["disk", "snapshot", qs, "create"], "missing NAME");
    for p in [raw, q] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn snapshot_merge_refuses_missing_and_mismatched_files() {
    let base = tmpfile("merge-base", &[0u8; 8192]);
    let diff = tmpfile("merge-diff", &[1u8; 4096]);
    expect_usage_error(
        &[
            "snapshot",
            "merge",
            base.to_str().unwrap(),
            "/nonexistent/diff.mem",
        ],
        "/nonexistent/diff.mem: No such file",
    );
    expect_usage_error(
        &[
            "snapshot",
            "merge",
            base.to_str().unwrap(),
            diff.to_str().unwrap(),
        ],
        "not a diff of the same VM",
    );
    // Nothing was written to the base.
    assert_eq!(std::fs::read(&base).unwrap(), vec![0u8; 8192]);
    for p in [&base, &diff] {
        let _ = std::fs::remove_file(p);
    }
}

/// `--net user`: a forwarded host port that is taken, or given twice, is refused with one
/// line naming the rule, before any guest runs (and before passt starts); so is a restart on
/// reboot under the seccomp filters.
#[test]
fn user_network_refuses_taken_and_repeated_hostfwd_ports() {
    let kernel = testguest();
    let kernel = kernel.to_str().unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tp = tcp.local_addr().unwrap().port();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let up = udp.local_addr().unwrap().port();
    for (net, needle) in [
        (
            format!("user,hostfwd=tcp::{tp}-:80"),
            format!("hostfwd tcp:127.0.0.1:{tp}-:80: cannot listen on 127.0.0.1:{tp}"),
        ),
        (
            format!("user,hostfwd=udp:127.0.0.1:{up}-10.0.2.15:53"),
            format!("hostfwd udp:127.0.0.1:{up}-:53: cannot listen on 127.0.0.1:{up}"),
        ),
        (
            "user,hostfwd=tcp::1-:2,hostfwd=tcp:127.0.0.1:1-:3".to_string(),
            "use the same host port".to_string(),
        ),
        (
            "user,hostfwd=tcp::2222-10.0.2.16:22".to_string(),
            "must be 10.0.2.15".to_string(),
        ),
    ] {
        expect_usage_error(
            &["run", "--accel", "emu", "--kernel", kernel, "--net", &net],
            &needle,
        );
    }
    // A restart would have to start passt again under the seccomp filters.
    expect_usage_error(
        &[
            "run",
            "--accel",
            "emu",
            "--kernel",
            kernel,
            "--net",
            "user",
            "--on-reboot",
            "restart",
        ],
        "--net user with --on-reboot restart needs --no-seccomp",
    );
}

/// Bad rate-limit options on `--disk` and `--net` are one usage line naming the option.
#[test]
fn bad_rate_limit_options_name_the_option() {
    let g = testguest();
    let g = g.to_str().unwrap();
    let img = std::env::temp_dir().join(format!("kvmbox-cli-rl-{}.img", std::process::id()));
    std::fs::write(&img, [0u8; 512]).unwrap();
    let disk = |opts: &str| format!("{}{opts}", img.display());
    expect_usage_error(
        &["run", "--kernel", g, "--disk", &disk(",bw=fast")],
        "bw=fast: expected a number, optionally with K, M, G or T",
    );
    expect_usage_error(
        &["run", "--kernel", g, "--disk", &disk(",iops=0")],
        "iops=0: must be above 0",
    );
    expect_usage_error(
        &["run", "--kernel", g, "--disk", &disk(",bw_burst=1M")],
        "bw_burst and bw_refill need bw",
    );
    expect_usage_error(
        &["run", "--kernel", g, "--net", "tap=t0,tx_iops_refill=10x"],
        "tx_iops_refill=10x",
    );
    expect_usage_error(
        &["run", "--kernel", g, "--net", "tap=t0,rx_iops_burst=5"],
        "rx_iops_burst and rx_iops_refill need rx_iops",
    );
    expect_usage_error(
        &["run", "--kernel", g, "--net", "tap=t0,up_bw=1M"],
        "unknown option 'up_bw=1M'",
    );
    let _ = std::fs::remove_file(&img);
}
