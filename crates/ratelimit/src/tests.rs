//! Bucket arithmetic on an explicit clock (no sleeps), the limiter's timer, the PATCH rule and
//! the option syntax.

use super::*;

fn at(t0: Instant, ms: u64) -> Instant {
    t0 + Duration::from_millis(ms)
}

fn bucket(size: u64, burst: u64, refill_time: u64) -> BucketConfig {
    BucketConfig {
        size,
        one_time_burst: burst,
        refill_time,
    }
}

#[test]
fn a_bucket_starts_full_and_refills_at_its_rate() {
    let t0 = Instant::now();
    // 1000 tokens per 100 ms: 10 per ms.
    let mut b = TokenBucket::new(bucket(1000, 0, 100), t0).unwrap();
    assert_eq!(b.try_take_at(1000, t0), Ok(()));
    assert_eq!(b.try_take_at(1, t0), Err(Duration::from_micros(100)));
    assert_eq!(b.level_at(at(t0, 10)), 100);
    assert_eq!(
        b.try_take_at(150, at(t0, 10)),
        Err(Duration::from_millis(5))
    );
    // Nothing was taken by the refusal.
    assert_eq!(b.try_take_at(150, at(t0, 15)), Ok(()));
    assert_eq!(b.level_at(at(t0, 15)), 0);
    // Never above the size, however long it waits.
    assert_eq!(b.level_at(at(t0, 10_000)), 1000);
}

#[test]
fn fractions_of_a_token_are_not_lost() {
    let t0 = Instant::now();
    // 3 tokens per second: one every 333.33 ms.
    let mut b = TokenBucket::new(bucket(3, 0, 1000), t0).unwrap();
    b.try_take_at(3, t0).unwrap();
    let mut now = t0;
    let mut got = 0;
    // 300 steps of 10 ms (3 s) must earn exactly 9 tokens, one at a time.
    for _ in 0..300 {
        now += Duration::from_millis(10);
        if b.try_take_at(1, now).is_ok() {
            got += 1;
        }
    }
    assert_eq!(got, 9);
    // The wait reported is exact: one token is due 1/3 s after the last whole one.
    let mut b = TokenBucket::new(bucket(3, 0, 1000), t0).unwrap();
    b.try_take_at(3, t0).unwrap();
    let w = b.try_take_at(1, at(t0, 100)).unwrap_err();
    assert_eq!(w, Duration::from_nanos(233_333_334));
    assert!(b.try_take_at(1, at(t0, 100) + w).is_ok());
}

#[test]
fn the_one_time_burst_goes_first_and_does_not_refill() {
    let t0 = Instant::now();
    let mut b = TokenBucket::new(bucket(100, 500, 1000), t0).unwrap();
    b.try_take_at(400, t0).unwrap();
    assert_eq!((b.burst_left(), b.level_at(t0)), (100, 100));
    // 150: the last 100 of the burst, then 50 of the bucket.
    b.try_take_at(150, t0).unwrap();
    assert_eq!((b.burst_left(), b.level_at(t0)), (0, 50));
    assert_eq!(b.level_at(at(t0, 5000)), 100);
    assert_eq!(b.burst_left(), 0);
}

#[test]
fn a_request_larger_than_the_bucket_waits_for_a_full_bucket_and_leaves_a_debt() {
    let t0 = Instant::now();
    let mut b = TokenBucket::new(bucket(100, 0, 1000), t0).unwrap();
    b.try_take_at(10, t0).unwrap();
    // 250 > 100: needs the bucket full again (10 tokens: 100 ms).
    assert_eq!(b.try_take_at(250, t0), Err(Duration::from_millis(100)));
    assert_eq!(b.try_take_at(250, at(t0, 100)), Ok(()));
    assert_eq!(b.level_at(at(t0, 100)), -150);
    // The debt is paid at the bucket's rate: the next token after 1.5 s + 10 ms.
    assert_eq!(
        b.try_take_at(1, at(t0, 100)),
        Err(Duration::from_millis(1510))
    );
    assert_eq!(b.level_at(at(t0, 1600)), 0);
    b.refund(1000);
    assert_eq!(b.level_at(at(t0, 1600)), 100);
}

#[test]
fn extreme_buckets_do_not_overflow() {
    let t0 = Instant::now();
    let max_refill = u64::MAX / 1_000_000;
    let mut b = TokenBucket::new(bucket(u64::MAX, u64::MAX, max_refill), t0).unwrap();
    b.try_take_at(u64::MAX, t0).unwrap();
    b.try_take_at(u64::MAX, t0).unwrap();
    assert!(b.try_take_at(u64::MAX, t0).is_err());
    assert!(b.level_at(at(t0, 1)) >= 0);
    let mut b = TokenBucket::new(bucket(1, 0, max_refill), t0).unwrap();
    b.try_take_at(u64::MAX, t0).unwrap();
    assert!(b.try_take_at(1, t0 + Duration::from_secs(1 << 40)).is_err());
}

#[test]
fn zero_size_or_refill_time_means_no_bucket() {
    let t0 = Instant::now();
    assert!(TokenBucket::new(bucket(0, 10, 100), t0).is_none());
    assert!(TokenBucket::new(bucket(10, 10, 0), t0).is_none());
    let rl = RateLimiter::new_at(
        &RateLimiterConfig {
            bandwidth: Some(bucket(0, 0, 100)),
            ops: None,
        },
        t0,
    )
    .unwrap();
    assert!(rl.is_unlimited());
}

/// Whether the limiter's timer has fired (poll with zero timeout).
fn fired(rl: &RateLimiter) -> bool {
    let mut p = libc::pollfd {
        fd: rl.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1
}

#[test]
fn a_refusal_takes_nothing_blocks_and_arms_the_timer() {
    let t0 = Instant::now();
    let cfg = RateLimiterConfig {
        bandwidth: Some(bucket(1000, 0, 1000)),
        ops: Some(bucket(10, 0, 1000)),
    };
    let mut rl = RateLimiter::new_at(&cfg, t0).unwrap();
    assert!(!rl.is_unlimited());
    assert!(rl.consume_at(600, t0));
    // Bytes short: the op is not taken either.
    assert_eq!(
        rl.try_consume_at(600, t0),
        Err(Some(Duration::from_millis(200)))
    );
    assert!(rl.is_blocked());
    assert_eq!(rl.ops().unwrap().level_at(t0), 9);
    // Blocked: no, without looking at the buckets, until the timer is handled.
    assert_eq!(rl.try_consume_at(1, at(t0, 5000)), Err(None));
    assert!(!fired(&rl));
    rl.on_timer();
    assert!(rl.consume_at(600, at(t0, 200)));
    // Ops short now: 10 per second, refilled to 10 by 200 ms, 9 left.
    for _ in 0..9 {
        assert!(rl.consume_at(0, at(t0, 200)));
    }
    assert_eq!(
        rl.try_consume_at(0, at(t0, 200)),
        Err(Some(Duration::from_millis(100)))
    );
    rl.refund(0);
    rl.on_timer();
    assert!(rl.consume_at(0, at(t0, 200)));
}

#[test]
fn the_timer_fires_after_the_wait() {
    let cfg = RateLimiterConfig {
        bandwidth: Some(bucket(1000, 0, 10)),
        ops: None,
    };
    let mut rl = RateLimiter::new(&cfg).unwrap();
    assert!(rl.consume(1000));
    assert!(!rl.consume(1000));
    // Wait (up to 10 s: only the order of events matters) for the 10 ms timer.
    let mut p = libc::pollfd {
        fd: rl.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    assert_eq!(unsafe { libc::poll(&mut p, 1, 10_000) }, 1);
    rl.on_timer();
    assert!(!fired(&rl));
    assert!(rl.consume(1000));
}

#[test]
fn updates_follow_firecrackers_patch_rule_and_wake_the_worker() {
    let t0 = Instant::now();
    let cfg = RateLimiterConfig {
        bandwidth: Some(bucket(1000, 0, 1000)),
        ops: Some(bucket(10, 0, 1000)),
    };
    let mut rl = RateLimiter::new_at(&cfg, t0).unwrap();
    assert!(rl.consume_at(1000, t0));
    assert!(!rl.consume_at(1, t0));
    // Absent ops: kept; a new bandwidth bucket replaces the old one, full.
    let upd = RateLimiterConfig {
        bandwidth: Some(bucket(5000, 0, 500)),
        ops: None,
    };
    rl.update_at(&upd, t0);
    assert!(!rl.is_blocked());
    assert!(fired(&rl), "an update wakes the worker");
    rl.on_timer();
    assert_eq!(rl.config(), cfg.patched(&upd));
    assert_eq!(rl.config().ops, cfg.ops);
    assert!(rl.consume_at(5000, t0));
    // A zero size removes a bucket; with both gone the limiter is unlimited.
    rl.update_at(
        &RateLimiterConfig {
            bandwidth: Some(bucket(0, 0, 0)),
            ops: Some(bucket(10, 0, 0)),
        },
        t0,
    );
    assert!(rl.is_unlimited());
    assert!(rl.consume(u64::MAX));
    assert_eq!(rl.config(), RateLimiterConfig::default());
}

#[test]
fn json_is_firecrackers_shape() {
    let c: RateLimiterConfig = serde_json::from_str(
        r#"{"bandwidth": {"size": 1048576, "one_time_burst": 4096, "refill_time": 1000},
            "ops": {"size": 100, "refill_time": 100}}"#,
    )
    .unwrap();
    assert_eq!(c.bandwidth, Some(bucket(1 << 20, 4096, 1000)));
    assert_eq!(c.ops, Some(bucket(100, 0, 100)));
    assert_eq!(
        serde_json::to_string(&c).unwrap(),
        r#"{"bandwidth":{"size":1048576,"one_time_burst":4096,"refill_time":1000},"ops":{"size":100,"refill_time":100}}"#
    );
    let e = serde_json::from_str::<RateLimiterConfig>(r#"{"bandwidth": {"size": 1}}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("refill_time"), "{e}");
    let e = serde_json::from_str::<RateLimiterConfig>(r#"{"bw": {}}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown field `bw`"), "{e}");
    let big = RateLimiterConfig {
        ops: Some(bucket(1, 0, u64::MAX)),
        bandwidth: None,
    };
    assert!(big.validate().unwrap_err().starts_with("ops.refill_time"));
}

#[test]
fn options_set_per_second_buckets() {
    let mut c = RateLimiterConfig::default();
    assert_eq!(c.set_option("bw", "4M"), Ok(true));
    assert_eq!(c.set_option("bw_burst", "64k"), Ok(true));
    assert_eq!(c.set_option("iops", "200"), Ok(true));
    assert_eq!(c.set_option("iops_refill", "100"), Ok(true));
    assert_eq!(c.set_option("iops_x", "1"), Ok(false));
    assert_eq!(c.set_option("ro", "x"), Ok(false));
    assert_eq!(c.check_options(""), Ok(()));
    assert_eq!(c.bandwidth, Some(bucket(4 << 20, 64 << 10, 1000)));
    assert_eq!(c.ops, Some(bucket(200, 0, 100)));
    assert_eq!(
        c.to_options("rx_"),
        ",rx_bw=4194304,rx_bw_burst=65536,rx_iops=200,rx_iops_refill=100"
    );
    let mut back = RateLimiterConfig::default();
    for kv in c.to_options("").split(',').skip(1) {
        let (k, v) = kv.split_once('=').unwrap();
        back.set_option(k, v).unwrap();
    }
    assert_eq!(back, c);
    assert!(c.set_option("bw", "0").unwrap_err().contains("bw=0"));
    assert!(c
        .set_option("iops", "lots")
        .unwrap_err()
        .contains("iops=lots"));
    let mut only_burst = RateLimiterConfig::default();
    only_burst.set_option("iops_burst", "5").unwrap();
    assert_eq!(
        only_burst.check_options("tx_").unwrap_err(),
        "tx_iops_burst and tx_iops_refill need tx_iops"
    );
    assert_eq!(parse_scaled("2G", 1), Some(2 << 30));
    assert_eq!(parse_scaled("7", 1 << 20), Some(7 << 20));
    assert_eq!(parse_scaled("99999999999T", 1), None);
    assert_eq!(parse_scaled("1X", 1), None);
}

/// What `consume` costs per request when it does not limit: no buckets (a branch) and buckets
/// far above the rate (the arithmetic, and a clock read per pass over the queue), with one and
/// with 16 requests a pass. Prints CPU nanoseconds per call.
#[test]
#[ignore = "benchmark: cargo test --release -p kvmbox-ratelimit -- --ignored --nocapture"]
fn bench_consume_when_not_limiting() {
    let huge = RateLimiterConfig {
        bandwidth: Some(BucketConfig::per_second(u64::MAX / 4)),
        ops: Some(BucketConfig::per_second(u64::MAX / 4)),
    };
    for (what, cfg) in [
        ("no buckets", RateLimiterConfig::default()),
        ("far above", huge),
    ] {
        for per_pass in [1u64, 16] {
            let mut rl = RateLimiter::new(&cfg).unwrap();
            let n = 10_000_000u64;
            // CPU time of this thread: other processes on a busy host do not count.
            let cpu = || {
                let mut ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: writes one timespec we own.
                unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
                ts.tv_sec as f64 * 1e9 + ts.tv_nsec as f64
            };
            let t = cpu();
            for i in 0..n {
                if i % per_pass == 0 {
                    rl.start_pass();
                }
                assert!(rl.consume(std::hint::black_box(4096 + (i & 1))));
            }
            let ns = (cpu() - t) / n as f64;
            println!("consume, {what}, {per_pass} per pass: {ns:.1} ns per request");
        }
    }
}

#[test]
fn a_saved_state_restores_the_buckets_as_they_were() {
    let t0 = Instant::now();
    let cfg = RateLimiterConfig {
        bandwidth: Some(bucket(1000, 0, 1000)),
        ops: Some(bucket(10, 5, 100)),
    };
    let mut rl = RateLimiter::new_at(&cfg, t0).unwrap();
    // 7 operations: the burst's 5, then 2 of the bucket's 10; 1500 bytes: 500 in debt.
    for _ in 0..6 {
        assert!(rl.consume_at(0, t0));
    }
    assert!(rl.consume_at(1500, t0));
    // 0.3 ms later: the bandwidth bucket earned 0.3 of a token (a carry), nothing counted.
    let saved = rl.save_state_at(t0 + Duration::from_micros(300));
    let bw = saved.bandwidth.unwrap();
    assert_eq!((bw.level, bw.burst_left, bw.carry), (-500, 0, 300_000_000));
    let ops = saved.ops.unwrap();
    assert_eq!((ops.level, ops.burst_left), (8, 0));
    assert_eq!(saved.config(), cfg);
    // Through postcard, as a snapshot stores it (a zero burst included).
    let bytes = postcard::to_stdvec(&saved).unwrap();
    let back: RateLimiterState = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back, saved);

    // Restored an hour later into a limiter made from another configuration: the saved
    // buckets replace its own, and the hour in between earns nothing.
    let t1 = t0 + Duration::from_secs(3600);
    let mut other = RateLimiter::new_at(&RateLimiterConfig::default(), t1).unwrap();
    other.restore_state_at(&back, t1);
    assert!(fired(&other), "a restore wakes the worker");
    other.on_timer();
    assert_eq!(other.config(), cfg);
    // In debt: 500 tokens to earn back and 1 more to pass, 0.3 of one carried: 500.7 ms.
    assert!(!other.consume_at(1, at(t1, 500)));
    other.on_timer();
    assert!(other.consume_at(1, at(t1, 501)));
    // An unlimited state gives an unlimited limiter.
    other.restore_state_at(&RateLimiterState::default(), t1);
    assert!(other.is_unlimited());
}

#[test]
fn a_restored_state_never_holds_more_than_its_configuration_allows() {
    let t0 = Instant::now();
    let s = RateLimiterState {
        bandwidth: Some(BucketState {
            size: 100,
            one_time_burst: 10,
            refill_time: 1000,
            level: 1 << 100,
            burst_left: u64::MAX,
            carry: u128::MAX,
        }),
        ops: Some(BucketState {
            size: 0,
            one_time_burst: 0,
            refill_time: 1000,
            level: 5,
            burst_left: 0,
            carry: 0,
        }),
    };
    let mut rl = RateLimiter::new_at(&RateLimiterConfig::default(), t0).unwrap();
    rl.restore_state_at(&s, t0);
    // The zero-size ops bucket is no bucket; the other holds its size and its burst.
    assert!(rl.config().ops.is_none());
    assert!(rl.consume_at(110, t0));
    assert!(!rl.consume_at(1, t0));
}
