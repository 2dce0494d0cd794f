//! Random byte streams executed as code (with random page-table and descriptor entries) in
//! a small guest, in every CPU mode: the engine must never panic or hang. The same harness
//! backs the cargo-fuzz target in `fuzz/`.

#[test]
fn random_code_never_panics() {
    let mut s: u64 = 0x2545_f491_4f6c_dd1d;
    let mut total = 0u64;
    let n = std::env::var("EMU_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000u32);
    for case in 0..n {
        let len = 64 + (case as usize * 37) % 900;
        let mut data = Vec::with_capacity(len);
        for _ in 0..len {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            data.push((s >> 24) as u8);
        }
        total += kvmbox_emu::fuzz::run_bytes(&data);
    }
    eprintln!(
        "random bytes: {total} instructions over {n} inputs ({:.1} per input)",
        total as f64 / f64::from(n)
    );
    // Random bytes do execute (most inputs run several instructions before faulting).
    assert!(
        total > n as u64,
        "only {total} instructions retired over {n} inputs"
    );
}

/// Structured programs ([`kvmbox_emu::fuzz::run_program`]) run: random records encode into
/// well-formed instructions (prefixes, ModRM/SIB, displacements and immediates of the sizes the
/// record asks for) that the engine executes, never panicking.
#[test]
fn random_programs_run_sequences() {
    let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
    let n = 1000u64;
    let mut total = 0u64;
    for case in 0..n {
        let len = 200 + (case as usize * 53) % 2000;
        let mut data = Vec::with_capacity(len);
        for _ in 0..len {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            data.push((s >> 24) as u8);
        }
        total += kvmbox_emu::fuzz::run_program(&data);
    }
    eprintln!(
        "structured programs: {total} instructions over {n} inputs ({:.1} per input)",
        total as f64 / n as f64
    );
    assert!(
        total > 3 * n,
        "only {total} instructions retired over {n} programs"
    );
}
