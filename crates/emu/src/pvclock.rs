//! kvm-clock: the paravirtual clock Linux uses under KVM, offered by the engine.
//!
//! The engine's RDTSC is the host TSC (plus the vCPU's offset), so the guest's time in
//! nanoseconds is one linear function of its TSC for the whole life of the VM: each vCPU's
//! `pvclock_vcpu_time_info` is written once, when the guest enables it (and again when the
//! guest writes IA32_TSC), with `tsc_timestamp` = the guest TSC at the VM's time origin and
//! `system_time` = 0, and it stays exact. Every vCPU's record names the same origin, so all
//! vCPUs read the same time.
//!
//! Why: Linux verifies its TSC clocksource against a "watchdog" clocksource every 0.5 s.
//! Without kvm-clock that watchdog is refined-jiffies (counted by timer interrupts) or the
//! ACPI PM timer; on a busy host the engine's vCPU threads lose CPU time, timer ticks arrive
//! late and coalesce, jiffies fall behind the TSC, and Linux declares the TSC unstable.
//! kvm-clock needs no verification itself (Linux registers it without
//! `CLOCK_SOURCE_MUST_VERIFY`), so it becomes the watchdog; it and the TSC both follow the
//! host TSC and never disagree. Linux 6.1 rates kvm-clock 299 when the CPU has a constant
//! and non-stop TSC, below the TSC's 300, so the TSC stays the clocksource, and it takes the
//! TSC rate from the pvclock parameters (`tsc_known_freq`) instead of calibrating it against
//! late PIT ticks. KVM offers kvm-clock itself; the KVM backend needs none of this.
//!
//! Guest interface (KVM's, `Documentation/virt/kvm/x86/msr.rst` and `cpuid.rst`):
//! CPUID 0x4000_0000 = "KVMKVMKVM\0\0\0", 0x4000_0001 EAX = CLOCKSOURCE2 | STABLE_BIT;
//! WRMSR [`MSR_KVM_SYSTEM_TIME_NEW`] = GPA | enable (bit 0) of this vCPU's 32-byte record;
//! WRMSR [`MSR_KVM_WALL_CLOCK_NEW`] = GPA of a 12-byte `pvclock_wall_clock`, written at once
//! with the Unix time at which system time was 0. A record that does not lie in RAM is not
//! written (the MSR write still succeeds, as on KVM).

use crate::exec::host_tsc;
use crate::mem::PhysMem;
use kvmbox_cpu::CpuidEntry;
use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

/// Wall clock at boot: the guest writes the GPA of a 12-byte `pvclock_wall_clock`.
pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
/// Per-vCPU system time: GPA of a 32-byte `pvclock_vcpu_time_info`, bit 0 = enable.
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// The signature in CPUID 0x4000_0000 EBX, ECX, EDX that makes Linux look for KVM features.
pub const KVM_SIGNATURE: &[u8; 12] = b"KVMKVMKVM\0\0\0";
/// KVM_FEATURE_CLOCKSOURCE2: the two MSRs above.
pub const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
/// KVM_FEATURE_CLOCKSOURCE_STABLE_BIT: the guest may trust PVCLOCK_TSC_STABLE_BIT.
pub const KVM_FEATURE_CLOCKSOURCE_STABLE_BIT: u32 = 1 << 24;
/// `PVCLOCK_TSC_STABLE_BIT` in `pvclock_vcpu_time_info.flags`: the record's TSC-to-time
/// function is the same on every vCPU, so the guest needs no cross-vCPU monotonicity fix-up.
pub const PVCLOCK_TSC_STABLE: u8 = 1;
/// Size of `pvclock_vcpu_time_info`.
pub const TIME_INFO_LEN: u64 = 32;
/// Size of `pvclock_wall_clock`.
pub const WALL_CLOCK_LEN: u64 = 12;

/// The VM's kvm-clock: plain data (a snapshot can save it as is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvmClock {
    /// Guest TSC rate in Hz: the host TSC rate, which the VMM measures.
    pub tsc_hz: u64,
    /// Host TSC at which guest system time is 0 (when the VM was built).
    pub host_tsc_origin: u64,
    /// Whether to set [`PVCLOCK_TSC_STABLE`]: the host TSC is invariant (constant rate, one
    /// value across host CPUs), so the one linear function holds on every vCPU.
    pub tsc_stable: bool,
}

impl KvmClock {
    /// A clock whose system time starts now, for a guest TSC running at `tsc_hz`.
    pub fn starting_now(tsc_hz: u64, tsc_stable: bool) -> Self {
        KvmClock {
            tsc_hz: tsc_hz.max(1),
            host_tsc_origin: host_tsc(),
            tsc_stable,
        }
    }

    /// CPUID 0x4000_0000 and 0x4000_0001 as KVM presents them with these features.
    pub fn cpuid_leaves() -> [CpuidEntry; 2] {
        let w = |i: usize| {
            u32::from_le_bytes([
                KVM_SIGNATURE[i],
                KVM_SIGNATURE[i + 1],
                KVM_SIGNATURE[i + 2],
                KVM_SIGNATURE[i + 3],
            ])
        };
        [
            CpuidEntry {
                function: 0x4000_0000,
                eax: 0x4000_0001,
                ebx: w(0),
                ecx: w(4),
                edx: w(8),
                ..Default::default()
            },
            CpuidEntry {
                function: 0x4000_0001,
                eax: KVM_FEATURE_CLOCKSOURCE2 | KVM_FEATURE_CLOCKSOURCE_STABLE_BIT,
                ..Default::default()
            },
        ]
    }

    /// The time record of a vCPU whose TSC reads host TSC + `tsc_offset`.
    pub fn time_info(&self, version: u32, tsc_offset: u64) -> PvclockTimeInfo {
        let (mul, shift) = time_scale(self.tsc_hz);
        PvclockTimeInfo {
            version,
            tsc_timestamp: self.host_tsc_origin.wrapping_add(tsc_offset),
            system_time: 0,
            tsc_to_system_mul: mul,
            tsc_shift: shift,
            flags: if self.tsc_stable {
                PVCLOCK_TSC_STABLE
            } else {
                0
            },
        }
    }

    /// Guest system time (ns) at host TSC `tsc`, computed as the guest computes it.
    pub fn system_time_at(&self, tsc: u64) -> u64 {
        self.time_info(0, 0).ns_at(tsc)
    }

    /// Move the origin so that guest system time reads `ns` at host TSC `tsc` (never less, so
    /// a restored guest's clock continues from its saved value and does not run backwards;
    /// more by at most the rounding of the guest's own TSC-to-ns conversion). A new process
    /// restoring a snapshot calls it with the system time saved by [`Self::system_time_at`].
    pub fn rebase(&mut self, ns: u64, tsc: u64) {
        let hz = u128::from(self.tsc_hz);
        let to_ticks =
            |ns: u64| u64::try_from(u128::from(ns) * hz / 1_000_000_000).unwrap_or(u64::MAX);
        let mut ticks = to_ticks(ns);
        // The guest's conversion (32.32 fixed point) rounds down: step up until it reaches
        // `ns`. Each step closes nearly all of the gap, so a few suffice; the bound keeps a
        // hostile value in a snapshot from looping.
        for _ in 0..64 {
            self.host_tsc_origin = tsc.wrapping_sub(ticks);
            let got = self.system_time_at(tsc);
            if got >= ns {
                break;
            }
            ticks = ticks.saturating_add(to_ticks(ns - got).max(1));
        }
    }

    /// Unix time in ns at which guest system time was 0, from the host's clock now.
    pub fn boot_unix_ns(&self) -> i128 {
        let since_boot = self.system_time_at(host_tsc());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        now - i128::from(since_boot)
    }

    /// Write vCPU's time record at `gpa` (version protocol: odd while writing, even after).
    /// False when the 32 bytes are not in RAM.
    pub fn write_time_info(&self, phys: &PhysMem, gpa: u64, tsc_offset: u64) -> bool {
        let info = self.time_info(0, tsc_offset).to_bytes();
        write_versioned(phys, gpa, &info)
    }

    /// Write the `pvclock_wall_clock` at `gpa`. False when the 12 bytes are not in RAM.
    pub fn write_wall_clock(&self, phys: &PhysMem, gpa: u64) -> bool {
        write_versioned(phys, gpa, &wall_clock_bytes(0, self.boot_unix_ns()))
    }
}

/// The VM's kvm-clock as the VM and every vCPU hold it: restoring a snapshot rebases it after
/// the vCPUs exist, and their next record write uses the new origin.
#[derive(Debug, Clone)]
pub struct SharedKvmClock(Arc<RwLock<KvmClock>>);

impl SharedKvmClock {
    /// Share `clock`.
    pub fn new(clock: KvmClock) -> Self {
        SharedKvmClock(Arc::new(RwLock::new(clock)))
    }

    /// The clock now.
    pub fn get(&self) -> KvmClock {
        *self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Change it with `f`.
    pub fn update(&self, f: impl FnOnce(&mut KvmClock)) {
        f(&mut self.0.write().unwrap_or_else(|e| e.into_inner()));
    }
}

/// Write `bytes` (whose first 4 bytes are a version field, ignored) at `gpa` the way the
/// guest's readers expect: version made odd, the body, then the version made even.
fn write_versioned(phys: &PhysMem, gpa: u64, bytes: &[u8]) -> bool {
    let Some(p) = phys.host(gpa, bytes.len() as u64) else {
        return false;
    };
    // The version is a u32 the guest reads while we write; records Linux registers are
    // naturally aligned. An unaligned one (a hostile guest's) is written without the atomic.
    let version_ptr = (p as usize)
        .is_multiple_of(4)
        // SAFETY: p is valid for `bytes.len()` >= 4 bytes (checked by host()) and 4-aligned.
        .then(|| unsafe { &*(p as *const AtomicU32) });
    let old = match version_ptr {
        Some(v) => v.load(Ordering::Relaxed),
        None => {
            let mut b = [0u8; 4];
            // SAFETY: p is valid for at least 4 bytes.
            unsafe { std::ptr::copy_nonoverlapping(p, b.as_mut_ptr(), 4) };
            u32::from_le_bytes(b)
        }
    };
    let writing = (old | 1).wrapping_add(if old & 1 == 0 { 0 } else { 2 });
    let done = writing.wrapping_add(1);
    let put_version = |v: u32| match version_ptr {
        Some(a) => a.store(v, Ordering::Relaxed),
        // SAFETY: p is valid for at least 4 bytes.
        None => unsafe { std::ptr::copy_nonoverlapping(v.to_le_bytes().as_ptr(), p, 4) },
    };
    put_version(writing);
    fence(Ordering::SeqCst);
    // SAFETY: p is valid for bytes.len() bytes; the body starts after the 4-byte version.
    unsafe { std::ptr::copy_nonoverlapping(bytes[4..].as_ptr(), p.add(4), bytes.len() - 4) };
    fence(Ordering::SeqCst);
    put_version(done);
    phys.code().written(gpa, bytes.len() as u64);
    phys.mark_dirty(gpa, bytes.len() as u64);
    true
}

/// Multiplier and shift converting TSC ticks at `tsc_hz` to nanoseconds, as KVM's
/// `kvm_get_time_scale(NSEC_PER_SEC, tsc_hz)` computes them.
pub fn time_scale(tsc_hz: u64) -> (u32, i8) {
    let mut scaled: u64 = 1_000_000_000;
    let mut tps = tsc_hz.max(1);
    let mut shift: i8 = 0;
    while tps > scaled * 2 || tps & 0xffff_ffff_0000_0000 != 0 {
        tps >>= 1;
        shift -= 1;
    }
    let mut tps32 = tps as u32;
    while u64::from(tps32) <= scaled || scaled & 0xffff_ffff_0000_0000 != 0 {
        if scaled & 0xffff_ffff_0000_0000 != 0 || tps32 & 0x8000_0000 != 0 {
            scaled >>= 1;
        } else {
            tps32 <<= 1;
        }
        shift += 1;
    }
    let mul = ((u128::from(scaled) << 32) / u128::from(tps32)) as u32;
    (mul, shift)
}

/// `pvclock_vcpu_time_info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PvclockTimeInfo {
    /// Even when consistent; odd while the host writes.
    pub version: u32,
    /// Guest TSC when `system_time` was sampled.
    pub tsc_timestamp: u64,
    /// Guest nanoseconds at `tsc_timestamp`.
    pub system_time: u64,
    /// TSC-to-ns multiplier (32.32 fixed point after the shift).
    pub tsc_to_system_mul: u32,
    /// Shift applied to a TSC delta before the multiplication.
    pub tsc_shift: i8,
    /// `PVCLOCK_*` flags.
    pub flags: u8,
}

impl PvclockTimeInfo {
    /// The 32 bytes the guest reads.
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..4].copy_from_slice(&self.version.to_le_bytes());
        b[8..16].copy_from_slice(&self.tsc_timestamp.to_le_bytes());
        b[16..24].copy_from_slice(&self.system_time.to_le_bytes());
        b[24..28].copy_from_slice(&self.tsc_to_system_mul.to_le_bytes());
        b[28] = self.tsc_shift as u8;
        b[29] = self.flags;
        b
    }

    /// What the guest computes for TSC value `tsc` (Linux's `__pvclock_read_cycles`).
    pub fn ns_at(&self, tsc: u64) -> u64 {
        let mut delta = tsc.wrapping_sub(self.tsc_timestamp);
        if self.tsc_shift < 0 {
            delta >>= -i32::from(self.tsc_shift);
        } else {
            delta <<= self.tsc_shift;
        }
        let scaled = (u128::from(delta) * u128::from(self.tsc_to_system_mul)) >> 32;
        self.system_time.wrapping_add(scaled as u64)
    }

    /// The TSC rate in kHz the guest derives from the record (Linux's `pvclock_tsc_khz`).
    pub fn tsc_khz(&self) -> u64 {
        let khz = (1_000_000u64 << 32) / u64::from(self.tsc_to_system_mul.max(1));
        if self.tsc_shift < 0 {
            khz << -i32::from(self.tsc_shift)
        } else {
            khz >> self.tsc_shift
        }
    }
}

/// `pvclock_wall_clock`: the Unix time at which system time was 0 (`boot_unix_ns`).
pub fn wall_clock_bytes(version: u32, boot_unix_ns: i128) -> [u8; 12] {
    let ns = boot_unix_ns.max(0);
    let sec = (ns / 1_000_000_000) as u32;
    let nsec = (ns % 1_000_000_000) as u32;
    let mut b = [0u8; 12];
    b[0..4].copy_from_slice(&version.to_le_bytes());
    b[4..8].copy_from_slice(&sec.to_le_bytes());
    b[8..12].copy_from_slice(&nsec.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_info_follows_the_tsc_as_linux_reads_it() {
        for hz in [
            1_000_000_000u64,
            2_299_901_000,
            3_700_000_000,
            100_000_000,
            5_000_000_000,
        ] {
            let clock = KvmClock {
                tsc_hz: hz,
                host_tsc_origin: 1_000_000,
                tsc_stable: true,
            };
            let info = clock.time_info(2, 0);
            assert_eq!(info.flags, PVCLOCK_TSC_STABLE);
            for secs in [0u64, 1, 60, 86_400, 365 * 86_400] {
                let tsc = 1_000_000 + secs * hz;
                let want = secs * 1_000_000_000;
                let ns = info.ns_at(tsc);
                assert!(
                    ns.abs_diff(want) <= want / 1_000_000 + 1,
                    "{hz} Hz {secs} s: {ns} vs {want}"
                );
            }
            // Linux's tsc_khz from the record (kvm_get_tsc_khz) is the rate to 1e-6.
            assert!(info.tsc_khz().abs_diff(hz / 1000) <= hz / 1_000_000_000 + 1);
            // A vCPU whose TSC was moved reads the same system time at the same moment.
            let moved = clock.time_info(2, 12_345_678_901);
            let tsc = 1_000_000 + 7 * hz;
            assert_eq!(
                moved.ns_at(tsc.wrapping_add(12_345_678_901)),
                info.ns_at(tsc)
            );
            let b = info.to_bytes();
            assert_eq!(&b[0..4], &2u32.to_le_bytes());
            assert_eq!(&b[8..16], &1_000_000u64.to_le_bytes());
            assert_eq!(&b[16..24], &0u64.to_le_bytes());
            assert_eq!(b[29], PVCLOCK_TSC_STABLE);
        }
        let unstable = KvmClock {
            tsc_hz: 1_000_000_000,
            host_tsc_origin: 0,
            tsc_stable: false,
        };
        assert_eq!(unstable.time_info(0, 0).flags, 0);
    }

    #[test]
    fn rebase_continues_the_saved_time_without_going_back() {
        for hz in [1_000_000_000u64, 2_299_901_000, 3_700_000_000, 100_000_000] {
            for (saved, now_tsc) in [
                (0u64, 5u64),
                (1, 1 << 20),
                (37_123_456_789, 10 * hz),
                // Saved after an hour; restored on a host whose TSC is smaller (it rebooted).
                (3_600_000_000_000, 1_000),
                (86_400 * 1_000_000_000, u64::MAX - 7),
            ] {
                let mut c = KvmClock {
                    tsc_hz: hz,
                    host_tsc_origin: 42,
                    tsc_stable: true,
                };
                c.rebase(saved, now_tsc);
                let got = c.system_time_at(now_tsc);
                assert!(got >= saved, "{hz} Hz: {got} < {saved}");
                assert!(got - saved < 1_000, "{hz} Hz: {got} vs {saved}");
                // And it runs on at the TSC's rate from there.
                let later = c.system_time_at(now_tsc.wrapping_add(hz));
                assert!(
                    later.abs_diff(got + 1_000_000_000) < 1_000,
                    "{later} vs {got}"
                );
            }
        }
        // A hostile saved value neither loops nor panics.
        let mut c = KvmClock {
            tsc_hz: 5_000_000_000,
            host_tsc_origin: 0,
            tsc_stable: true,
        };
        c.rebase(u64::MAX, 1);
    }

    #[test]
    fn wall_clock_and_cpuid() {
        let w = wall_clock_bytes(2, 1_795_673_604_250_000_000);
        assert_eq!(&w[0..4], &2u32.to_le_bytes());
        assert_eq!(&w[4..8], &1_795_673_604u32.to_le_bytes());
        assert_eq!(&w[8..12], &250_000_000u32.to_le_bytes());
        let [l0, l1] = KvmClock::cpuid_leaves();
        assert_eq!((l0.function, l0.eax), (0x4000_0000, 0x4000_0001));
        let sig: Vec<u8> = [l0.ebx, l0.ecx, l0.edx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        assert_eq!(&sig, KVM_SIGNATURE);
        assert_eq!(l1.function, 0x4000_0001);
        assert_eq!(l1.eax, (1 << 3) | (1 << 24));
    }
}
