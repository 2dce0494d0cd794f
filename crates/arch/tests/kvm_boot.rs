//! Boot Debian's cloud kernel on KVM with what this crate builds, far enough to see the kernel
//! parse our E820 map, command line and ACPI tables (its early console on COM1 says so).
//!
//! The Debian boots are ignored by default: ring 0 is emulated on these hosts (~1 M
//! instructions/s), so reaching "Kernel command line:" takes ~35 s host-decompressed and ~3 min
//! from the bzImage (the in-guest LZ4 decompressor alone is ~160 s). Run them with
//! `cargo test -p kvmbox-arch --test kvm_boot -- --ignored --nocapture`.
//!
//! The freestanding test guest (guest/testguest, built here with its build.sh) boots in well
//! under a second through both entries and reports what it found in our boot information.

use kvmbox_arch::{create_acpi_tables, guest_memory, layout, load, EntryKind, LoadParams};
use kvmbox_cpu::kvm::KvmVm;
use kvmbox_cpu::{IoHandler, VcpuConfig, VcpuExit, VcpuKicker, Vm};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn kernel() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/linux/fetch-kernel.sh");
    let out = Command::new(&script).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// COM1 just enough for earlyprintk: transmitter always empty, bytes collected; everything else
/// reads as all ones. A write to the isa-debug-exit port stops the run.
struct Console {
    out: Mutex<Vec<u8>>,
    lcr: AtomicU8,
    stop_at: &'static str,
    kicker: Arc<dyn VcpuKicker>,
    exit_code: Mutex<Option<u8>>,
}

impl IoHandler for Console {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        let v = match port {
            0x3fd => 0x60, // LSR: THR empty, transmitter empty
            0x3fb => self.lcr.load(Ordering::Relaxed),
            0x3f9 | 0x3fa | 0x3fc | 0x3fe => 0,
            _ => 0xff,
        };
        data.fill(v);
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        match port {
            0x3fb => self.lcr.store(data[0], Ordering::Relaxed),
            p if p == layout::DEBUG_EXIT_PORT => {
                *self.exit_code.lock().unwrap() = Some(data[0]);
                self.kicker.kick();
            }
            0x3f8 if self.lcr.load(Ordering::Relaxed) & 0x80 == 0 => {
                let mut out = self.out.lock().unwrap();
                out.push(data[0]);
                if data[0] == b'\n' && String::from_utf8_lossy(&out).contains(self.stop_at) {
                    self.kicker.kick();
                }
            }
            _ => {}
        }
    }
    fn mmio_read(&self, _addr: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&self, _addr: u64, _data: &[u8]) {}
}

/// Boot and return the console text once `stop_at` shows up (or the time is up).
/// `KVMBOX_ARCH_STOP` / `KVMBOX_ARCH_SECS` override where and when to stop (to watch a boot get
/// further by hand).
fn boot(p: &mut LoadParams, stop_at: &'static str, limit: Duration) -> Booted {
    let stop_at: &'static str = match std::env::var("KVMBOX_ARCH_STOP") {
        Ok(s) => Box::leak(s.into_boxed_str()),
        Err(_) => stop_at,
    };
    let limit = std::env::var("KVMBOX_ARCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(limit);
    let mem = guest_memory(p.mem_size).unwrap();
    p.rsdp = Some(create_acpi_tables(&mem, p.cpus).unwrap());
    let b = load(&mem, p).unwrap();
    let vm = KvmVm::new(&mem).unwrap();
    // As the VMM does it: every vCPU created and configured in order, then the BSP's state.
    let mut aps = Vec::new();
    for id in 0..p.cpus {
        let mut v = vm.create_vcpu(id).unwrap();
        v.configure(&VcpuConfig { id, count: p.cpus }).unwrap();
        aps.push(v);
    }
    let mut vcpu = aps.remove(0);
    vcpu.set_sregs(&b.sregs).unwrap();
    vcpu.set_regs(&b.regs).unwrap();
    for ap in &mut aps {
        ap.set_wait_for_sipi().unwrap();
    }
    let kicker = vcpu.kicker();
    let console = Console {
        out: Mutex::new(Vec::new()),
        lcr: AtomicU8::new(0),
        stop_at,
        kicker: kicker.clone(),
        exit_code: Mutex::new(None),
    };
    let start = Instant::now();
    let timer = {
        let kicker = kicker.clone();
        std::thread::spawn(move || {
            std::thread::sleep(limit);
            kicker.kick();
        })
    };
    // APs run on threads of their own until the BSP is done (a halted AP sleeps in KVM).
    let ap_kickers: Vec<_> = aps.iter().map(|a| a.kicker()).collect();
    let done = AtomicBool::new(false);
    let exit = std::thread::scope(|s| {
        for mut ap in aps {
            let console = &console;
            let done = &done;
            // KVM_RUN of a vCPU waiting for SIPI returns (as Kicked) once INIT arrives: run
            // again until the BSP is finished, as the VMM's vCPU loop does.
            s.spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    if !matches!(ap.run(console), Ok(VcpuExit::Kicked)) {
                        break;
                    }
                }
            });
        }
        let exit = vcpu.run(&console);
        done.store(true, Ordering::SeqCst);
        for k in &ap_kickers {
            k.kick();
        }
        exit
    });
    let text = String::from_utf8_lossy(&console.out.lock().unwrap()).into_owned();
    let exit_code = *console.exit_code.lock().unwrap();
    eprintln!(
        "--- {:?} after {:?}: {exit:?}\n{text}",
        b.entry_kind,
        start.elapsed()
    );
    drop(timer);
    assert!(
        matches!(exit, Ok(VcpuExit::Kicked)),
        "guest stopped early: {exit:?}"
    );
    Booted {
        kind: b.entry_kind,
        text,
        exit_code,
    }
}

/// What a boot showed.
struct Booted {
    kind: EntryKind,
    text: String,
    /// The byte written to the isa-debug-exit port, if any.
    exit_code: Option<u8>,
}

fn check_early_boot(text: &str) {
    for want in [
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
        "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable",
        "BIOS-e820: [mem 0x00000000e0000000-0x00000000efffffff] reserved",
        "Command line: console=ttyS0 earlyprintk=serial,ttyS0 kvmbox-test",
        "ACPI: RSDP 0x00000000000E0000 000024 (v02 KVMBOX)",
        "ACPI: FACP 0x",
        "ACPI: DSDT 0x",
        "ACPI: FACS 0x",
        "ACPI: APIC 0x",
        "ACPI: PM-Timer IO Port: 0x608",
        "IOAPIC[0]: apic_id 0",
        "ACPI: INT_SRC_OVR (bus 0 bus_irq 0 global_irq 2 dfl dfl)",
        "ACPI: INT_SRC_OVR (bus 0 bus_irq 9 global_irq 9 high level)",
        "ACPI: Using ACPI (MADT) for SMP configuration information",
    ] {
        assert!(text.contains(want), "console lacks {want:?}");
    }
}

const CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0 kvmbox-test";
const STOP: &str = "Kernel command line:";

#[test]
#[ignore = "slow: ring 0 is emulated on this host"]
fn debian_kernel_host_decompressed_pvh_reads_our_tables() {
    let k = kernel();
    let mut p = LoadParams::new(&k, CMDLINE, 256 << 20);
    p.host_decompress = true;
    let Booted { kind, text, .. } = boot(&mut p, STOP, Duration::from_secs(300));
    assert_eq!(kind, EntryKind::Pvh);
    check_early_boot(&text);
}

#[test]
#[ignore = "slow: ring 0 is emulated on this host"]
fn debian_kernel_host_decompressed_linux64_reads_our_tables() {
    let k = kernel();
    let mut p = LoadParams::new(&k, CMDLINE, 256 << 20);
    p.host_decompress = true;
    p.prefer_pvh = false;
    let Booted { kind, text, .. } = boot(&mut p, STOP, Duration::from_secs(300));
    assert_eq!(kind, EntryKind::Linux64);
    check_early_boot(&text);
}

#[test]
#[ignore = "very slow: the in-guest LZ4 decompressor runs in emulated ring 0"]
fn debian_bzimage_reads_our_tables() {
    let k = kernel();
    let mut p = LoadParams::new(&k, CMDLINE, 256 << 20);
    let Booted { kind, text, .. } = boot(&mut p, STOP, Duration::from_secs(1200));
    assert_eq!(kind, EntryKind::Linux64);
    check_early_boot(&text);
}

/// Build the freestanding test guest into a directory of our own; its path.
fn testguest() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = std::env::temp_dir().join("kvmbox-arch-testguest");
    let st = Command::new(root.join("guest/testguest/build.sh"))
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "testguest build: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    out.join("testguest.elf")
}

fn run_testguest(prefer_pvh: bool) -> String {
    let k = testguest();
    let cmdline = "tests=hello,acpi,mem,smp";
    let mut p = LoadParams::new(&k, cmdline, 128 << 20);
    p.cpus = 2;
    p.prefer_pvh = prefer_pvh;
    let Booted {
        kind,
        text,
        exit_code,
    } = boot(
        &mut p,
        "\0(stop at the debug exit)",
        Duration::from_secs(60),
    );
    assert_eq!(exit_code, Some(0), "isa-debug-exit byte");
    assert_eq!(
        kind,
        if prefer_pvh {
            EntryKind::Pvh
        } else {
            EntryKind::Linux64
        }
    );
    let entry = if prefer_pvh { "pvh" } else { "linux64" };
    for want in [
        format!("KVMBOX-TEST hello msg=hello-from-guest entry={entry} cmdline=\"{cmdline}\""),
        // Our RSDP (revision 2, from the boot protocol), XSDT tables, 2 MADT CPUs, checksums.
        "KVMBOX-TEST acpi tables=FACP,APIC cpus=2 ioapic=0xfec00000 checksums=ok rsdp=0xe0000 rev=2 dsdt=yes".into(),
        // 128 MiB less the EBDA..1 MiB hole, rounded down.
        "KVMBOX-TEST mem ram_mib=127 ".into(),
        // The APs the MADT lists start through INIT-SIPI-SIPI with the APIC IDs it gives.
        "KVMBOX-TEST smp expected=2 online=2 apic_ids=0,1".into(),
        "KVMBOX-TEST done result=ok".into(),
    ] {
        assert!(text.contains(&want), "console lacks {want:?}");
    }
    assert!(text.contains(" errors=0 "), "memory test errors");
    text
}

#[test]
fn testguest_boots_through_pvh_with_our_boot_info() {
    if !kvmbox_cpu::kvm::available_or_skip("testguest_boots_through_pvh_with_our_boot_info") {
        return;
    }
    run_testguest(true);
}

#[test]
fn testguest_boots_through_linux64_with_our_boot_info() {
    if !kvmbox_cpu::kvm::available_or_skip("testguest_boots_through_linux64_with_our_boot_info") {
        return;
    }
    run_testguest(false);
}
