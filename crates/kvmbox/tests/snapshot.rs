//! Snapshots through the API and `kvmbox run --restore`: a VM saved in the middle of its work,
//! the process SIGKILLed, the VM restored in a new process finishes as an uninterrupted run
//! does; damaged snapshot files are refused by name and nothing runs.

mod common;

use common::api::{compute_guest, compute_guest_on_kvm, http, ok, sock_path};
use common::{kvm_or_skip, run_kvmbox, run_testguest, CpuLease, Interactive};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Test-guest boots and scenarios on KVM (measured: well under a second).
const TG: Duration = Duration::from_secs(60);
/// Ring-3 work long enough to snapshot in the middle (about 3 s here).
const ITERS: &str = "1000000000";

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join("kvmbox-snapshot-tests");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}-{}", std::process::id()))
}

/// `kvmbox run --restore state --restore-mem mem` must fail with status 2 and `needle` on
/// stderr, before any guest output.
fn refused(state: &Path, mem: &Path, needle: &str) {
    let r = run_kvmbox(
        &[
            "run",
            "--restore",
            state.to_str().unwrap(),
            "--restore-mem",
            mem.to_str().unwrap(),
        ],
        TG,
    );
    assert_eq!(r.status, Some(2), "{needle}: {r:?}");
    assert!(r.stderr.contains(needle), "{needle}: stderr {:?}", r.stderr);
    assert!(r.stdout.is_empty(), "the guest ran: {:?}", r.stdout);
}

#[test]
fn testguest_on_kvm_restored_mid_compute_finishes_like_an_uninterrupted_run() {
    if !kvm_or_skip("testguest_on_kvm_restored_mid_compute_finishes_like_an_uninterrupted_run") {
        return;
    }
    let sock = sock_path("snap");
    let state = scratch("state");
    let mem = scratch("mem");
    let mut vm = compute_guest_on_kvm(&sock, ITERS);
    std::thread::sleep(Duration::from_millis(300));
    // Snapshotting a running VM is refused; paused, it is taken.
    let body = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        state.display(),
        mem.display()
    );
    let (st, v) = http(&sock, "PUT", "/snapshot/create", Some(&body));
    assert_eq!(st, 400, "{v}");
    ok(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    ok(&sock, "PUT", "/snapshot/create", &body);
    assert!(
        !vm.console().contains("KVMBOX-TEST compute"),
        "the computation was to be saved in the middle; make ITERS larger"
    );
    // SIGKILL: the old process gets no say in what the new one sees.
    assert!(vm.kill());

    let meta = std::fs::metadata(&mem).unwrap();
    assert_eq!(meta.len(), 128 << 20, "the memory file spans guest RAM");
    assert!(
        meta.blocks() * 512 < 16 << 20,
        "sparse: {} bytes on disk for a small guest",
        meta.blocks() * 512
    );

    let mut back = Interactive::spawn(&[
        "run",
        "--restore",
        state.to_str().unwrap(),
        "--restore-mem",
        mem.to_str().unwrap(),
    ]);
    finishes_like_an_uninterrupted_run(&mut back, ITERS, TG, "kvm -> kvm");

    // Damaged or missing files: refused by name, nothing runs.
    let good = std::fs::read(&state).unwrap();
    let bad = scratch("bad");
    refused(&scratch("missing"), &mem, "No such file");
    std::fs::write(&bad, &good[..good.len() / 2]).unwrap();
    refused(&bad, &mem, "truncated");
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    std::fs::write(&bad, &flipped).unwrap();
    refused(&bad, &mem, "corrupted state file (CRC-64 mismatch)");
    let mut other = good.clone();
    other[8] = 99;
    std::fs::write(&bad, &other).unwrap();
    refused(&bad, &mem, "snapshot format version 99");
    std::fs::write(&bad, b"not a snapshot at all").unwrap();
    refused(&bad, &mem, "not a kvmbox snapshot state file");
    let small = scratch("small");
    std::fs::write(&small, vec![0u8; 1 << 20]).unwrap();
    refused(&state, &small, "smaller than the VM's");
    for p in [&state, &mem, &bad, &small] {
        let _ = std::fs::remove_file(p);
    }
}

/// Longest the engine may take to finish the compute guest's remaining work after a restore:
/// `compute:10000000` on 2 vCPUs took 11 s on the engine at load average 8 (TESTING.md); the
/// tests leave it at most twice that work.
const ENGINE: Duration = Duration::from_secs(300);

/// The restored compute guest `back` (`iters` iterations) reports its result within `first`,
/// ends through debug-exit 0, and its result equals an uninterrupted run's on KVM.
fn finishes_like_an_uninterrupted_run(
    back: &mut Interactive,
    iters: &str,
    first: Duration,
    what: &str,
) {
    let line = back.expect("KVMBOX-TEST compute", first) + &back.expect("\n", TG);
    assert!(line.contains(&format!("iters={iters}")), "{what}: {line}");
    back.expect("KVMBOX-TEST done result=ok", TG);
    assert_eq!(
        back.wait_exit(TG),
        Some(1),
        "{what}: debug-exit 0; {}",
        back.stderr()
    );
    let plain = run_testguest("kvm", 2, "128M", &format!("compute:{iters}"), &[]);
    plain.assert_guest_ok();
    let result = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("result="))
        .unwrap_or_else(|| panic!("{what}: no result in {line:?}"));
    assert_eq!(plain.get("compute", "result"), result, "{what}");
}

/// The compute guest (2 vCPUs) started on `from` with `extra` flags, snapshotted `after` into
/// its `iters` iterations of ring-3 work, SIGKILLed, restored with `--accel to`: it finishes
/// with the result of an uninterrupted run on KVM.
fn restored_on_the_other_engine(
    name: &str,
    from: &str,
    extra: &[&str],
    iters: &str,
    after: Duration,
    to: &str,
) {
    let _cpu = CpuLease::shared();
    let sock = sock_path(name);
    let (state, mem) = (
        scratch(&format!("{name}-state")),
        scratch(&format!("{name}-mem")),
    );
    let mut vm = compute_guest(&sock, from, extra, iters);
    std::thread::sleep(after);
    ok(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    let body = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        state.display(),
        mem.display()
    );
    ok(&sock, "PUT", "/snapshot/create", &body);
    assert!(vm.kill());
    assert!(
        !vm.console().contains("KVMBOX-TEST compute"),
        "the guest was to be saved in the middle of its work:\n{}",
        vm.console()
    );
    let mut back = Interactive::spawn(&[
        "run",
        "--restore",
        state.to_str().unwrap(),
        "--restore-mem",
        mem.to_str().unwrap(),
        "--accel",
        to,
    ]);
    finishes_like_an_uninterrupted_run(&mut back, iters, ENGINE, &format!("{from} -> {to}"));
    for p in [&state, &mem] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn testguest_snapshotted_on_the_engine_finishes_on_kvm() {
    if !kvm_or_skip("testguest_snapshotted_on_the_engine_finishes_on_kvm") {
        return;
    }
    // The engine's own CPU model may show what this host's KVM does not (POPCNT on a nested
    // host): `--cpu-model portable` is the engine's model less that, as the README says.
    restored_on_the_other_engine(
        "emu-to-kvm",
        "emu",
        &["--cpu-model", "portable"],
        "50000000",
        Duration::from_secs(1),
        "kvm",
    );
}

#[test]
fn testguest_snapshotted_on_kvm_with_the_portable_cpu_finishes_on_the_engine() {
    if !kvm_or_skip("testguest_snapshotted_on_kvm_with_the_portable_cpu_finishes_on_the_engine") {
        return;
    }
    // Paused as soon as the API answers: KVM runs the whole computation in well under a second,
    // the engine about 1 us an iteration, so the engine gets most of the work.
    restored_on_the_other_engine(
        "kvm-to-emu",
        "kvm",
        &["--cpu-model", "portable"],
        "20000000",
        Duration::ZERO,
        "emu",
    );
}
