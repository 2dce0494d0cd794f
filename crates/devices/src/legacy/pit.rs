//! Intel 8254 programmable interval timer (ports 0x40-0x43) and the port 0x61 system control
//! bits that gate channel 2 and show its output, as Linux's TSC/APIC calibration uses them.
//!
//! Both backends use this PIT (KVM runs a split irqchip, so its in-kernel PIT is not used).
//! The PIT is a pure state machine over a [`Clock`]: nothing happens between guest accesses
//! except through [`TimedDevice::tick`], which raises IRQ 0 at channel 0's output edges, and
//! [`Pit::irq_acked`]. A [`TimerThread`] calls `tick` at [`TimedDevice::next_deadline`], so a
//! guest that waits for the timer interrupt gets it on time; tests call `tick` themselves
//! with a [`ManualClock`].
//!
//! # Missed ticks (channel 0, modes 2 and 3)
//! On a busy host the timer thread and the vCPU threads run late, so several periods can pass
//! between two interrupts the guest takes. A real PIT would coalesce them into one edge, and
//! a guest that counts ticks (Linux's `timer_irq_works()` wants more than 4 jiffies while its
//! TSC-timed delay runs; jiffies timekeeping) falls behind host time. So, as KVM's in-kernel
//! PIT does in its default "reinject" mode (`arch/x86/kvm/i8254.c`), every period that comes
//! due by the clock is counted, and the periods are raised one edge at a time, each once the
//! interrupt controller acknowledged the previous one ([`Pit::irq_acked`]: the PIC's EOI, or
//! a local APIC's EOI of the vector IOAPIC pin 2 sends). Missed ticks thus arrive back to
//! back as soon as the guest runs again. Two guards keep a guest that never acknowledges
//! harmless:
//! - the backlog holds at most [`MAX_BACKLOG_NS`] (1 s) worth of periods; older ones are
//!   dropped as hardware would drop them (KVM counts without a bound);
//! - an edge not acknowledged within a period (at least [`RETRY_MIN_NS`]) is raised again,
//!   as hardware raises one every period: an edge lost to a controller the guest
//!   reprogrammed meanwhile cannot stall the timer, and the timer thread never wakes more
//!   often than every [`RETRY_MIN_NS`] while it waits.
//!
//! Reprogramming channel 0 (control word or count) drops the backlog, as KVM does.
//!
//! This file also holds the small time plumbing the timer devices share: [`Clock`],
//! [`HostClock`], [`ManualClock`], [`TimedDevice`], [`TimerWaker`] and [`TimerThread`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvmbox_cpu::IrqLine;

use crate::BusDevice;

pub mod persist;

/// Input clock of the 8254 on a PC, in Hz.
pub const PIT_HZ: u64 = 1_193_182;
/// First PIT port (channel 0 data); channels 1, 2 and the mode/command port follow.
pub const PIT_PORT: u16 = 0x40;
/// How many ports the PIT occupies at [`PIT_PORT`].
pub const PIT_PORT_LEN: u64 = 4;
/// The system control port B (speaker gate, channel 2 output, refresh toggle).
pub const SPEAKER_PORT: u16 = 0x61;
/// Period of the DRAM refresh toggle in port 0x61 bit 4, in ns.
const REFRESH_PERIOD_NS: u64 = 15_085;
const NS_PER_SEC: u64 = 1_000_000_000;
/// Channel 0 keeps at most this much time's worth of missed periods (one second: any
/// scheduling delay a loaded host showed is far shorter, and a guest stopped longer catches
/// up at most one second of ticks).
pub const MAX_BACKLOG_NS: u64 = NS_PER_SEC;
/// Shortest wait before an unacknowledged IRQ 0 edge is raised again (see the module docs).
pub const RETRY_MIN_NS: u64 = 1_000_000;

/// Monotonic time in nanoseconds, from an arbitrary start. Every timer device and the
/// interrupt controllers of one VM share one clock.
pub trait Clock: Send + Sync {
    /// Nanoseconds since the clock's start. Never goes backwards.
    fn now_ns(&self) -> u64;
}

/// The host's monotonic clock, counted from when this value was created.
#[derive(Debug, Clone, Copy)]
pub struct HostClock {
    start: Instant,
}

impl HostClock {
    /// A clock that reads 0 now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
        }
    }
}

impl Default for HostClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for HostClock {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A clock that only moves when told to: deterministic tests of timer devices.
#[derive(Debug, Default)]
pub struct ManualClock {
    ns: AtomicU64,
}

impl ManualClock {
    /// A clock reading `ns`.
    pub fn new(ns: u64) -> Self {
        Self {
            ns: AtomicU64::new(ns),
        }
    }
    /// Move the clock forward by `ns`.
    pub fn advance(&self, ns: u64) {
        self.ns.fetch_add(ns, Ordering::SeqCst);
    }
    /// Set the clock to `ns` (callers keep it monotonic).
    pub fn set(&self, ns: u64) {
        self.ns.store(ns, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.ns.load(Ordering::SeqCst)
    }
}

/// A device that does something at points in time (raises a timer interrupt).
pub trait TimedDevice: Send {
    /// Bring the device up to `now_ns`, raising any interrupt that became due.
    fn tick(&mut self, now_ns: u64);
    /// When `tick` next has something to do, if ever (clock nanoseconds).
    fn next_deadline(&self) -> Option<u64>;
}

/// Wakes a [`TimerThread`] early, when the guest reprograms its device (and starts it, the
/// first time).
#[derive(Debug, Default)]
pub struct TimerWaker {
    generation: Mutex<u64>,
    cv: Condvar,
    start: Mutex<Option<Starter>>,
}

/// Starts a [`TimerThread`]'s thread.
struct Starter(Box<dyn FnOnce() + Send>);

impl std::fmt::Debug for Starter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Starter")
    }
}

impl TimerWaker {
    /// A waker nobody waits on yet.
    pub fn new() -> Self {
        Self::default()
    }
    /// Make the timer thread recompute its deadline (starting it if it has not run yet).
    pub fn wake(&self) {
        {
            let mut g = self.generation.lock().unwrap_or_else(|e| e.into_inner());
            *g = g.wrapping_add(1);
            self.cv.notify_all();
        }
        let start = self.start.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(Starter(start)) = start {
            start();
        }
    }
    fn generation(&self) -> u64 {
        *self.generation.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Wait until woken after `seen`, or for `timeout` (forever when `None`).
    fn wait(&self, seen: u64, timeout: Option<Duration>) {
        let g = self.generation.lock().unwrap_or_else(|e| e.into_inner());
        match timeout {
            Some(t) => {
                drop(
                    self.cv
                        .wait_timeout_while(g, t, |g| *g == seen)
                        .unwrap_or_else(|e| e.into_inner()),
                );
            }
            None => {
                drop(
                    self.cv
                        .wait_while(g, |g| *g == seen)
                        .unwrap_or_else(|e| e.into_inner()),
                );
            }
        }
    }
}

/// A host thread that calls [`TimedDevice::tick`] whenever the device's next deadline comes,
/// or when the device's [`TimerWaker`] is woken. Stops when dropped.
///
/// The thread starts only when the device first has something to do: at once if it has a
/// deadline already, otherwise when its waker is first woken (the guest programs the device,
/// or a snapshot's state is put in). A guest that never uses the timer (most tiny guests do
/// not touch the RTC's interrupts) costs no thread.
pub struct TimerThread {
    stop: Arc<AtomicBool>,
    waker: Arc<TimerWaker>,
    handle: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl TimerThread {
    /// Drive `dev` by `clock` from a thread named `name`, started as described above. Give the
    /// device the same `waker` (e.g. [`Pit::set_waker`]) so reprogramming takes effect at once.
    /// A thread that cannot be started later is reported on stderr (the device's interrupts
    /// then do not come).
    pub fn spawn<D: TimedDevice + 'static>(
        name: &str,
        dev: Arc<Mutex<D>>,
        clock: Arc<dyn Clock>,
        waker: Arc<TimerWaker>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = Arc::new(Mutex::new(None));
        let due = dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next_deadline()
            .is_some();
        let start = {
            let (name, stop, waker, handle) = (
                name.to_string(),
                stop.clone(),
                waker.clone(),
                handle.clone(),
            );
            move || -> std::io::Result<()> {
                let h = Self::start(&name, dev, clock, waker, stop)?;
                *handle.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
                Ok(())
            }
        };
        if due {
            start()?;
        } else {
            let name = name.to_string();
            *waker.start.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(Starter(Box::new(move || {
                    if let Err(e) = start() {
                        eprintln!("kvmbox: cannot start the {name} timer thread: {e}");
                    }
                })));
        }
        Ok(Self {
            stop,
            waker,
            handle,
        })
    }

    /// Whether the thread has been started.
    pub fn is_started(&self) -> bool {
        self.handle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    fn start<D: TimedDevice + 'static>(
        name: &str,
        dev: Arc<Mutex<D>>,
        clock: Arc<dyn Clock>,
        w: Arc<TimerWaker>,
        s: Arc<AtomicBool>,
    ) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                kvmbox_seccomp::apply_or_exit(kvmbox_seccomp::ThreadKind::Timer);
                loop {
                    if s.load(Ordering::SeqCst) {
                        return;
                    }
                    let seen = w.generation();
                    let now = clock.now_ns();
                    let deadline = {
                        let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
                        d.tick(now);
                        d.next_deadline()
                    };
                    let timeout = deadline.map(|d| Duration::from_nanos(d.saturating_sub(now)));
                    if timeout != Some(Duration::ZERO) {
                        w.wait(seen, timeout);
                    }
                }
            })
    }
}

impl Drop for TimerThread {
    fn drop(&mut self) {
        // A thread not started yet never will be.
        drop(
            self.waker
                .start
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        self.stop.store(true, Ordering::SeqCst);
        self.waker.wake();
        let handle = self.handle.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

fn ns_to_ticks(ns: u64) -> u64 {
    u64::try_from(u128::from(ns) * u128::from(PIT_HZ) / u128::from(NS_PER_SEC)).unwrap_or(u64::MAX)
}

/// Nanoseconds until `ticks` PIT ticks have passed (rounded up).
fn ticks_to_ns(ticks: u64) -> u64 {
    let ns = (u128::from(ticks) * u128::from(NS_PER_SEC)).div_ceil(u128::from(PIT_HZ));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

fn bcd_to_bin(v: u16) -> u32 {
    let d = |s: u32| u32::from((v >> s) & 0xf).min(9);
    d(12) * 1000 + d(8) * 100 + d(4) * 10 + d(0)
}

fn bin_to_bcd(v: u32) -> u16 {
    let v = v % 10_000;
    // Each digit is < 10, so every shift stays inside 16 bits.
    (((v / 1000) << 12) | ((v / 100 % 10) << 8) | ((v / 10 % 10) << 4) | (v % 10)) as u16
}

/// Access mode of a channel (control word bits 5-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Access {
    Lsb,
    Msb,
    Word,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Channel {
    mode: u8,
    bcd: bool,
    access: Access,
    /// Count written by the guest, as a binary value in 1..=65536 (10000 in BCD).
    reload: u32,
    /// The count is loaded and the counter runs (when its gate lets it).
    armed: bool,
    gate: bool,
    /// Ticks counted before `run_since`.
    base_ticks: u64,
    /// When the counter last started or resumed counting.
    run_since: u64,
    /// Modes 1 and 5: the gate has triggered the count.
    triggered: bool,
    /// LSB of a word write waiting for its MSB.
    write_lsb: Option<u8>,
    /// Next word read returns the MSB.
    read_msb: bool,
    /// Latched count bytes still to be read (LSB first).
    latch: Vec<u8>,
    /// Latched status byte.
    status: Option<u8>,
    /// Output edges already counted (periodic modes) or whether the one edge was (one-shot).
    edges: u64,
    /// Periodic modes, channel 0: periods counted and not raised yet (missed ticks).
    backlog: u64,
    /// Channel 0: an IRQ 0 edge was raised and not acknowledged yet.
    in_flight: bool,
    /// When that edge was last raised (clock ns).
    raised_at: u64,
}

impl Channel {
    fn new(gate: bool) -> Self {
        Self {
            mode: 0,
            bcd: false,
            access: Access::Word,
            reload: 0x1_0000,
            armed: false,
            gate,
            base_ticks: 0,
            run_since: 0,
            triggered: false,
            write_lsb: None,
            read_msb: false,
            latch: Vec::new(),
            status: None,
            edges: 0,
            backlog: 0,
            in_flight: false,
            raised_at: 0,
        }
    }

    fn periodic(&self) -> bool {
        matches!(self.eff_mode(), 2 | 3)
    }

    /// Forget missed periods and any edge awaiting its acknowledgement (reprogramming).
    fn drop_backlog(&mut self) {
        self.backlog = 0;
        self.in_flight = false;
    }

    /// The most periods the backlog holds: [`MAX_BACKLOG_NS`] worth, at least one.
    fn max_backlog(&self) -> u64 {
        (ns_to_ticks(MAX_BACKLOG_NS) / u64::from(self.reload).max(1)).max(1)
    }

    /// How long an edge may wait for its acknowledgement before it is raised again.
    fn retry_ns(&self) -> u64 {
        ticks_to_ns(u64::from(self.reload)).max(RETRY_MIN_NS)
    }

    /// Mode 6 and 7 are aliases of 2 and 3.
    fn eff_mode(&self) -> u8 {
        match self.mode {
            6 => 2,
            7 => 3,
            m => m,
        }
    }

    /// Ticks counted since the count was loaded.
    fn ticks(&self, now: u64) -> u64 {
        if !self.armed {
            return 0;
        }
        let running = match self.eff_mode() {
            1 | 5 => self.triggered,
            _ => self.gate,
        };
        if running {
            self.base_ticks + ns_to_ticks(now.saturating_sub(self.run_since))
        } else {
            self.base_ticks
        }
    }

    fn counter(&self, now: u64) -> u32 {
        let c = u64::from(self.reload);
        if !self.armed {
            return self.reload;
        }
        let d = self.ticks(now);
        let v = match self.eff_mode() {
            2 => c - d % c,
            3 => c - (2 * d) % c,
            _ => (c.wrapping_sub(d)) & 0xffff,
        };
        (v & 0x1_ffff) as u32
    }

    fn out(&self, now: u64) -> bool {
        let c = u64::from(self.reload);
        let mode = self.eff_mode();
        if !self.armed {
            return mode != 0;
        }
        let d = self.ticks(now);
        match mode {
            0 => d >= c,
            1 => !self.triggered || d >= c,
            2 => !self.gate || d % c != c - 1,
            3 => !self.gate || (d % c) < c.div_ceil(2),
            _ => {
                let triggered = mode == 4 || self.triggered;
                !(triggered && d == c)
            }
        }
    }

    /// Tick count at which the next rising output edge after `edges` happens.
    fn next_edge(&self) -> Option<u64> {
        let c = u64::from(self.reload);
        match self.eff_mode() {
            2 | 3 => Some((self.edges + 1) * c),
            0 | 1 if self.edges == 0 => Some(c),
            4 | 5 if self.edges == 0 => Some(c + 1),
            _ => None,
        }
    }

    fn running(&self) -> bool {
        self.armed
            && match self.eff_mode() {
                1 | 5 => self.triggered,
                _ => self.gate,
            }
    }

    /// How many rising output edges happened between the last call and `now` (one-shot
    /// modes: 0 or 1).
    fn take_edges(&mut self, now: u64) -> u64 {
        if !self.running() {
            return 0;
        }
        let d = self.ticks(now);
        let c = u64::from(self.reload);
        if self.periodic() {
            let k = d / c;
            let new = k.saturating_sub(self.edges);
            self.edges = self.edges.max(k);
            return new;
        }
        match self.next_edge() {
            Some(e) if d >= e => {
                self.edges = 1;
                1
            }
            _ => 0,
        }
    }

    /// Clock time of the next rising output edge, if the counter runs towards one.
    fn next_edge_ns(&self) -> Option<u64> {
        if !self.running() {
            return None;
        }
        let e = self.next_edge()?;
        let todo = e.saturating_sub(self.base_ticks);
        Some(self.run_since.saturating_add(ticks_to_ns(todo)))
    }

    fn load(&mut self, value: u16, now: u64) {
        let v = if self.bcd {
            bcd_to_bin(value)
        } else {
            u32::from(value)
        };
        self.reload = match (v, self.bcd) {
            (0, false) => 0x1_0000,
            (0, true) => 10_000,
            (v, _) => v,
        };
        // Mode 2 and 3 with a count of 1 would divide by one forever; hardware treats 1
        // as illegal there. Keep at least 2 so the output still toggles.
        if matches!(self.eff_mode(), 2 | 3) && self.reload < 2 {
            self.reload = 2;
        }
        self.armed = true;
        self.base_ticks = 0;
        self.run_since = now;
        self.edges = 0;
        self.triggered = false;
        self.drop_backlog();
    }

    fn set_gate(&mut self, gate: bool, now: u64) {
        if gate == self.gate {
            return;
        }
        let before = self.ticks(now);
        self.gate = gate;
        match self.eff_mode() {
            1 | 2 | 3 | 5 if gate => {
                // A rising gate (re)starts the count.
                self.base_ticks = 0;
                self.run_since = now;
                self.edges = 0;
                self.triggered = true;
            }
            _ if gate => self.run_since = now,
            _ => self.base_ticks = before,
        }
    }

    fn status_byte(&self, now: u64) -> u8 {
        let access = match self.access {
            Access::Lsb => 1,
            Access::Msb => 2,
            Access::Word => 3,
        };
        (u8::from(self.out(now)) << 7)
            | (u8::from(!self.armed) << 6)
            | (access << 4)
            | (self.mode << 1)
            | u8::from(self.bcd)
    }

    fn latch_count(&mut self, now: u64) {
        if !self.latch.is_empty() {
            return;
        }
        let v = self.counter_value(now);
        self.latch = match self.access {
            Access::Lsb => vec![v as u8],
            Access::Msb => vec![(v >> 8) as u8],
            Access::Word => vec![v as u8, (v >> 8) as u8],
        };
    }

    /// The counter as the guest reads it (BCD-encoded in BCD mode).
    fn counter_value(&self, now: u64) -> u16 {
        let v = self.counter(now);
        if self.bcd {
            bin_to_bcd(v)
        } else {
            (v & 0xffff) as u16
        }
    }

    fn read(&mut self, now: u64) -> u8 {
        if let Some(s) = self.status.take() {
            return s;
        }
        if !self.latch.is_empty() {
            return self.latch.remove(0);
        }
        let v = self.counter_value(now);
        match self.access {
            Access::Lsb => v as u8,
            Access::Msb => (v >> 8) as u8,
            Access::Word => {
                self.read_msb = !self.read_msb;
                if self.read_msb {
                    v as u8
                } else {
                    (v >> 8) as u8
                }
            }
        }
    }

    fn write(&mut self, b: u8, now: u64) {
        match self.access {
            Access::Lsb => self.load(u16::from(b), now),
            Access::Msb => self.load(u16::from(b) << 8, now),
            Access::Word => match self.write_lsb.take() {
                None => {
                    self.write_lsb = Some(b);
                    if self.eff_mode() == 0 {
                        // Writing the first byte stops a mode 0 count (output low).
                        self.armed = false;
                    }
                }
                Some(lsb) => self.load(u16::from(lsb) | (u16::from(b) << 8), now),
            },
        }
    }

    fn control(&mut self, cw: u8) {
        self.access = match (cw >> 4) & 3 {
            1 => Access::Lsb,
            2 => Access::Msb,
            _ => Access::Word,
        };
        self.mode = (cw >> 1) & 7;
        self.bcd = cw & 1 != 0;
        self.armed = false;
        self.write_lsb = None;
        self.read_msb = false;
        self.latch.clear();
        self.status = None;
        self.edges = 0;
        self.triggered = false;
        self.drop_backlog();
    }
}

/// The 8254 PIT with channel 0 on IRQ 0 and channel 2 gated by port 0x61.
///
/// Insert it on the port bus twice: at [`PIT_PORT`] (length [`PIT_PORT_LEN`]) and at
/// [`SPEAKER_PORT`] (length 1).
pub struct Pit {
    channels: [Channel; 3],
    /// Port 0x61 bits 0-3 as last written.
    port61: u8,
    irq: Option<Arc<dyn IrqLine>>,
    clock: Arc<dyn Clock>,
    waker: Option<Arc<TimerWaker>>,
    /// IRQ delivery failures (the line's eventfd is gone); counted, not fatal.
    irq_errors: u64,
}

impl Pit {
    /// A PIT in its power-on state; channel 0 raises `irq` (IRQ 0) when given.
    pub fn new(irq: Option<Arc<dyn IrqLine>>, clock: Arc<dyn Clock>) -> Self {
        Self {
            channels: [Channel::new(true), Channel::new(true), Channel::new(false)],
            port61: 0,
            irq,
            clock,
            waker: None,
            irq_errors: 0,
        }
    }

    /// Wake this timer thread whenever the guest reprograms the PIT.
    pub fn set_waker(&mut self, waker: Arc<TimerWaker>) {
        self.waker = Some(waker);
    }

    /// How many IRQ 0 deliveries failed so far.
    pub fn irq_errors(&self) -> u64 {
        self.irq_errors
    }

    fn wake(&self) {
        if let Some(w) = &self.waker {
            w.wake();
        }
    }

    /// A byte read from port `port` (0x40-0x43 or 0x61).
    pub fn read_port(&mut self, port: u16) -> u8 {
        let now = self.clock.now_ns();
        match port {
            0x40..=0x42 => self.channels[usize::from(port - 0x40)].read(now),
            SPEAKER_PORT => {
                let ch2 = &self.channels[2];
                let refresh = (now / REFRESH_PERIOD_NS) & 1 == 1;
                (self.port61 & 0x0f) | (u8::from(refresh) << 4) | (u8::from(ch2.out(now)) << 5)
            }
            // The mode/command port is write-only.
            _ => 0xff,
        }
    }

    /// A byte written to port `port` (0x40-0x43 or 0x61).
    pub fn write_port(&mut self, port: u16, value: u8) {
        let now = self.clock.now_ns();
        // Account for channel 0 edges up to now before changing anything.
        self.tick(now);
        match port {
            0x40..=0x42 => self.channels[usize::from(port - 0x40)].write(value, now),
            0x43 => self.command(value, now),
            SPEAKER_PORT => {
                self.port61 = value & 0x0f;
                self.channels[2].set_gate(value & 1 != 0, now);
            }
            _ => {}
        }
        self.wake();
    }

    fn command(&mut self, cw: u8, now: u64) {
        let sel = cw >> 6;
        if sel == 3 {
            // Read-back: bit 5 clear latches counts, bit 4 clear latches status.
            for (i, ch) in self.channels.iter_mut().enumerate() {
                if cw & (2 << i) == 0 {
                    continue;
                }
                if cw & 0x10 == 0 && ch.status.is_none() {
                    ch.status = Some(ch.status_byte(now));
                }
                if cw & 0x20 == 0 {
                    ch.latch_count(now);
                }
            }
            return;
        }
        let ch = &mut self.channels[usize::from(sel)];
        if (cw >> 4) & 3 == 0 {
            ch.latch_count(now);
        } else {
            ch.control(cw);
        }
    }

    /// Channel 2's output (port 0x61 bit 5).
    pub fn channel2_out(&self) -> bool {
        self.channels[2].out(self.clock.now_ns())
    }
}

impl Pit {
    /// The interrupt controller acknowledged IRQ 0 (the PIC's EOI of IRQ 0, or a local APIC's
    /// EOI of the vector IOAPIC pin 2 sends): raise the next missed period now, if one is due.
    /// Give the controller [`Pit::ack_notifier`] so it calls this.
    pub fn irq_acked(&mut self) {
        if !self.channels[0].in_flight {
            return;
        }
        self.channels[0].in_flight = false;
        self.tick(self.clock.now_ns());
        // The deadline moved (to the next period, or a retry of the edge just raised).
        self.wake();
    }

    /// A callback for the interrupt controller's IRQ 0 acknowledgements that calls
    /// [`Pit::irq_acked`] (holding the PIT weakly: the controller outlives no PIT through it).
    pub fn ack_notifier(pit: &Arc<Mutex<Pit>>) -> Arc<dyn Fn() + Send + Sync> {
        let weak = Arc::downgrade(pit);
        Arc::new(move || {
            if let Some(p) = weak.upgrade() {
                p.lock().unwrap_or_else(|e| e.into_inner()).irq_acked();
            }
        })
    }

    /// Missed channel 0 periods waiting to be raised.
    pub fn backlog(&self) -> u64 {
        self.channels[0].backlog
    }

    fn raise_irq0(&mut self) {
        if let Some(irq) = &self.irq {
            if irq.trigger().is_err() {
                self.irq_errors += 1;
            }
        }
    }
}

impl TimedDevice for Pit {
    fn tick(&mut self, now_ns: u64) {
        let ch = &mut self.channels[0];
        let new = ch.take_edges(now_ns);
        if !ch.periodic() {
            if new > 0 {
                self.raise_irq0();
            }
            return;
        }
        ch.backlog = ch.backlog.saturating_add(new).min(ch.max_backlog());
        if !ch.in_flight {
            if ch.backlog == 0 {
                return;
            }
            ch.backlog -= 1;
            ch.in_flight = true;
        } else if now_ns.saturating_sub(ch.raised_at) < ch.retry_ns() {
            return;
        }
        // A new edge, or the unacknowledged one again (the controller coalesces it if it
        // still holds the first).
        ch.raised_at = now_ns;
        self.raise_irq0();
    }

    fn next_deadline(&self) -> Option<u64> {
        self.irq.as_ref()?;
        let ch = &self.channels[0];
        if ch.in_flight && ch.running() {
            return Some(ch.raised_at.saturating_add(ch.retry_ns()));
        }
        ch.next_edge_ns()
    }
}

impl BusDevice for Pit {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if data.len() != 1 {
            return;
        }
        let port = u16::try_from(base + offset).unwrap_or(0);
        data[0] = self.read_port(port);
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        let port = u16::try_from(base + offset).unwrap_or(0);
        self.write_port(port, data[0]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::legacy::test_util::CountingIrq;

    fn pit() -> (Pit, Arc<ManualClock>, Arc<CountingIrq>) {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let irq = Arc::new(CountingIrq::default());
        let pit = Pit::new(Some(irq.clone()), clock.clone());
        (pit, clock, irq)
    }

    fn read_count(p: &mut Pit, ch: u16) -> u16 {
        p.write_port(0x43, (ch as u8) << 6); // latch
        let lo = p.read_port(0x40 + ch);
        let hi = p.read_port(0x40 + ch);
        u16::from(lo) | (u16::from(hi) << 8)
    }

    #[test]
    fn linux_pit_calibration_sequence_on_channel2() {
        // arch/x86/kernel/tsc.c pit_calibrate_tsc(): gate high, speaker off, mode 0, 50 ms.
        let (mut p, clock, _) = pit();
        let latch: u16 = (PIT_HZ / 20) as u16;
        let v = p.read_port(0x61);
        p.write_port(0x61, (v & !0x02) | 0x01);
        p.write_port(0x43, 0xb0);
        p.write_port(0x42, latch as u8);
        p.write_port(0x42, (latch >> 8) as u8);
        assert_eq!(p.read_port(0x61) & 0x20, 0, "OUT2 low while counting");
        clock.advance(49_000_000);
        assert_eq!(p.read_port(0x61) & 0x20, 0, "not yet after 49 ms");
        // The counter is counting down towards zero.
        let c = read_count(&mut p, 2);
        let expect = u32::from(latch) - (49_000_000u64 * PIT_HZ / NS_PER_SEC) as u32;
        assert!((u32::from(c)).abs_diff(expect) <= 1, "{c} vs {expect}");
        clock.advance(1_000_000);
        assert_eq!(p.read_port(0x61) & 0x21, 0x21, "OUT2 high at 50 ms");
        // Dropping the gate stops a mode 0 count; raising it resumes.
        p.write_port(0x43, 0xb0);
        p.write_port(0x42, 0xff);
        p.write_port(0x42, 0xff);
        clock.advance(1_000_000);
        p.write_port(0x61, 0);
        let frozen = read_count(&mut p, 2);
        clock.advance(5_000_000);
        assert_eq!(read_count(&mut p, 2), frozen);
        p.write_port(0x61, 1);
        clock.advance(1_000_000);
        assert!(read_count(&mut p, 2) < frozen);
    }

    #[test]
    fn quick_pit_calibrate_reads_msb_only() {
        // quick_pit_calibrate(): mode 0, LSB/MSB, count 0xffff, then reads LSB and MSB
        // with no latch command and expects the MSB to go down by one every 256 ticks.
        let (mut p, clock, _) = pit();
        p.write_port(0x61, 1);
        p.write_port(0x43, 0xb0);
        p.write_port(0x42, 0xff);
        p.write_port(0x42, 0xff);
        let mut prev = 0xffu8;
        for _ in 0..10 {
            clock.advance(ticks_to_ns(256));
            let _lsb = p.read_port(0x42);
            let msb = p.read_port(0x42);
            assert_eq!(msb, prev - 1);
            prev = msb;
        }
    }

    #[test]
    fn mode2_periodic_irq0_and_deadlines() {
        // Linux's PIT clockevent: 0x34 (ch0, lsb/msb, mode 2), LATCH for HZ=1000.
        let (mut p, clock, irq) = pit();
        let latch = PIT_HZ.div_ceil(1000) as u16;
        p.write_port(0x43, 0x34);
        p.write_port(0x40, latch as u8);
        p.write_port(0x40, (latch >> 8) as u8);
        let start = clock.now_ns();
        let d = p.next_deadline().unwrap();
        assert_eq!(d, start + ticks_to_ns(u64::from(latch)));
        clock.set(d - 1);
        p.tick(clock.now_ns());
        assert_eq!(irq.0.load(Ordering::SeqCst), 0);
        clock.set(d);
        p.tick(clock.now_ns());
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        // Not acknowledged yet: the next wake-up is the retry of this edge, a period on.
        let d2 = p.next_deadline().unwrap();
        assert!(d2 > d && d2 - d <= 1_001_000, "period {}", d2 - d);
        p.irq_acked();
        assert_eq!(
            p.next_deadline().unwrap(),
            d2,
            "acknowledged: the next period"
        );
    }

    /// Linux's PIT clockevent at HZ=1000 on a PIT whose thread delivers edge after edge.
    fn periodic_1khz() -> (Pit, Arc<ManualClock>, Arc<CountingIrq>, u64) {
        let (mut p, clock, irq) = pit();
        let latch = PIT_HZ.div_ceil(1000);
        p.write_port(0x43, 0x34);
        p.write_port(0x40, latch as u8);
        p.write_port(0x40, (latch >> 8) as u8);
        (p, clock, irq, ticks_to_ns(latch))
    }

    fn irqs(irq: &CountingIrq) -> u64 {
        irq.0.load(Ordering::SeqCst)
    }

    #[test]
    fn missed_periods_are_raised_one_per_acknowledgement() {
        let (mut p, clock, irq, period) = periodic_1khz();
        // The timer thread and the vCPU ran late: 10.5 periods pass before the next tick.
        clock.advance(10 * period + period / 2);
        p.tick(clock.now_ns());
        assert_eq!(irqs(&irq), 1, "one edge at a time");
        assert_eq!(p.backlog(), 9);
        // Ticks before the acknowledgement raise nothing new.
        clock.advance(period / 4);
        p.tick(clock.now_ns());
        assert_eq!(irqs(&irq), 1);
        // Each acknowledgement raises the next missed period at once, on the acking thread.
        for n in 2..=10 {
            p.irq_acked();
            assert_eq!(irqs(&irq), n);
            assert_eq!(p.backlog(), 10 - n);
        }
        // Caught up: the last acknowledgement raises nothing, and the thread waits for the
        // next period again.
        p.irq_acked();
        assert_eq!(irqs(&irq), 10);
        let next = p.next_deadline().unwrap();
        assert!(next > clock.now_ns() && next - clock.now_ns() <= period);
        // An acknowledgement with nothing raised (a second controller, a stale EOI) is ignored.
        p.irq_acked();
        assert_eq!(irqs(&irq), 10);
        // In all, every period that came due was raised once.
        clock.set(next);
        p.tick(next);
        assert_eq!(irqs(&irq), 11);
    }

    #[test]
    fn the_backlog_is_bounded_and_a_silent_guest_costs_one_wakeup_per_retry() {
        let (mut p, clock, irq, period) = periodic_1khz();
        // Never acknowledged for 5 s: at most a second of periods is kept.
        clock.advance(5 * NS_PER_SEC);
        p.tick(clock.now_ns());
        let cap = ns_to_ticks(MAX_BACKLOG_NS) / PIT_HZ.div_ceil(1000);
        assert_eq!(cap, 999, "a second at 1 kHz");
        assert_eq!(p.backlog(), cap - 1);
        // The timer thread wakes once a period to raise the edge again (the guest may have
        // lost it), never in between, and the backlog does not grow past the bound.
        let mut last = clock.now_ns();
        for n in 0..100 {
            let d = p.next_deadline().unwrap();
            assert!(d >= last + period, "wake-up {n} only {} ns later", d - last);
            clock.set(d);
            p.tick(d);
            last = d;
            assert!(p.backlog() <= cap);
        }
        assert_eq!(irqs(&irq), 101, "the first edge, then one retry per period");
        // A guest that sets the shortest period and never acknowledges: the thread still
        // sleeps at least RETRY_MIN_NS between wake-ups, and the backlog stays bounded.
        p.write_port(0x43, 0x34);
        p.write_port(0x40, 2);
        p.write_port(0x40, 0);
        let mut last = clock.now_ns();
        for _ in 0..100 {
            let d = p.next_deadline().unwrap();
            clock.set(d);
            p.tick(d);
            assert!(d - last >= RETRY_MIN_NS.min(ticks_to_ns(2)));
            if p.backlog() > 0 {
                assert!(d - last >= RETRY_MIN_NS, "retry after {} ns", d - last);
            }
            last = d;
            assert!(p.backlog() <= ns_to_ticks(MAX_BACKLOG_NS) / 2);
        }
    }

    #[test]
    fn reprogramming_channel0_drops_missed_periods() {
        let (mut p, clock, irq, period) = periodic_1khz();
        clock.advance(20 * period);
        p.tick(clock.now_ns());
        assert_eq!((irqs(&irq), p.backlog()), (1, 19));
        // A new count (mode 2 again) restarts the counter: nothing missed, and the stale
        // acknowledgement of the old edge raises nothing.
        p.write_port(0x40, 0xa9);
        p.write_port(0x40, 0x04);
        assert_eq!(p.backlog(), 0);
        p.irq_acked();
        assert_eq!(irqs(&irq), 1);
        clock.advance(5 * period);
        p.tick(clock.now_ns());
        assert_eq!((irqs(&irq), p.backlog()), (2, 4));
        // Linux's shutdown (mode 0, no count) and oneshot (mode 4) drop it too; a one-shot
        // fires once, whatever was missed before.
        p.write_port(0x43, 0x30);
        assert_eq!((p.backlog(), p.next_deadline()), (0, None));
        p.write_port(0x43, 0x38);
        p.write_port(0x40, 100);
        p.write_port(0x40, 0);
        clock.advance(period);
        p.tick(clock.now_ns());
        p.irq_acked();
        assert_eq!((irqs(&irq), p.backlog()), (3, 0));
        assert_eq!(p.next_deadline(), None);
    }

    #[test]
    fn mode4_oneshot_fires_once_and_mode0_shutdown() {
        let (mut p, clock, irq) = pit();
        // Linux oneshot: 0x38 then the delta.
        p.write_port(0x43, 0x38);
        p.write_port(0x40, 100);
        p.write_port(0x40, 0);
        let d = p.next_deadline().unwrap();
        clock.set(d);
        p.tick(d);
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        assert_eq!(p.next_deadline(), None);
        clock.advance(100_000_000);
        p.tick(clock.now_ns());
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        // Shutdown: mode 0 with no count loaded never fires.
        p.write_port(0x43, 0x30);
        assert_eq!(p.next_deadline(), None);
    }

    #[test]
    fn mode3_square_wave_output_and_readback() {
        let (mut p, clock, _) = pit();
        p.write_port(0x61, 1);
        p.write_port(0x43, 0xb6); // ch2, lsb/msb, mode 3
        p.write_port(0x42, 100);
        p.write_port(0x42, 0);
        assert!(p.channel2_out());
        clock.advance(ticks_to_ns(60));
        assert!(!p.channel2_out());
        clock.advance(ticks_to_ns(50));
        assert!(p.channel2_out());
        // Read-back of status and count of channel 2: status first, then the count.
        p.write_port(0x43, 0xc8);
        let st = p.read_port(0x42);
        assert_eq!(st & 0x3f, 0x36, "status {st:#x}");
        assert_eq!(st & 0x80, 0x80);
        let lo = p.read_port(0x42);
        let hi = p.read_port(0x42);
        let c = u16::from(lo) | (u16::from(hi) << 8);
        assert!(c <= 100 && c % 2 == 0, "mode 3 counts by two: {c}");
    }

    #[test]
    fn bcd_and_lsb_only_counts() {
        let (mut p, clock, _) = pit();
        p.write_port(0x43, 0x51); // ch1, lsb only, mode 0, BCD
        p.write_port(0x41, 0x99);
        clock.advance(ticks_to_ns(10));
        p.write_port(0x43, 0x40);
        assert_eq!(p.read_port(0x41), 0x89);
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let (mut p, _, _) = pit();
        let mut d = [0u8; 4];
        p.read(0x40, 0, &mut d);
        p.write(0x40, 3, &[0xff, 0xff]);
        for cw in 0..=255u8 {
            p.write_port(0x43, cw);
            p.write_port(0x40, cw);
            p.write_port(0x42, 0);
            let _ = p.read_port(0x40 + u16::from(cw % 3));
            p.tick(u64::from(cw) * 1000);
            let _ = p.next_deadline();
        }
    }

    #[test]
    fn timer_thread_delivers_periodic_irq() {
        let clock: Arc<dyn Clock> = Arc::new(HostClock::new());
        let irq = Arc::new(CountingIrq::default());
        let waker = Arc::new(TimerWaker::new());
        let mut pit = Pit::new(Some(irq.clone()), clock.clone());
        pit.set_waker(waker.clone());
        let pit = Arc::new(Mutex::new(pit));
        let t = TimerThread::spawn("pit-test", pit.clone(), clock, waker).unwrap();
        {
            let mut p = pit.lock().unwrap();
            // 1 kHz.
            p.write_port(0x43, 0x34);
            p.write_port(0x40, 0xa9);
            p.write_port(0x40, 0x04);
        }
        std::thread::sleep(Duration::from_millis(50));
        drop(t);
        let n = irq.0.load(Ordering::SeqCst);
        assert!((20..=60).contains(&n), "{n} IRQs in ~50 ms at 1 kHz");
    }
}
