//! Timekeeping facts the guest is told through CPUID, so Linux trusts its TSC and APIC timer
//! without calibrating them against the PIT.
//!
//! Linux's `native_calibrate_tsc()` (Intel vendor only) takes the TSC rate from leaf 0x15
//! (TSC/crystal ratio and crystal Hz) and sets its APIC timer period from the crystal
//! frequency; leaf 0x16 gives the base frequency in MHz. kvmbox's LAPIC timer runs at
//! [`APIC_BUS_HZ`], so the crystal reported is that clock.
//!
//! [`kvmclock`] has the pieces of the KVM paravirtual clock for an engine that prefers to
//! offer it (CPUID 0x4000_0000 signature, MSRs, the structures it writes to guest memory).

use crate::lapic::APIC_BUS_HZ;

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// CPUID leaf 0x15 as `[eax, ebx, ecx, edx]` for a guest TSC of `tsc_hz`: EAX/EBX is the
/// crystal/TSC ratio, ECX the crystal (LAPIC timer) frequency in Hz. The TSC rate is
/// rounded to whole kHz, which keeps both ratio terms below 2^32.
pub fn cpuid_leaf_15(tsc_hz: u64) -> [u32; 4] {
    let tsc_khz = (tsc_hz + 500) / 1000;
    let crystal_khz = APIC_BUS_HZ / 1000;
    let g = gcd(tsc_khz, crystal_khz).max(1);
    let num = u32::try_from(tsc_khz / g).unwrap_or(0);
    let den = u32::try_from(crystal_khz / g).unwrap_or(0);
    if num == 0 || den == 0 {
        return [0; 4];
    }
    [den, num, APIC_BUS_HZ as u32, 0]
}

/// CPUID leaf 0x16 as `[eax, ebx, ecx, edx]`: base and maximum frequency (the TSC rate)
/// and bus (reference) frequency in MHz.
pub fn cpuid_leaf_16(tsc_hz: u64) -> [u32; 4] {
    let mhz = u32::try_from(tsc_hz / 1_000_000).unwrap_or(u32::MAX) & 0xffff;
    let bus = (APIC_BUS_HZ / 1_000_000) as u32 & 0xffff;
    [mhz, mhz, bus, 0]
}

/// KVM's paravirtual clock (pvclock) as the software engine can offer it: the engine
/// advertises [`kvmclock::cpuid_leaves`], and when the guest writes
/// [`kvmclock::MSR_KVM_SYSTEM_TIME_NEW`] with bit 0 set it writes
/// [`kvmclock::PvclockTimeInfo::to_bytes`] at the given guest-physical address (bits 63-1,
/// 4-byte aligned); for [`kvmclock::MSR_KVM_WALL_CLOCK_NEW`] it writes
/// [`kvmclock::wall_clock_bytes`]. Guest TSC and clock nanoseconds are linear in each
/// other, so one write at enable time stays valid (the TSC-stable flag is set).
pub mod kvmclock {
    /// Wall clock at boot: the guest writes the GPA of a 12-byte `pvclock_wall_clock`.
    pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
    /// Per-vCPU system time: GPA of a 32-byte `pvclock_vcpu_time_info`, bit 0 = enable.
    pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
    /// `PVCLOCK_TSC_STABLE_BIT`.
    pub const PVCLOCK_TSC_STABLE: u8 = 1;

    /// CPUID 0x4000_0000 (signature "KVMKVMKVM") and 0x4000_0001 (CLOCKSOURCE,
    /// CLOCKSOURCE2 and CLOCKSOURCE_STABLE_BIT features) as `(leaf, [eax, ebx, ecx, edx])`.
    pub fn cpuid_leaves() -> [(u32, [u32; 4]); 2] {
        let sig = |s: &[u8; 4]| u32::from_le_bytes(*s);
        [
            (
                0x4000_0000,
                [0x4000_0001, sig(b"KVMK"), sig(b"VMKV"), sig(b"M\0\0\0")],
            ),
            (0x4000_0001, [(1 << 0) | (1 << 3) | (1 << 24), 0, 0, 0]),
        ]
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
        /// Even when consistent; bump by 2 on every update.
        pub version: u32,
        /// Guest TSC when `system_time` was sampled.
        pub tsc_timestamp: u64,
        /// Guest nanoseconds since boot at `tsc_timestamp`.
        pub system_time: u64,
        /// TSC-to-ns multiplier (32.32 fixed point after the shift).
        pub tsc_to_system_mul: u32,
        /// Shift applied to a TSC delta before the multiplication.
        pub tsc_shift: i8,
        /// `PVCLOCK_*` flags.
        pub flags: u8,
    }

    impl PvclockTimeInfo {
        /// The record for a guest TSC of `tsc_hz` that read `tsc` at guest time `system_ns`.
        pub fn new(version: u32, tsc: u64, system_ns: u64, tsc_hz: u64) -> Self {
            let (mul, shift) = time_scale(tsc_hz);
            Self {
                version: version & !1,
                tsc_timestamp: tsc,
                system_time: system_ns,
                tsc_to_system_mul: mul,
                tsc_shift: shift,
                flags: PVCLOCK_TSC_STABLE,
            }
        }

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
    }

    /// `pvclock_wall_clock`: the Unix time at which system time was 0 (`boot_unix_ns`).
    pub fn wall_clock_bytes(version: u32, boot_unix_ns: i128) -> [u8; 12] {
        let ns = boot_unix_ns.max(0);
        let sec = (ns / 1_000_000_000) as u32;
        let nsec = (ns % 1_000_000_000) as u32;
        let mut b = [0u8; 12];
        b[0..4].copy_from_slice(&(version & !1).to_le_bytes());
        b[4..8].copy_from_slice(&sec.to_le_bytes());
        b[8..12].copy_from_slice(&nsec.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_15_reconstructs_the_tsc_rate_as_linux_does() {
        for hz in [
            2_000_000_000u64,
            2_419_200_000,
            3_000_123_000,
            1_000_000,
            4_700_000_000,
        ] {
            let [eax, ebx, ecx, _] = cpuid_leaf_15(hz);
            // native_calibrate_tsc(): crystal_khz * ebx / eax.
            let khz = u64::from(ecx / 1000) * u64::from(ebx) / u64::from(eax);
            assert_eq!(khz, hz / 1000, "{hz}");
            // lapic_timer_period = crystal_khz * 1000 / HZ: counts per jiffy at HZ=250.
            assert_eq!(u64::from(ecx) / 250, APIC_BUS_HZ / 250);
        }
        assert_eq!(cpuid_leaf_15(0), [0; 4]);
        assert_eq!(cpuid_leaf_16(2_419_200_000), [2419, 2419, 1000, 0]);
    }

    #[test]
    fn kvmclock_follows_the_tsc() {
        use super::kvmclock::*;
        for hz in [
            1_000_000_000u64,
            2_419_200_000,
            3_700_000_000,
            100_000_000,
            5_000_000_000,
        ] {
            let info = PvclockTimeInfo::new(2, 1_000_000, 5_000, hz);
            for secs in [0u64, 1, 60, 86_400] {
                let tsc = 1_000_000 + secs * hz;
                let ns = info.ns_at(tsc);
                let want = 5_000 + secs * 1_000_000_000;
                assert!(
                    ns.abs_diff(want) <= want / 1_000_000 + 1,
                    "{hz} Hz {secs} s: {ns} vs {want}"
                );
            }
            let b = info.to_bytes();
            assert_eq!(&b[16..24], &5_000u64.to_le_bytes());
            assert_eq!(b[29], PVCLOCK_TSC_STABLE);
        }
        let w = wall_clock_bytes(3, 1_795_673_604_250_000_000);
        assert_eq!(&w[0..4], &2u32.to_le_bytes());
        assert_eq!(&w[4..8], &1_795_673_604u32.to_le_bytes());
        assert_eq!(&w[8..12], &250_000_000u32.to_le_bytes());
        let [(l0, r0), (l1, r1)] = cpuid_leaves();
        assert_eq!((l0, l1), (0x4000_0000, 0x4000_0001));
        let sig: Vec<u8> = r0[1..].iter().flat_map(|r| r.to_le_bytes()).collect();
        assert_eq!(&sig, b"KVMKVMKVM\0\0\0");
        assert_ne!(r1[0] & (1 << 3), 0);
    }
}
