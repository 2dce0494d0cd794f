//! Timekeeping facts the guest is told through CPUID, so Linux trusts its TSC and APIC timer
//! without calibrating them against the PIT.
//!
//! Linux's `native_calibrate_tsc()` (Intel vendor only) takes the TSC rate from leaf 0x15
//! (TSC/crystal ratio and crystal Hz) and sets its APIC timer period from the crystal
//! frequency; leaf 0x16 gives the base frequency in MHz. kvmbox's LAPIC timer runs at
//! [`APIC_BUS_HZ`], so the crystal reported is that clock.

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
}
