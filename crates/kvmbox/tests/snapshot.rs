//! Snapshots through the API and `kvmbox run --restore`: a VM saved in the middle of its work,
//! the process SIGKILLed, the VM restored in a new process finishes as an uninterrupted run
//! does; damaged snapshot files are refused by name and nothing runs.

mod common;

use common::api::{compute_guest_on_kvm, http, ok, sock_path};
use common::{kvm_or_skip, run_kvmbox, run_testguest, Interactive};
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
    let line = back.expect("KVMBOX-TEST compute", TG) + &back.expect("\n", TG);
    assert!(line.contains(&format!("iters={ITERS}")), "{line}");
    back.expect("KVMBOX-TEST done result=ok", TG);
    assert_eq!(
        back.wait_exit(TG),
        Some(1),
        "debug-exit 0; {}",
        back.stderr()
    );
    let plain = run_testguest("kvm", 2, "128M", &format!("compute:{ITERS}"), &[]);
    plain.assert_guest_ok();
    let result = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("result="))
        .unwrap();
    assert_eq!(plain.get("compute", "result"), result);

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
