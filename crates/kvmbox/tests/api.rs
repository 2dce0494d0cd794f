//! The Firecracker-compatible API on `kvmbox run --api-sock`: a client session written as a
//! Firecracker client writes it (plain HTTP/1.1 over the Unix socket, Firecracker's documented
//! bodies), bad input, pause/resume on both engines, and the ACPI power button.

mod common;

use common::api::{
    compute_guest_on_kvm, exchange, http, ok, refused, sock_path, state, wait_for_socket,
};
use common::{kit_cmd, kvm_or_skip, linux_kit, testguest, CpuLease, Interactive};
use serde_json::json;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Test-guest boots and scenarios on KVM (measured: well under a second).
const TG: Duration = Duration::from_secs(60);
/// Debian's kernel on the engine, to userspace (measured: 10-30 s; loaded CI machines more).
const LINUX: Duration = Duration::from_secs(600);

fn scratch_image(name: &str, len: u64) -> PathBuf {
    let p = std::env::temp_dir()
        .join("kvmbox-lifecycle-tests")
        .join(format!("{name}-{}.img", std::process::id()));
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(len).unwrap();
    p
}

/// CPU time (user + system, in clock ticks) of `pid`'s threads named `vcpu*`.
fn vcpu_cpu_ticks(pid: u32) -> u64 {
    let mut total = 0;
    for t in common::task_dirs(pid) {
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        if !comm.starts_with("vcpu") {
            continue;
        }
        let stat = std::fs::read_to_string(t.join("stat")).unwrap_or_default();
        // Fields after the ")" that ends the name: state is 3rd, utime 14th, stime 15th.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        total += f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        total += f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    total
}

#[test]
fn firecracker_client_session_on_kvm() {
    if !kvm_or_skip("firecracker_client_session_on_kvm") {
        return;
    }
    let sock = sock_path("session");
    let log = sock.with_extension("log");
    let _ = std::fs::remove_file(&log);
    let disk = scratch_image("session", 1 << 20);
    let mut vm = Interactive::spawn(&[
        "run",
        "--accel",
        "kvm",
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    wait_for_socket(&mut vm, &sock);

    // Before configuration: Firecracker's answers.
    let (st, info) = http(&sock, "GET", "/", None);
    assert_eq!(st, 200);
    assert_eq!(info["state"], "Not started");
    assert_eq!(info["app_name"], "kvmbox");
    let (st, v) = http(&sock, "GET", "/version", None);
    assert_eq!(st, 200);
    assert!(v["firecracker_version"].is_string(), "{v}");

    // The session a Firecracker getting-started guide runs, bodies as documented.
    let log_body = json!({"log_path": log, "level": "Info", "show_level": true}).to_string();
    ok(&sock, "PUT", "/logger", &log_body);
    ok(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 128, "smt": false}"#,
    );
    let boot = json!({
        "kernel_image_path": testguest(),
        "boot_args": "tests=smp,blk,shell",
    })
    .to_string();
    ok(&sock, "PUT", "/boot-source", &boot);
    let drive = json!({
        "drive_id": "rootfs",
        "path_on_host": disk,
        "is_root_device": true,
        "is_read_only": false,
    })
    .to_string();
    ok(&sock, "PUT", "/drives/rootfs", &drive);
    ok(&sock, "PUT", "/entropy", "{}");
    let (st, mc) = http(&sock, "GET", "/machine-config", None);
    assert_eq!(st, 200);
    assert_eq!(mc["vcpu_count"], 2);
    assert_eq!(mc["mem_size_mib"], 128);
    assert_eq!(state(&sock), "Not started");

    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    assert_eq!(state(&sock), "Running");
    // The guest saw what the API configured: two vCPUs and the drive.
    vm.expect("KVMBOX-TEST smp expected=2 online=2", TG);
    vm.expect("KVMBOX-TEST blk", TG);
    let line = vm.expect("\n", TG);
    for want in ["capacity_sectors=2048", "errors=0", "mismatched_words=0"] {
        assert!(line.contains(want), "blk scenario: {line}");
    }
    vm.expect("kvmbox-testguest# ", TG);

    let (st, full) = http(&sock, "GET", "/vm/config", None);
    assert_eq!(st, 200);
    assert_eq!(full["machine-config"]["accel"], "kvm", "{full}");
    assert_eq!(full["machine-config"]["vcpu_count"], 2, "{full}");
    assert_eq!(full["drives"][0]["drive_id"], "rootfs", "{full}");
    assert_eq!(full["drives"][0]["is_root_device"], true, "{full}");
    assert!(
        full["boot-source"]["boot_args"]
            .as_str()
            .unwrap_or_default()
            .ends_with("root=/dev/vda rw"),
        "{full}"
    );
    assert!(full["entropy"].is_object(), "{full}");

    // Wrong state: start twice, configure after start, snapshot while running.
    refused(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        "cannot start the VM while the VM is running",
    );
    refused(
        &sock,
        "PUT",
        "/boot-source",
        Some(&boot),
        "only before InstanceStart",
    );
    refused(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(r#"{"snapshot_path": "/tmp/x", "mem_file_path": "/tmp/y"}"#),
        "pause it first",
    );
    refused(
        &sock,
        "PUT",
        "/snapshot/delete",
        Some(r#"{"disk_snapshot": "vm-x"}"#),
        "cannot delete a disk snapshot while the VM is running (pause it first",
    );
    refused(
        &sock,
        "PATCH",
        "/vm",
        Some(r#"{"state": "Resumed"}"#),
        "running",
    );

    // Pause and resume, then the guest shell still answers.
    ok(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    assert_eq!(state(&sock), "Paused");
    refused(
        &sock,
        "PATCH",
        "/vm",
        Some(r#"{"state": "Paused"}"#),
        "paused",
    );
    // A live disk snapshot (kvmbox's disk_snapshot) needs qcow2 disks: the raw drive is
    // refused by name before anything is written; an empty name too.
    let (st_file, mem_file) = (sock.with_extension("state"), sock.with_extension("mem"));
    let snap = |name: &str| {
        json!({"snapshot_path": st_file, "mem_file_path": mem_file, "disk_snapshot": name})
            .to_string()
    };
    refused(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(&snap("vm-x")),
        &format!(
            "disk '{}' is not a qcow2 image: only qcow2 images hold internal snapshots",
            disk.display()
        ),
    );
    refused(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(&snap("")),
        "disk_snapshot",
    );
    assert!(!st_file.exists() && !mem_file.exists(), "nothing written");
    // kvmbox's PUT /snapshot/delete: the raw drive holds no snapshot, so there is nothing to
    // delete (a disk without the snapshot is left as it is); an empty name is refused.
    let (st, v) = http(
        &sock,
        "PUT",
        "/snapshot/delete",
        Some(r#"{"disk_snapshot": "vm-x"}"#),
    );
    assert_eq!((st, v.clone()), (200, json!({"deleted_on": []})), "{v}");
    refused(
        &sock,
        "PUT",
        "/snapshot/delete",
        Some(r#"{"disk_snapshot": ""}"#),
        "disk_snapshot: '': a snapshot name must be 1 to 255 bytes",
    );
    ok(&sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
    assert_eq!(state(&sock), "Running");
    vm.send(b"smp\n");
    vm.expect("KVMBOX-TEST smp expected=2 online=2 apic_ids=0,1", TG);
    vm.send(b"poweroff\n");
    assert_eq!(vm.wait_exit(TG), Some(0), "the guest's ACPI power-off");
    assert!(!sock.exists(), "the socket is removed when kvmbox ends");
    let logged = std::fs::read_to_string(&log).unwrap();
    for line in ["VM Running", "VM Paused", "VM Stopped"] {
        assert!(logged.contains(line), "log lacks {line:?}:\n{logged}");
    }
    let _ = std::fs::remove_file(&disk);
    let _ = std::fs::remove_file(&log);
}

#[test]
fn bad_input_gets_400_naming_the_problem_and_changes_nothing() {
    let sock = sock_path("bad");
    let mut vm = Interactive::spawn(&["run", "--api-sock", sock.to_str().unwrap()]);
    wait_for_socket(&mut vm, &sock);
    let mc = |sock: &Path| http(sock, "GET", "/machine-config", None).1;
    let before = mc(&sock);

    refused(
        &sock,
        "PUT",
        "/machine-config",
        Some("{\"vcpu_count\": 2,"),
        "invalid JSON",
    );
    refused(
        &sock,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 2, "mem_size_mib": 256, "mem_size": 1}"#),
        "unknown field `mem_size`",
    );
    refused(
        &sock,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": "two", "mem_size_mib": 256}"#),
        "invalid type",
    );
    refused(
        &sock,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 2, "mem_size_mib": 256, "smt": true}"#),
        "smt",
    );
    refused(
        &sock,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 2, "mem_size_mib": 256, "cpu_template": "T2"}"#),
        "cpu_template",
    );
    refused(
        &sock,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 33, "mem_size_mib": 256}"#),
        "vcpu_count",
    );
    refused(
        &sock,
        "PATCH",
        "/machine-config",
        Some(r#"{"accel": "quantum"}"#),
        "quantum",
    );
    assert_eq!(mc(&sock), before, "refused updates change nothing");

    refused(
        &sock,
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#),
        "/nonexistent/vmlinux",
    );
    refused(
        &sock,
        "PUT",
        "/drives/d1",
        Some(r#"{"drive_id": "d1", "path_on_host": "/nonexistent.img", "is_root_device": false}"#),
        "path_on_host",
    );
    refused(
        &sock,
        "PUT",
        "/drives/d1",
        Some(r#"{"drive_id": "d2", "path_on_host": "/dev/null", "is_root_device": false}"#),
        "does not match",
    );
    refused(
        &sock,
        "PUT",
        "/drives/d1",
        Some(
            r#"{"drive_id": "d1", "path_on_host": "/dev/null", "is_root_device": false, "rate_limiter": {"bandwidth": {"size": 1}}}"#,
        ),
        "rate_limiter: missing field `refill_time`",
    );
    refused(
        &sock,
        "PUT",
        "/drives/d1",
        Some(
            r#"{"drive_id": "d1", "path_on_host": "/dev/null", "is_root_device": false, "rate_limiter": {"ops": {"size": -1, "refill_time": 1}}}"#,
        ),
        "rate_limiter: invalid value",
    );
    refused(
        &sock,
        "PUT",
        "/network-interfaces/eth0",
        Some(
            r#"{"iface_id": "eth0", "host_dev_name": "tap0", "tx_rate_limiter": {"ops": {"size": 1, "refill_time": 18446744073709551615}}}"#,
        ),
        "tx_rate_limiter: ops.refill_time",
    );
    refused(
        &sock,
        "PUT",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id": "eth0", "host_dev_name": "tap0", "rx_rate_limiter": {"bytes": {}}}"#),
        "rx_rate_limiter: unknown field `bytes`",
    );
    refused(
        &sock,
        "PUT",
        "/drives/d1",
        Some(
            r#"{"drive_id": "d1", "path_on_host": "/dev/null", "is_root_device": false, "format": "vdi"}"#,
        ),
        "format: unknown format 'vdi'",
    );
    refused(
        &sock,
        "PUT",
        "/drives/d1",
        Some(
            r#"{"drive_id": "d1", "path_on_host": "/dev/null", "is_root_device": false, "serial": "123456789012345678901"}"#,
        ),
        "serial: serial '123456789012345678901' must be 1 to 20 bytes",
    );
    refused(
        &sock,
        "PUT",
        "/drives/d1",
        Some(
            r#"{"drive_id": "d1", "path_on_host": "/dev/null", "is_root_device": false, "serial": "a,b"}"#,
        ),
        "serial: ",
    );
    refused(
        &sock,
        "PUT",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id": "eth0", "host_dev_name": "tap0", "mtu": 1400}"#),
        "mtu",
    );
    refused(
        &sock,
        "PUT",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id": "eth0", "host_dev_name": "tap0", "user_net": {}}"#),
        "tap=NAME goes with neither user nor hostfwd",
    );
    refused(
        &sock,
        "PUT",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id": "eth0", "user_net": {"hostfwd": ["tcp::0-:22"]}}"#),
        "'0' is not a port",
    );
    refused(
        &sock,
        "PUT",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id": "eth0", "user_net": {"hostfwd": ["tcp::1-:2,mac=x"]}}"#),
        "one rule per entry",
    );
    refused(
        &sock,
        "PUT",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id": "eth0"}"#),
        "host_dev_name (a TAP device) or user_net",
    );
    refused(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "Reboot"}"#),
        "Reboot",
    );
    refused(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        "no kernel",
    );
    refused(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
        "metrics",
    );
    refused(
        &sock,
        "PATCH",
        "/vm",
        Some(r#"{"state": "Paused"}"#),
        "cannot pause the VM while the VM is not started",
    );
    refused(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
        "not started",
    );
    refused(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(r#"{"snapshot_path": "/tmp/x", "mem_file_path": "/tmp/y"}"#),
        "cannot create a snapshot while the VM is not started",
    );
    refused(
        &sock,
        "PUT",
        "/snapshot/load",
        Some(r#"{"snapshot_path": "/tmp/x"}"#),
        "mem_backend",
    );
    refused(&sock, "GET", "/nowhere", None, "GET /nowhere");
    refused(&sock, "DELETE", "/vm", None, "DELETE /vm");

    // An oversized body is refused before it is read; a malformed request line too.
    let big = format!(
        "PUT /machine-config HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        10 << 20
    );
    let (st, v) = exchange(&sock, big.as_bytes());
    assert_eq!(st, 400, "{v}");
    assert!(
        v["fault_message"]
            .as_str()
            .unwrap()
            .contains("larger than the limit"),
        "{v}"
    );
    let (st, _) = exchange(&sock, b"NOT HTTP AT ALL\r\n\r\n");
    assert_eq!(st, 400);

    // Still consistent and serving.
    assert_eq!(state(&sock), "Not started");
    ok(
        &sock,
        "PATCH",
        "/machine-config",
        r#"{"mem_size_mib": 256, "accel": "kvm"}"#,
    );
    // A user network is accepted as --net user is, and shows in the configuration.
    ok(
        &sock,
        "PUT",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "user_net": {"hostfwd": ["tcp::2222-:22"]}, "guest_mac": "52:54:00:12:34:56"}"#,
    );
    let cfg = http(&sock, "GET", "/vm/config", None).1;
    assert_eq!(
        cfg["network-interfaces"][0]["user_net"]["hostfwd"][0], "tcp::2222-:22",
        "{cfg}"
    );
    // Each direction's limiter is patched on its own.
    ok(
        &sock,
        "PATCH",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "tx_rate_limiter": {"bandwidth": {"size": 125000, "refill_time": 100}}}"#,
    );
    ok(
        &sock,
        "PATCH",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "rx_rate_limiter": {"ops": {"size": 100, "refill_time": 1000}}}"#,
    );
    let cfg = http(&sock, "GET", "/vm/config", None).1;
    let eth0 = &cfg["network-interfaces"][0];
    assert_eq!(
        eth0["tx_rate_limiter"]["bandwidth"]["size"], 125000,
        "{cfg}"
    );
    assert_eq!(eth0["rx_rate_limiter"]["ops"]["size"], 100, "{cfg}");
    refused(
        &sock,
        "PATCH",
        "/network-interfaces/eth9",
        Some(r#"{"iface_id": "eth9", "rx_rate_limiter": {}}"#),
        "iface_id: no interface 'eth9'",
    );
    // Rate limiters are accepted in Firecracker's shape and patched by its rule before the
    // start: a bucket given replaces, one absent stays, a zero size removes.
    let img = scratch_image("api-rl", 1 << 20);
    let drive = serde_json::json!({
        "drive_id": "rl", "path_on_host": img, "is_root_device": false,
        "rate_limiter": {"bandwidth": {"size": 1048576, "refill_time": 100},
                         "ops": {"size": 10, "one_time_burst": 5, "refill_time": 1000}}
    });
    ok(&sock, "PUT", "/drives/rl", &drive.to_string());
    ok(
        &sock,
        "PATCH",
        "/drives/rl",
        r#"{"drive_id": "rl", "rate_limiter": {"bandwidth": {"size": 0, "refill_time": 0}}}"#,
    );
    let cfg = http(&sock, "GET", "/vm/config", None).1;
    let d = cfg["drives"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["drive_id"] == "rl")
        .unwrap();
    assert_eq!(
        d["rate_limiter"],
        serde_json::json!({"ops": {"size": 10, "one_time_burst": 5, "refill_time": 1000}}),
        "{cfg}"
    );
    refused(
        &sock,
        "PATCH",
        "/drives/rl",
        Some(r#"{"drive_id": "rl", "rate_limiter": {"ops": {"size": 1}}}"#),
        "rate_limiter: missing field `refill_time`",
    );
    let after = mc(&sock);
    assert_eq!(after["mem_size_mib"], 256);
    assert_eq!(after["accel"], "kvm");
    assert!(vm.kill(), "kvmbox kept running through all of it");
    assert!(!vm.stderr().contains("internal error"), "{}", vm.stderr());
}

/// A kvmbox on KVM configured through the API to run the test guest's `blk` scenario with
/// `drive` as its only disk, not started.
fn blk_configured(sock: &Path, drive: &serde_json::Value) -> Interactive {
    let mut vm = Interactive::spawn(&[
        "run",
        "--accel",
        "kvm",
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    wait_for_socket(&mut vm, sock);
    ok(
        sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128}"#,
    );
    let boot = json!({"kernel_image_path": testguest(), "boot_args": "tests=blk"}).to_string();
    ok(sock, "PUT", "/boot-source", &boot);
    ok(sock, "PUT", "/drives/data", &drive.to_string());
    vm
}

/// Boot the test guest's `blk` scenario through the API with `drive` as its only disk; the
/// guest's `KVMBOX-TEST blk` line, once the guest has powered off.
fn blk_through_the_api(name: &str, drive: serde_json::Value) -> String {
    let sock = sock_path(name);
    let mut vm = blk_configured(&sock, &drive);
    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    vm.expect("KVMBOX-TEST blk", TG);
    let line = vm.expect("\n", TG);
    vm.expect("KVMBOX-TEST done result=ok", TG);
    // The guest's debug-exit 0 is exit status 1.
    let status = vm.wait_exit(TG);
    assert_eq!(status, Some(1), "{}\n{}", vm.console(), vm.stderr());
    line
}

/// The test guest runs `hello,blk` on a disk limited to one request a second (the `blk`
/// scenario's 16 MiB in 64 KiB requests, written and read back, would take over 8 minutes):
/// it cannot have finished 1.5 s after its first line, however fast the host. A live
/// `PATCH /drives/{id}` removing the ops bucket lets it finish within seconds, its data intact.
fn limited_blk_finishes_after_patch(vm: &mut Interactive, sock: &Path, id: &str) {
    vm.expect("KVMBOX-TEST hello", TG);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !vm.console().contains("KVMBOX-TEST blk"),
        "the limited guest finished early:\n{}",
        vm.console()
    );
    let drive = |sock: &Path| {
        let cfg = http(sock, "GET", "/vm/config", None).1;
        let d = cfg["drives"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["drive_id"] == id);
        d.cloned()
            .unwrap_or_else(|| panic!("no drive {id} in {cfg}"))
    };
    assert_eq!(drive(sock)["rate_limiter"]["ops"]["size"], 1);
    let patch = json!({"drive_id": id, "rate_limiter": {"ops": {"size": 0, "refill_time": 0}}});
    ok(sock, "PATCH", &format!("/drives/{id}"), &patch.to_string());
    assert!(drive(sock).get("rate_limiter").is_none());
    vm.expect("KVMBOX-TEST blk", TG);
    let line = vm.expect("\n", TG);
    assert!(line.contains("errors=0 mismatched_words=0"), "{line}");
    vm.expect("KVMBOX-TEST done result=ok", TG);
    assert_eq!(vm.wait_exit(TG), Some(1), "{}", vm.stderr());
}

/// An API drive's limiter, set with `PUT /drives`, lifted live.
#[test]
fn patch_drive_lifts_a_rate_limit_while_the_guest_runs_on_kvm() {
    if !kvm_or_skip("patch_drive_lifts_a_rate_limit_while_the_guest_runs_on_kvm") {
        return;
    }
    let img = scratch_image("rl-live", 32 << 20);
    let sock = sock_path("rl-live");
    let mut vm = blk_configured(
        &sock,
        &json!({"drive_id": "data", "path_on_host": img, "is_root_device": false,
                "rate_limiter": {"ops": {"size": 1, "refill_time": 1000}}}),
    );
    let boot = json!({"kernel_image_path": testguest(), "boot_args": "tests=hello,blk"});
    ok(&sock, "PUT", "/boot-source", &boot.to_string());
    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    limited_blk_finishes_after_patch(&mut vm, &sock, "data");
    let _ = std::fs::remove_file(&img);
}

/// A flag's disk (`--disk ...,iops=1`) is `disk0` to the API, and lifted live the same way.
#[test]
fn patch_drive_lifts_a_flag_disks_rate_limit_on_kvm() {
    if !kvm_or_skip("patch_drive_lifts_a_flag_disks_rate_limit_on_kvm") {
        return;
    }
    let img = scratch_image("rl-flag", 32 << 20);
    let sock = sock_path("rl-flag");
    let disk = format!("{},iops=1", img.display());
    let tg = testguest();
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
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    wait_for_socket(&mut vm, &sock);
    limited_blk_finishes_after_patch(&mut vm, &sock, "disk0");
    let _ = std::fs::remove_file(&img);
}

/// The kvmbox drive extensions `format`, `serial` and `lock` reach the device as `--disk`'s
/// `format=`, `serial=` and `lock=off` do.
#[test]
fn drive_format_serial_and_lock_reach_the_guest_on_kvm() {
    if !kvm_or_skip("drive_format_serial_and_lock_reach_the_guest_on_kvm") {
        return;
    }
    let qcow2 = std::env::temp_dir()
        .join("kvmbox-lifecycle-tests")
        .join(format!("ext-{}.qcow2", std::process::id()));
    let _ = std::fs::remove_file(&qcow2);
    let st = std::process::Command::new(common::kvmbox())
        .args([
            "disk",
            "create",
            qcow2.to_str().unwrap(),
            "32M",
            "--format",
            "qcow2",
        ])
        .status()
        .unwrap();
    assert!(st.success(), "kvmbox disk create");
    let drive = |extra: serde_json::Value| {
        let mut d = json!({"drive_id": "data", "path_on_host": qcow2, "is_root_device": false});
        d.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        d
    };

    // format=qcow2: the guest sees the 32 MiB virtual disk, its serial, and reads back what
    // it wrote through the qcow2 layer.
    let line = blk_through_the_api(
        "ext-qcow2",
        drive(json!({"format": "qcow2", "serial": "api-qcow2"})),
    );
    for want in [
        "capacity_sectors=65536",
        "serial=api-qcow2",
        "errors=0",
        "mismatched_words=0",
    ] {
        assert!(line.contains(want), "want {want}: {line}");
    }

    // format=raw on that qcow2 file: the guest sees the file's own bytes, as many as it has,
    // while another kvmbox holds the image's lock (lock=false lets this second writer in).
    let file_len = std::fs::metadata(&qcow2).unwrap().len();
    assert!(
        file_len < 32 << 20,
        "a fresh qcow2 file is sparse: {file_len}"
    );
    // The holder's disk comes from the flags; GET /vm/config reports its options as the API's
    // drive fields.
    let holder_sock = sock_path("ext-holder");
    let spec = format!("{},format=qcow2,serial=flagdisk", qcow2.display());
    let mut holder = Interactive::testguest(
        1,
        "128M",
        "shell",
        &["--disk", &spec, "--api-sock", holder_sock.to_str().unwrap()],
    );
    holder.expect("type help", TG);
    let (st, full) = http(&holder_sock, "GET", "/vm/config", None);
    assert_eq!(st, 200, "{full}");
    let d = &full["drives"][0];
    assert_eq!(d["format"], "qcow2", "{full}");
    assert_eq!(d["serial"], "flagdisk", "{full}");
    assert_eq!(d["lock"], true, "{full}");
    // Locked (the default), the start is refused, naming the holder.
    let sock = sock_path("ext-locked");
    let mut locked = blk_configured(&sock, &drive(json!({"format": "raw"})));
    refused(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        &format!("is in use by process {}", holder.id()),
    );
    assert!(locked.kill());
    let line = blk_through_the_api(
        "ext-raw",
        drive(json!({"format": "raw", "serial": "raw", "lock": false})),
    );
    assert!(holder.kill());
    for want in [
        &format!("capacity_sectors={}", file_len / 512),
        "serial=raw",
        "errors=0",
        "mismatched_words=0",
    ] {
        assert!(line.contains(want), "want {want}: {line}");
    }
    let _ = std::fs::remove_file(&qcow2);
}

#[test]
fn pause_stops_ring3_compute_on_kvm_and_resume_finishes_it_alike() {
    if !kvm_or_skip("pause_stops_ring3_compute_on_kvm_and_resume_finishes_it_alike") {
        return;
    }
    // Long enough to pause in the middle (about 3 s of ring-3 work here).
    const ITERS: &str = "1000000000";
    let sock = sock_path("tgpause");
    let mut vm = compute_guest_on_kvm(&sock, ITERS);
    assert_eq!(state(&sock), "Running");
    let pid = vm_pid(&sock);
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    ok(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    let pause_latency = t0.elapsed();
    let ticks = vcpu_cpu_ticks(pid);
    std::thread::sleep(Duration::from_millis(1500));
    let paused_ticks = vcpu_cpu_ticks(pid) - ticks;
    assert!(
        !vm.console().contains("KVMBOX-TEST compute"),
        "the computation was to be paused in the middle; make ITERS larger"
    );
    assert!(
        paused_ticks <= 2,
        "vCPU threads used {paused_ticks} clock ticks of CPU while paused"
    );
    ok(&sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
    let line = vm.expect("KVMBOX-TEST compute", TG) + &vm.expect("\n", TG);
    assert!(line.contains(&format!("iters={ITERS}")), "{line}");
    vm.expect("KVMBOX-TEST done result=ok", TG);
    assert_eq!(vm.wait_exit(TG), Some(1), "debug-exit 0; {}", vm.stderr());
    eprintln!("pause latency (API request to every vCPU stopped, via HTTP): {pause_latency:?}");

    // The same computation without a pause gives the same result.
    let plain = common::run_testguest("kvm", 2, "128M", &format!("compute:{ITERS}"), &[]);
    plain.assert_guest_ok();
    let result = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("result="))
        .unwrap();
    assert_eq!(plain.get("compute", "result"), result);
}

/// The kvmbox process behind `sock` (the socket's peer).
fn vm_pid(sock: &Path) -> u32 {
    let s = UnixStream::connect(sock).unwrap();
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes one ucred into `cred`, whose size `len` gives.
    let r = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "SO_PEERCRED");
    cred.pid as u32
}

#[test]
fn linux_on_the_engine_pauses_resumes_and_powers_off_on_the_button() {
    let _cpu = CpuLease::exclusive();
    let (kernel, initrd) = linux_kit();
    let sock = sock_path("linux");
    let script = "i=0; while :; do i=$((i+1)); echo COUNT-$i; sleep 0.2; done";
    let cmdline = format!("{} {}", common::LINUX_CMDLINE, kit_cmd(script));
    let mut vm = Interactive::spawn(&[
        "run",
        "--accel",
        "emu",
        "--memory",
        "256M",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        &cmdline,
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    wait_for_socket(&mut vm, &sock);
    vm.expect("COUNT-3\r\n", LINUX);
    ok(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    assert_eq!(state(&sock), "Paused");
    // Whatever the guest had written before the pause has arrived by now.
    std::thread::sleep(Duration::from_millis(300));
    let before = vm.console().len();
    std::thread::sleep(Duration::from_millis(1200));
    let during = vm.console()[before..].to_string();
    assert!(during.is_empty(), "console output while paused: {during:?}");
    let last: u32 = vm
        .console()
        .rsplit("COUNT-")
        .next()
        .and_then(|t| t.trim().parse().ok())
        .expect("a count");
    ok(&sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
    // It continues where it stopped: the next number, not a reboot.
    vm.expect(&format!("COUNT-{}\r\n", last + 1), LINUX);
    assert_eq!(
        vm.count("KVMBOX-LINUX userspace-ready"),
        1,
        "no reboot: {}",
        vm.console()
    );
    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "PowerButton"}"#,
    );
    vm.expect("KVMBOX-LINUX power-button", LINUX);
    assert_eq!(vm.wait_exit(LINUX), Some(0), "{}", vm.stderr());
}

/// ACPI S3 through the API, on the engine: while the test guest sleeps (`s3:button`, no RTC
/// alarm) `PATCH /vm` is refused with 400 and the state stays Running; the power button wakes
/// it, and it resumes at its waking vector (where it prints and exits). `smp` first: the AP,
/// halted for good with interrupts off, is restarted by the wake too (waiting for INIT/SIPI).
#[test]
fn s3_sleeps_until_the_power_button_and_refuses_pause() {
    let sock = sock_path("tgs3");
    let mut vm = common::api::scenario_guest(&sock, "emu", &[], "smp,s3", "button");
    vm.expect("KVMBOX-TEST smp", TG);
    vm.expect("KVMBOX-TEST s3 pm1a_cnt=0x604 slp_typ=1", TG);
    vm.expect("wake=button", TG);
    // The guest writes SLP_EN right after that line. Until the VMM has it asleep, a pause
    // succeeds: undo it and try again.
    let start = Instant::now();
    loop {
        let (st, v) = http(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
        if st == 400 {
            let msg = v["fault_message"].as_str().unwrap_or_default();
            assert!(msg.contains("ACPI S3"), "fault_message {msg:?}");
            break;
        }
        assert_eq!(st, 204, "{v}");
        ok(&sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
        assert!(
            start.elapsed() < TG,
            "the guest never went to sleep; console:\n{}",
            vm.console()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(state(&sock), "Running");
    assert!(
        !vm.console().contains("resumed="),
        "woke with no wake event"
    );
    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "PowerButton"}"#,
    );
    vm.expect("KVMBOX-TEST s3 resumed=yes", TG);
    assert_eq!(vm.wait_exit(TG), Some(1), "debug-exit 0; {}", vm.stderr());
}

/// `PUT /vsock` (Firecracker's body) gives the guest its device: the test guest's `vsock`
/// scenario reads the CID the API set and, with nothing listening on the host's `PATH_1234`,
/// sees its first connection refused. A bad CID is 400 naming the field; `GET /vm/config`
/// shows the device; the socket exists while the VM runs and is gone after.
#[test]
fn vsock_through_the_api_reaches_the_guest_on_kvm() {
    if !kvm_or_skip("vsock_through_the_api_reaches_the_guest_on_kvm") {
        return;
    }
    let sock = sock_path("vsock");
    let uds = sock.with_extension("vsock");
    let _ = std::fs::remove_file(&uds);
    let mut vm = Interactive::spawn(&[
        "run",
        "--accel",
        "kvm",
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    wait_for_socket(&mut vm, &sock);
    ok(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128}"#,
    );
    let boot = json!({"kernel_image_path": testguest(), "boot_args": "tests=vsock"}).to_string();
    ok(&sock, "PUT", "/boot-source", &boot);
    refused(
        &sock,
        "PUT",
        "/vsock",
        Some(&json!({"guest_cid": 2, "uds_path": uds}).to_string()),
        "vsock: vsock guest CID 2 must be 3",
    );
    refused(
        &sock,
        "PUT",
        "/vsock",
        Some(r#"{"guest_cid": 3}"#),
        "missing field `uds_path`",
    );
    ok(
        &sock,
        "PUT",
        "/vsock",
        &json!({"vsock_id": "vsock0", "guest_cid": 7, "uds_path": uds}).to_string(),
    );
    let cfg = http(&sock, "GET", "/vm/config", None).1;
    assert_eq!(cfg["vsock"]["guest_cid"], 7, "{cfg}");
    assert_eq!(cfg["vsock"]["uds_path"], uds.to_str().unwrap(), "{cfg}");
    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    vm.expect("KVMBOX-TEST vsock", TG);
    let line = vm.expect("\n", TG);
    assert!(
        line.contains("error=g2h-no-response cid=7"),
        "{line}\n{}",
        vm.stderr()
    );
    let status = vm.wait_exit(TG);
    // The scenario failed, as it must here: the guest's debug-exit 1 is exit status 3.
    assert_eq!(status, Some(3), "{}", vm.stderr());
    assert!(
        !uds.exists(),
        "the vsock socket is removed when kvmbox ends"
    );
}
