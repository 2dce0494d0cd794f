//! Snapshots through the API and `kvmbox run --restore`: a VM saved in the middle of its work,
//! the process SIGKILLed, the VM restored in a new process finishes as an uninterrupted run
//! does; damaged snapshot files are refused by name and nothing runs.

mod common;

use common::api::{
    compute_guest, compute_guest_on_kvm, http, ok, scenario_guest, sock_path, wait_for_socket,
};
use common::{kvm_or_skip, run_kvmbox, run_testguest, CpuLease, Interactive};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Test-guest boots and scenarios on KVM (measured: well under a second).
const TG: Duration = Duration::from_secs(60);
/// Ring-3 work long enough to snapshot in the middle (about 3 s here).
const ITERS: &str = "1000000000";

fn scratch(name: &str) -> PathBuf {
    common::scratch_dir("snapshot").join(name)
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
    // A Diff needs dirty-page tracking, which this VM was started without.
    let diff = body.replace('}', r#", "snapshot_type": "Diff"}"#);
    let (st, v) = http(&sock, "PUT", "/snapshot/create", Some(&diff));
    assert_eq!(st, 400, "{v}");
    assert!(v.to_string().contains("track_dirty_pages"), "{v}");
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

    // The same state as format version 2 wrote it (before the rate limiters were saved: the
    // payload without its last field, which for a VM without disks or networks is two empty
    // lists, bytes 0 0) still restores, and the guest finishes.
    let v2 = scratch("v2");
    std::fs::write(&v2, as_version_2(&good)).unwrap();
    let mut old = Interactive::spawn(&[
        "run",
        "--restore",
        v2.to_str().unwrap(),
        "--restore-mem",
        mem.to_str().unwrap(),
    ]);
    let line = old.expect("KVMBOX-TEST compute", TG) + &old.expect("\n", TG);
    assert!(line.contains(&format!("iters={ITERS}")), "{line}");
    old.expect("KVMBOX-TEST done result=ok", TG);
    assert_eq!(old.wait_exit(TG), Some(1), "{}", old.stderr());
    for p in [&state, &mem, &bad, &small, &v2] {
        let _ = std::fs::remove_file(p);
    }
}

/// A format-3 state file of a VM without disks or network interfaces as format 2 wrote it:
/// its payload without the last field (the rate limiters, two empty lists: bytes 0 0),
/// version 2, the length and the CRC-64/XZ to match.
fn as_version_2(v3: &[u8]) -> Vec<u8> {
    assert_eq!(v3[8..12], 3u32.to_le_bytes(), "a format-3 file");
    let body = v3.len() - 8;
    assert_eq!(v3[body - 2..body], [0, 0], "no limiters at the end");
    let mut v2 = v3[..body - 2].to_vec();
    v2[8..12].copy_from_slice(&2u32.to_le_bytes());
    let len = (v2.len() - 24) as u64;
    v2[16..24].copy_from_slice(&len.to_le_bytes());
    // CRC-64/XZ: reflected ECMA-182 polynomial, all ones in and out.
    let mut crc = u64::MAX;
    for &b in &v2 {
        crc ^= u64::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xC96C_5795_D787_0F42
            } else {
                crc >> 1
            };
        }
    }
    v2.extend_from_slice(&(!crc).to_le_bytes());
    v2
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
    scenario_finishes_like_an_uninterrupted_run(back, "compute", iters, first, what);
}

/// The restored test guest `back`, running `scenario:iters` (a scenario that reports
/// `iters=N result=R`), reports its result within `first`, ends through debug-exit 0, and
/// its result equals an uninterrupted run's on KVM.
fn scenario_finishes_like_an_uninterrupted_run(
    back: &mut Interactive,
    scenario: &str,
    iters: &str,
    first: Duration,
    what: &str,
) {
    let line = back.expect(&format!("KVMBOX-TEST {scenario}"), first) + &back.expect("\n", TG);
    assert!(line.contains(&format!("iters={iters}")), "{what}: {line}");
    back.expect("KVMBOX-TEST done result=ok", TG);
    assert_eq!(
        back.wait_exit(TG),
        Some(1),
        "{what}: debug-exit 0; {}",
        back.stderr()
    );
    let plain = run_testguest("kvm", 2, "128M", &format!("{scenario}:{iters}"), &[]);
    plain.assert_guest_ok();
    let result = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("result="))
        .unwrap_or_else(|| panic!("{what}: no result in {line:?}"));
    assert_eq!(plain.get(scenario, "result"), result, "{what}");
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
    // Enough work that the engine is far from done when it is saved after 1 s: with its JIT
    // it runs 50 M iterations in ~0.6 s (1 G take ~12 s there, ~2 s on KVM).
    restored_on_the_other_engine(
        "emu-to-kvm",
        "emu",
        &["--cpu-model", "portable"],
        "1000000000",
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

/// The test guest's `dirty:spin` scenario (2 vCPUs) on `accel` with dirty-page tracking: a
/// Full snapshot once it filled its 32 MiB buffer, a Diff after at least 100 more of its
/// page-rewriting steps (by its progress lines, not by time), SIGKILL; the Diff's memory
/// merged onto the Full's (`kvmbox snapshot merge`) restores with the Diff's state file and
/// finishes with the result of an uninterrupted run. The Diff carries about one page per step
/// taken between the snapshots; the Full, the whole buffer.
fn diff_snapshot_on_top_of_full(name: &str, accel: &str, spin: &str) {
    let _cpu = CpuLease::shared();
    let sock = sock_path(name);
    let file = |what: &str| scratch(&format!("{name}-{what}"));
    let (full_state, full_mem, diff_state, diff_mem) = (
        file("full"),
        file("full-mem"),
        file("diff"),
        file("diff-mem"),
    );
    let mut vm = scenario_guest(&sock, accel, &["--track-dirty-pages"], "dirty", spin);
    let (st, v) = http(&sock, "GET", "/machine-config", None);
    assert_eq!(
        (st, v["track_dirty_pages"].as_bool()),
        (200, Some(true)),
        "{v}"
    );
    vm.expect("dirty: buffer filled", ENGINE);
    let snapshot = |state: &Path, mem: &Path, kind: &str| {
        ok(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
        let body = format!(
            r#"{{"snapshot_path": "{}", "mem_file_path": "{}", "snapshot_type": "{kind}"}}"#,
            state.display(),
            mem.display()
        );
        ok(&sock, "PUT", "/snapshot/create", &body);
    };
    snapshot(&full_state, &full_mem, "Full");
    // The steps the guest had reported when paused; two more reports are 100 steps or more.
    let reported = vm
        .console()
        .lines()
        .filter_map(|l| {
            l.strip_prefix("dirty: ")?
                .strip_suffix(" steps")?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0u32);
    ok(&sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
    vm.expect(&format!("dirty: {} steps", reported + 200), ENGINE);
    snapshot(&diff_state, &diff_mem, "Diff");
    assert!(vm.kill());
    assert!(
        !vm.console().contains("KVMBOX-TEST dirty"),
        "the guest was to be saved in the middle of its work:\n{}",
        vm.console()
    );
    let on_disk = |p: &Path| {
        let m = std::fs::metadata(p).unwrap();
        assert_eq!(m.len(), 128 << 20, "{}: spans guest RAM", p.display());
        m.blocks() * 512
    };
    let (full, diff) = (on_disk(&full_mem), on_disk(&diff_mem));
    eprintln!("{name}: memory files on disk: full {full} bytes, diff {diff} bytes");
    assert!(
        full >= 32 << 20,
        "the full snapshot holds the guest's buffer: {full} bytes"
    );
    assert!(diff > 0, "the guest wrote pages between the snapshots");
    // At most the 1000 steps' pages, and the few the guest's kernel writes.
    assert!(
        diff <= 5 << 20,
        "the diff carries only what changed: {diff} bytes"
    );
    let merged = run_kvmbox(
        &[
            "snapshot",
            "merge",
            full_mem.to_str().unwrap(),
            diff_mem.to_str().unwrap(),
        ],
        TG,
    );
    assert_eq!(merged.status, Some(0), "{merged:?}");
    assert!(merged.stdout.contains("merged"), "{merged:?}");
    // Restored with tracking, the VM takes Diffs again (of what it wrote since the restore).
    let sock = sock_path(&format!("{name}-back"));
    let mut back = Interactive::spawn(&[
        "run",
        "--restore",
        diff_state.to_str().unwrap(),
        "--restore-mem",
        full_mem.to_str().unwrap(),
        "--track-dirty-pages",
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    wait_for_socket(&mut back, &sock);
    let (st, v) = http(&sock, "GET", "/machine-config", None);
    assert_eq!(
        (st, v["track_dirty_pages"].as_bool()),
        (200, Some(true)),
        "{v}"
    );
    let again = file("again-mem");
    ok(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    let body = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}", "snapshot_type": "Diff"}}"#,
        file("again").display(),
        again.display()
    );
    ok(&sock, "PUT", "/snapshot/create", &body);
    ok(&sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
    assert!(on_disk(&again) <= 5 << 20);
    let what = format!("{name}: full + diff");
    scenario_finishes_like_an_uninterrupted_run(&mut back, "dirty", spin, ENGINE, &what);
    for p in [
        &full_state,
        &full_mem,
        &diff_state,
        &diff_mem,
        &again,
        &file("again"),
    ] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn testguest_on_kvm_restored_from_a_diff_merged_onto_its_full_snapshot() {
    if !kvm_or_skip("testguest_on_kvm_restored_from_a_diff_merged_onto_its_full_snapshot") {
        return;
    }
    diff_snapshot_on_top_of_full("diff-kvm", "kvm", "1000000");
}

#[test]
fn testguest_on_the_engine_restored_from_a_diff_merged_onto_its_full_snapshot() {
    // KVM runs the uninterrupted reference.
    if !kvm_or_skip("testguest_on_the_engine_restored_from_a_diff_merged_onto_its_full_snapshot") {
        return;
    }
    // The steps' spin sets how long the guest takes: with the engine's JIT, 1000 steps of
    // 200000 take ~1.3 s (10000 took 0.09 s, too close to the time the test needs to pause it
    // twice before the guest is done).
    diff_snapshot_on_top_of_full("diff-emu", "emu", "200000");
}

/// A drive and a network interface with rate limiters, each changed by a live PATCH, saved
/// and restored with `kvmbox run --restore`: the restored VM runs under the patched limiters
/// (its `GET /vm/config` shows them, and its disk is still held to one request every 2 s:
/// the test guest's `blk` scenario, 512 requests, has not finished 1.5 s after the restore,
/// however fast the host); lifted live, the guest finishes with its data intact.
#[test]
fn rate_limiters_patched_before_a_snapshot_are_restored_on_kvm() {
    if !kvm_or_skip("rate_limiters_patched_before_a_snapshot_are_restored_on_kvm") {
        return;
    }
    if !common::passt_or_skip("rate_limiters_patched_before_a_snapshot_are_restored_on_kvm") {
        return;
    }
    let (img, state, mem) = (scratch("rl-disk"), scratch("rl-state"), scratch("rl-mem"));
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let sock = sock_path("rl-snap");
    let tg = common::testguest();
    let disk = format!("{},iops=1", img.display());
    let mut vm = Interactive::spawn(&[
        "run",
        "--accel",
        "kvm",
        "--memory",
        "128M",
        "--kernel",
        tg.to_str().unwrap(),
        "--cmdline",
        "tests=hello,blk",
        "--disk",
        &disk,
        "--net",
        "user,tx_iops=100",
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    wait_for_socket(&mut vm, &sock);
    vm.expect("KVMBOX-TEST hello", TG);
    // One request every 2 s instead of every second; the interface's receive side limited.
    let disk_limit = serde_json::json!({"ops": {"size": 1, "refill_time": 2000}});
    let rx_limit = serde_json::json!({"bandwidth": {"size": 123456, "refill_time": 100}});
    let patch = serde_json::json!({"drive_id": "disk0", "rate_limiter": disk_limit});
    ok(&sock, "PATCH", "/drives/disk0", &patch.to_string());
    let patch = serde_json::json!({"iface_id": "net0", "rx_rate_limiter": rx_limit});
    ok(
        &sock,
        "PATCH",
        "/network-interfaces/net0",
        &patch.to_string(),
    );
    ok(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    let body = serde_json::json!({"snapshot_path": state, "mem_file_path": mem});
    ok(&sock, "PUT", "/snapshot/create", &body.to_string());
    assert!(
        !vm.console().contains("KVMBOX-TEST blk"),
        "the limited guest finished before the snapshot:\n{}",
        vm.console()
    );
    assert!(vm.kill());

    let back_sock = sock_path("rl-back");
    let mut back = Interactive::spawn(&[
        "run",
        "--restore",
        state.to_str().unwrap(),
        "--restore-mem",
        mem.to_str().unwrap(),
        "--api-sock",
        back_sock.to_str().unwrap(),
    ]);
    wait_for_socket(&mut back, &back_sock);
    let cfg = http(&back_sock, "GET", "/vm/config", None).1;
    let drive = cfg["drives"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["drive_id"] == "disk0"))
        .unwrap_or_else(|| panic!("no disk0 in {cfg}"));
    assert_eq!(drive["rate_limiter"], disk_limit, "{cfg}");
    let net = cfg["network-interfaces"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["iface_id"] == "net0"))
        .unwrap_or_else(|| panic!("no net0 in {cfg}"));
    assert_eq!(net["rx_rate_limiter"], rx_limit, "{cfg}");
    assert_eq!(
        net["tx_rate_limiter"],
        serde_json::json!({"ops": {"size": 100, "refill_time": 1000}}),
        "{cfg}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !back.console().contains("KVMBOX-TEST blk"),
        "the restored guest is not limited any more:\n{}",
        back.console()
    );
    let lift = r#"{"drive_id": "disk0", "rate_limiter": {"ops": {"size": 0, "refill_time": 0}}}"#;
    ok(&back_sock, "PATCH", "/drives/disk0", lift);
    back.expect("KVMBOX-TEST blk", TG);
    let line = back.expect("\n", TG);
    assert!(line.contains("errors=0 mismatched_words=0"), "{line}");
    back.expect("KVMBOX-TEST done result=ok", TG);
    assert_eq!(back.wait_exit(TG), Some(1), "{}", back.stderr());
    for p in [&img, &state, &mem] {
        let _ = std::fs::remove_file(p);
    }
}
