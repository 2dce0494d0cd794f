//! I/O rate limiters, compatible with Firecracker's: a token bucket for bytes and one for
//! operations, each with a size, a refill time and a one-time burst.
//!
//! A bucket holds at most `size` tokens and refills at `size` tokens per `refill_time`
//! milliseconds; it starts full. `one_time_burst` tokens are spent first and never come back.
//! A request larger than the bucket passes when the bucket is full and leaves it in debt, so a
//! huge request is slowed, never refused forever.
//!
//! A device worker asks [`RateLimiter::consume`] before each request (one operation plus the
//! request's bytes). When it says no, nothing was taken and the limiter's timer
//! ([`RateLimiter::as_raw_fd`], a timerfd the worker polls) fires once enough tokens are there;
//! the worker then calls [`RateLimiter::on_timer`] and tries again. Until then every
//! `consume` says no at once, so a throttled device costs nothing per guest notification.
//! [`RateLimiter::update`] changes the buckets live with Firecracker's PATCH rule and fires the
//! timer, so the worker retries under the new limits at once.
//!
//! Every method that reads the clock has an `_at` twin taking the time, for tests.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

const NS_PER_MS: u128 = 1_000_000;

/// One bucket as the configuration gives it (Firecracker's `TokenBucket` object).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketConfig {
    /// Tokens the bucket holds (bytes or operations).
    pub size: u64,
    /// Tokens to spend once before the bucket itself (0: none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub one_time_burst: u64,
    /// Milliseconds to refill the whole bucket from empty.
    pub refill_time: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl BucketConfig {
    /// A bucket of `per_second` tokens refilled every second (what `bw=` and `iops=` give).
    pub fn per_second(per_second: u64) -> Self {
        Self {
            size: per_second,
            one_time_burst: 0,
            refill_time: 1000,
        }
    }

    /// Firecracker's rule: a zero size or refill time means "no bucket".
    pub fn disables(&self) -> bool {
        self.size == 0 || self.refill_time == 0
    }
}

/// A limiter as the configuration gives it (Firecracker's `RateLimiter` object). At start an
/// absent bucket means no limit; in an update it leaves that bucket as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<BucketConfig>,
    /// Operations (requests, frames).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<BucketConfig>,
}

impl RateLimiterConfig {
    /// Check the values; the error names the bucket and field (`bandwidth.refill_time`).
    pub fn validate(&self) -> Result<(), String> {
        for (name, b) in [("bandwidth", &self.bandwidth), ("ops", &self.ops)] {
            if let Some(b) = b {
                // Refill times are computed in nanoseconds (u64): at most ~584 years.
                if b.refill_time > u64::MAX / 1_000_000 {
                    return Err(format!(
                        "{name}.refill_time {} ms is too large (at most {} ms)",
                        b.refill_time,
                        u64::MAX / 1_000_000
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether this limits nothing (no bucket, or only disabling ones).
    pub fn is_unlimited(&self) -> bool {
        [self.bandwidth, self.ops]
            .iter()
            .all(|b| b.is_none_or(|b| b.disables()))
    }

    /// This configuration with `update` applied by Firecracker's PATCH rule: a bucket given
    /// replaces the old one, an absent one leaves it, one with zero size or refill time removes
    /// it.
    pub fn patched(&self, update: &RateLimiterConfig) -> RateLimiterConfig {
        let merge = |old: Option<BucketConfig>, new: Option<BucketConfig>| match new {
            None => old,
            Some(b) if b.disables() => None,
            Some(b) => Some(b),
        };
        RateLimiterConfig {
            bandwidth: merge(self.bandwidth, update.bandwidth),
            ops: merge(self.ops, update.ops),
        }
    }

    /// Apply one `--disk`/`--net` option (`key` without any `rx_`/`tx_` prefix):
    /// `bw=BYTES` and `iops=N` set a bucket's size, refilled every second unless
    /// `bw_refill=MS`/`iops_refill=MS` say otherwise (so `bw` alone is bytes per second);
    /// `bw_burst=BYTES`/`iops_burst=N` set its one-time burst. Sizes and bursts take the
    /// suffixes K, M, G, T (binary). `Ok(false)`: not a rate-limit option.
    pub fn set_option(&mut self, key: &str, value: &str) -> Result<bool, String> {
        let (bucket, field) = key.split_once('_').unwrap_or((key, ""));
        let slot = match bucket {
            "bw" => &mut self.bandwidth,
            "iops" => &mut self.ops,
            _ => return Ok(false),
        };
        if !matches!(field, "" | "burst" | "refill") {
            return Ok(false);
        }
        let n = parse_scaled(value, 1).ok_or_else(|| {
            format!("{key}={value}: expected a number, optionally with K, M, G or T")
        })?;
        if n == 0 && field != "burst" {
            return Err(format!("{key}={value}: must be above 0"));
        }
        let b = slot.get_or_insert(BucketConfig::per_second(0));
        match field {
            "" => b.size = n,
            "burst" => b.one_time_burst = n,
            _ => {
                if n > u64::MAX / 1_000_000 {
                    return Err(format!("{key}={value}: too large"));
                }
                b.refill_time = n;
            }
        }
        Ok(true)
    }

    /// Check after the last [`set_option`](Self::set_option): a burst or refill time needs its
    /// bucket's size.
    pub fn check_options(&self, prefix: &str) -> Result<(), String> {
        for (name, b) in [("bw", &self.bandwidth), ("iops", &self.ops)] {
            if b.is_some_and(|b| b.size == 0) {
                return Err(format!(
                    "{prefix}{name}_burst and {prefix}{name}_refill need {prefix}{name}"
                ));
            }
        }
        Ok(())
    }

    /// The options [`set_option`](Self::set_option) reads back (`prefix` before each key),
    /// each with a leading `,`, for a spec string. Disabling buckets are left out.
    pub fn to_options(&self, prefix: &str) -> String {
        let mut out = String::new();
        for (name, b) in [("bw", &self.bandwidth), ("iops", &self.ops)] {
            let Some(b) = b.filter(|b| !b.disables()) else {
                continue;
            };
            out.push_str(&format!(",{prefix}{name}={}", b.size));
            if b.one_time_burst > 0 {
                out.push_str(&format!(",{prefix}{name}_burst={}", b.one_time_burst));
            }
            if b.refill_time != 1000 {
                out.push_str(&format!(",{prefix}{name}_refill={}", b.refill_time));
            }
        }
        out
    }
}

/// A number with an optional binary suffix (B, K, M, G, T, either case): `4M` is 4194304.
/// A plain number counts `plain_unit`s. `None`: not such a number, or it overflows. kvmbox's one
/// size parser: memory sizes (plain numbers MiB) come here through `kvmbox_vmm::config::parse_size`.
pub fn parse_scaled(s: &str, plain_unit: u64) -> Option<u64> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'B' => 1,
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return None,
            };
            (&t[..i], m)
        }
        _ => (t, plain_unit),
    };
    let n: u64 = num.trim().parse().ok()?;
    n.checked_mul(mult)
}

/// A running token bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    cfg: BucketConfig,
    refill_ns: u128,
    /// Tokens in the bucket; below zero after a request larger than the bucket (debt).
    level: i128,
    /// What is left of the one-time burst.
    burst: u64,
    /// When `level` was last brought up to date.
    last: Instant,
    /// Part of a token earned but not yet counted, in token-nanoseconds (below `refill_ns`).
    carry: u128,
}

impl TokenBucket {
    /// A full bucket at `now`; `None` when `cfg` disables it (zero size or refill time).
    pub fn new(cfg: BucketConfig, now: Instant) -> Option<Self> {
        if cfg.disables() {
            return None;
        }
        Some(Self {
            cfg,
            refill_ns: u128::from(cfg.refill_time) * NS_PER_MS,
            level: i128::from(cfg.size),
            burst: cfg.one_time_burst,
            last: now,
            carry: 0,
        })
    }

    /// The configuration it was made from.
    pub fn config(&self) -> BucketConfig {
        self.cfg
    }

    /// Tokens available now (the one-time burst not counted; negative while in debt).
    pub fn level_at(&mut self, now: Instant) -> i128 {
        self.refill(now);
        self.level
    }

    /// What is left of the one-time burst.
    pub fn burst_left(&self) -> u64 {
        self.burst
    }

    fn refill(&mut self, now: Instant) {
        let size = i128::from(self.cfg.size);
        let Some(dt) = now.checked_duration_since(self.last) else {
            return;
        };
        self.last = now;
        if self.level >= size {
            self.carry = 0;
            return;
        }
        let dt = dt.as_nanos();
        if self.level >= 0 && dt >= self.refill_ns {
            self.level = size;
            self.carry = 0;
            return;
        }
        // u64 arithmetic when it fits (the common case: u128 division is slow), else u128.
        let fits = u64::try_from(dt)
            .ok()
            .zip(u64::try_from(self.refill_ns).ok());
        let (add, carry) = match fits.and_then(|(dt, rn)| {
            let e = dt
                .checked_mul(self.cfg.size)?
                .checked_add(self.carry as u64)?;
            Some((u128::from(e / rn), u128::from(e % rn)))
        }) {
            Some(v) => v,
            None => {
                let earned = dt
                    .saturating_mul(u128::from(self.cfg.size))
                    .saturating_add(self.carry);
                (
                    (earned / self.refill_ns).min(u128::from(u64::MAX)),
                    earned % self.refill_ns,
                )
            }
        };
        self.carry = carry;
        self.level = (self.level + add as i128).min(size);
        if self.level == size {
            self.carry = 0;
        }
    }

    /// Bring the bucket to `now` and say whether `n` tokens can be taken, or how long until
    /// they can.
    fn check(&mut self, n: u64, now: Instant) -> Result<(), Duration> {
        let rest = n.saturating_sub(self.burst);
        if rest == 0 {
            return Ok(());
        }
        self.refill(now);
        // A request larger than the bucket needs a full bucket.
        let need = i128::from(rest.min(self.cfg.size));
        if self.level >= need {
            return Ok(());
        }
        // Saturating: only absurd buckets (sizes and refill times near 2^64) come near it.
        let deficit = ((need - self.level) as u128)
            .saturating_mul(self.refill_ns)
            .saturating_sub(self.carry);
        let size = u128::from(self.cfg.size);
        let ns = deficit.div_ceil(size).min(u128::from(u64::MAX));
        Err(Duration::from_nanos(ns as u64))
    }

    /// Take `n` tokens that [`check`](Self::check) allowed: the burst first, then the bucket.
    fn take(&mut self, n: u64) {
        let from_burst = n.min(self.burst);
        self.burst -= from_burst;
        self.level -= i128::from(n - from_burst);
    }

    /// Take `n` tokens at `now` if they are there; nothing is taken otherwise.
    pub fn try_take_at(&mut self, n: u64, now: Instant) -> Result<(), Duration> {
        self.check(n, now)?;
        self.take(n);
        Ok(())
    }

    /// Give back `n` tokens taken for work that was not done (up to the bucket's size).
    pub fn refund(&mut self, n: u64) {
        self.level = (self.level + i128::from(n)).min(i128::from(self.cfg.size));
    }
}

/// A bucket's state in a snapshot (Firecracker's `TokenBucketState`): its configuration and
/// what it held, brought up to the moment it was saved, so a restore continues from there
/// (the time between saving and restoring earns nothing, as in Firecracker). Plain fields
/// only: a snapshot encodes it with postcard, which cannot skip fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BucketState {
    /// [`BucketConfig::size`].
    pub size: u64,
    /// [`BucketConfig::one_time_burst`].
    pub one_time_burst: u64,
    /// [`BucketConfig::refill_time`].
    pub refill_time: u64,
    /// Tokens in the bucket (negative: debt).
    pub level: i128,
    /// What was left of the one-time burst.
    pub burst_left: u64,
    /// Part of a token earned but not counted yet, in token-nanoseconds.
    pub carry: u128,
}

/// A limiter's state in a snapshot (Firecracker's `RateLimiterState`): each bucket, or none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RateLimiterState {
    /// The bandwidth bucket.
    pub bandwidth: Option<BucketState>,
    /// The operations bucket.
    pub ops: Option<BucketState>,
}

impl RateLimiterState {
    /// The buckets' configuration.
    pub fn config(&self) -> RateLimiterConfig {
        let cfg = |b: &BucketState| BucketConfig {
            size: b.size,
            one_time_burst: b.one_time_burst,
            refill_time: b.refill_time,
        };
        RateLimiterConfig {
            bandwidth: self.bandwidth.as_ref().map(cfg),
            ops: self.ops.as_ref().map(cfg),
        }
    }
}

impl TokenBucket {
    /// Its state at `now`.
    pub fn save_state_at(&mut self, now: Instant) -> BucketState {
        self.refill(now);
        BucketState {
            size: self.cfg.size,
            one_time_burst: self.cfg.one_time_burst,
            refill_time: self.cfg.refill_time,
            level: self.level,
            burst_left: self.burst,
            carry: self.carry,
        }
    }

    /// The bucket `s` describes, refilling from `now`; `None` when its configuration disables
    /// it. What it held is kept within what the configuration allows (at most `size`, a burst
    /// at most `one_time_burst`, a carry below one token), whatever the file says.
    pub fn restore_at(s: &BucketState, now: Instant) -> Option<Self> {
        let mut b = Self::new(
            BucketConfig {
                size: s.size,
                one_time_burst: s.one_time_burst,
                refill_time: s.refill_time,
            },
            now,
        )?;
        b.level = s.level.min(i128::from(s.size));
        b.burst = s.burst_left.min(s.one_time_burst);
        b.carry = s.carry.min(b.refill_ns.saturating_sub(1));
        Some(b)
    }
}

/// A one-shot timer on the monotonic clock, non-blocking (reading it when it has not fired
/// is harmless).
#[derive(Debug)]
struct Timer(OwnedFd);

impl Timer {
    fn new() -> std::io::Result<Self> {
        // SAFETY: timerfd_create takes no pointers; the result is checked below.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor that nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Fire once after `d` (at least 1 ns: zero would disarm), or disarm with `None`.
    fn arm(&self, d: Option<Duration>) {
        let d = d.map_or(Duration::ZERO, |d| d.max(Duration::from_nanos(1)));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: spec is a valid itimerspec for the call; the old value is not asked for.
        // It cannot fail on a valid timerfd with a valid spec.
        unsafe { libc::timerfd_settime(self.0.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
    }

    /// Clear a fired timer (so a level-triggered poll stops reporting it).
    fn clear(&self) {
        let mut n = 0u64;
        // SAFETY: reads at most 8 bytes into n; the descriptor is non-blocking.
        unsafe { libc::read(self.0.as_raw_fd(), (&mut n as *mut u64).cast(), 8) };
    }
}

/// The limiter of one device direction: a bandwidth and an operations bucket, either optional,
/// and the timer that says when to retry.
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: Timer,
    blocked: bool,
    /// The time of this pass over the queue (see [`start_pass`](Self::start_pass)).
    pass_now: Option<Instant>,
}

impl RateLimiter {
    /// A limiter with the buckets `cfg` gives (full), its timer disarmed.
    pub fn new(cfg: &RateLimiterConfig) -> std::io::Result<Self> {
        Self::new_at(cfg, Instant::now())
    }

    /// [`new`](Self::new) at `now`.
    pub fn new_at(cfg: &RateLimiterConfig, now: Instant) -> std::io::Result<Self> {
        Ok(Self {
            bandwidth: cfg.bandwidth.and_then(|b| TokenBucket::new(b, now)),
            ops: cfg.ops.and_then(|b| TokenBucket::new(b, now)),
            timer: Timer::new()?,
            blocked: false,
            pass_now: None,
        })
    }

    /// No bucket: every [`consume`](Self::consume) succeeds without reading the clock.
    #[inline]
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    /// Waiting for the timer: every consume fails until [`on_timer`](Self::on_timer).
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// The buckets now in force, as configuration.
    pub fn config(&self) -> RateLimiterConfig {
        RateLimiterConfig {
            bandwidth: self.bandwidth.as_ref().map(TokenBucket::config),
            ops: self.ops.as_ref().map(TokenBucket::config),
        }
    }

    /// The bandwidth bucket.
    pub fn bandwidth(&mut self) -> Option<&mut TokenBucket> {
        self.bandwidth.as_mut()
    }

    /// The operations bucket.
    pub fn ops(&mut self) -> Option<&mut TokenBucket> {
        self.ops.as_mut()
    }

    /// A worker starts a pass over its queue: [`consume`](Self::consume) reads the clock once
    /// for the pass (a clock read costs more than the arithmetic), and again only before it
    /// says no, so a stale time never holds a request back.
    pub fn start_pass(&mut self) {
        self.pass_now = None;
    }

    /// Take one operation and `bytes` bytes, both or neither. On no, the timer is armed for
    /// when both will be there and the limiter is blocked until it fires.
    #[inline]
    pub fn consume(&mut self, bytes: u64) -> bool {
        if self.is_unlimited() {
            return true;
        }
        if self.blocked {
            return false;
        }
        if let Some(t) = self.pass_now {
            if self.check(bytes, t).is_ok() {
                self.take(bytes);
                return true;
            }
        }
        let now = Instant::now();
        self.pass_now = Some(now);
        self.consume_at(bytes, now)
    }

    /// Whether one operation and `bytes` bytes are there at `now`, or how long until they are.
    fn check(&mut self, bytes: u64, now: Instant) -> Result<(), Duration> {
        let ops = self.ops.as_mut().map_or(Ok(()), |b| b.check(1, now));
        let bw = self
            .bandwidth
            .as_mut()
            .map_or(Ok(()), |b| b.check(bytes, now));
        match (ops, bw) {
            (Ok(()), Ok(())) => Ok(()),
            (a, b) => Err(a.err().max(b.err()).unwrap_or_default()),
        }
    }

    /// Take what [`check`](Self::check) allowed.
    fn take(&mut self, bytes: u64) {
        if let Some(b) = self.ops.as_mut() {
            b.take(1);
        }
        if let Some(b) = self.bandwidth.as_mut() {
            b.take(bytes);
        }
    }

    /// [`consume`](Self::consume) at `now`; `Err` holds the wait the timer was armed with.
    pub fn consume_at(&mut self, bytes: u64, now: Instant) -> bool {
        self.try_consume_at(bytes, now).is_ok()
    }

    /// [`consume_at`](Self::consume_at), saying how long the timer waits on no (`None` while
    /// already blocked).
    pub fn try_consume_at(&mut self, bytes: u64, now: Instant) -> Result<(), Option<Duration>> {
        if self.blocked {
            return Err(None);
        }
        match self.check(bytes, now) {
            Ok(()) => {
                self.take(bytes);
                Ok(())
            }
            Err(wait) => {
                self.blocked = true;
                self.timer.arm(Some(wait));
                Err(Some(wait))
            }
        }
    }

    /// Give back one operation and `bytes` bytes taken for work that was not done.
    pub fn refund(&mut self, bytes: u64) {
        if let Some(b) = self.ops.as_mut() {
            b.refund(1);
        }
        if let Some(b) = self.bandwidth.as_mut() {
            b.refund(bytes);
        }
    }

    /// The timer fired: clear it and unblock (the worker then retries).
    pub fn on_timer(&mut self) {
        self.timer.clear();
        self.blocked = false;
    }

    /// Change the buckets live by Firecracker's PATCH rule
    /// ([`RateLimiterConfig::patched`]); a replaced bucket starts full. The timer fires at
    /// once so the worker retries under the new limits.
    pub fn update(&mut self, update: &RateLimiterConfig) {
        self.update_at(update, Instant::now())
    }

    /// [`update`](Self::update) at `now`.
    pub fn update_at(&mut self, update: &RateLimiterConfig, now: Instant) {
        let apply = |old: &mut Option<TokenBucket>, new: Option<BucketConfig>| {
            if let Some(b) = new {
                *old = TokenBucket::new(b, now);
            }
        };
        apply(&mut self.bandwidth, update.bandwidth);
        apply(&mut self.ops, update.ops);
        self.blocked = false;
        self.timer.arm(Some(Duration::ZERO));
    }
}

impl RateLimiter {
    /// Its buckets' state, for a snapshot.
    pub fn save_state(&mut self) -> RateLimiterState {
        self.save_state_at(Instant::now())
    }

    /// [`save_state`](Self::save_state) at `now`.
    pub fn save_state_at(&mut self, now: Instant) -> RateLimiterState {
        RateLimiterState {
            bandwidth: self.bandwidth.as_mut().map(|b| b.save_state_at(now)),
            ops: self.ops.as_mut().map(|b| b.save_state_at(now)),
        }
    }

    /// Put the buckets of a snapshot's state in place of these (the timer stays the same
    /// descriptor, so a worker polling it keeps it) and fire the timer, so the worker retries
    /// under them at once.
    pub fn restore_state(&mut self, s: &RateLimiterState) {
        self.restore_state_at(s, Instant::now())
    }

    /// [`restore_state`](Self::restore_state) at `now`.
    pub fn restore_state_at(&mut self, s: &RateLimiterState, now: Instant) {
        self.bandwidth = s
            .bandwidth
            .as_ref()
            .and_then(|b| TokenBucket::restore_at(b, now));
        self.ops = s.ops.as_ref().and_then(|b| TokenBucket::restore_at(b, now));
        self.blocked = false;
        self.pass_now = None;
        self.timer.arm(Some(Duration::ZERO));
    }
}

impl AsRawFd for RateLimiter {
    /// The timer: readable when the worker should call [`on_timer`](Self::on_timer) and retry.
    fn as_raw_fd(&self) -> RawFd {
        self.timer.0.as_raw_fd()
    }
}

#[cfg(test)]
mod tests;
