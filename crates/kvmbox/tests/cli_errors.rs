//! Bad input gets one line naming the problem and exit status 2: never a panic, a backtrace
//! or a VM that half-starts.

mod common;

use common::{debian_kernel, kvm_or_skip, run_kvmbox, testguest};
use std::time::Duration;

fn expect_usage_error(args: &[&str], needle: &str) {
    let r = run_kvmbox(args, Duration::from_secs(60));
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
    let dir = std::env::temp_dir().join(format!("kvmbox-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
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
