//! [`IrqChip`]: the LAPICs, IOAPIC and PIC of one VM wired together, and the per-vCPU
//! [`VcpuIrq`] handle the software engine polls.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvmbox_cpu::{IrqLine, LapicBus, MsiLine, PlatformIrq, VcpuKicker};
use kvmbox_devices::legacy::pit::Clock;
use kvmbox_devices::{BusDevice, IoBus};

use crate::ioapic::{IoApic, IOAPIC_MMIO_SIZE, IOAPIC_PINS};
use crate::lapic::{Action, DeliveryMode, IrqMessage, Lapic, MpState, Shorthand};
use crate::pic::{Pic, PIC_ELCR_PORT, PIC_MASTER_PORT, PIC_SLAVE_PORT};
use crate::Error;

pub mod persist;

const F_INTR: u32 = 1;
const F_NMI: u32 = 2;
const F_INIT: u32 = 4;
const F_SIPI: u32 = 8;

/// Most vCPUs one chip serves (8-bit xAPIC IDs, 0xff is broadcast).
pub const MAX_VCPUS: u32 = 255;

type Notifier = Arc<dyn Fn() + Send + Sync>;

struct State {
    lapics: Vec<Lapic>,
    ioapic: IoApic,
    pic: Pic,
    /// Per GSI: which line sources hold it high (bit per source).
    sources: [u64; IOAPIC_PINS],
    /// MSIs whose address was not an APIC message address.
    dropped_msis: u64,
    /// Where messages go when the local APICs are not ours (KVM's in-kernel ones).
    lapic_bus: Option<Arc<dyn LapicBus>>,
    /// GSIs with an acknowledge notifier ([`IrqChip::set_ack_notifier`]), bit per GSI.
    ack_wanted: u32,
    /// GSIs acknowledged since the notifiers last ran.
    acked: u32,
}

/// The GSI whose interrupt IOAPIC pin `pin` delivers (IRQ 0 arrives on pin 2; pin 0 has none).
fn pin_gsi(pin: usize) -> Option<usize> {
    match pin {
        0 => None,
        2 => Some(0),
        p => Some(p),
    }
}

impl State {
    fn deliver(&mut self, msg: &IrqMessage, src: Option<usize>) {
        if let Some(bus) = &self.lapic_bus {
            let (addr, data) = msg.to_msi();
            bus.send_msi(addr, data);
            return;
        }
        let n = self.lapics.len();
        let mut targets: Vec<usize> = match msg.shorthand {
            Shorthand::SelfOnly => src.into_iter().collect(),
            Shorthand::All => (0..n).collect(),
            Shorthand::AllButSelf => (0..n).filter(|&i| Some(i) != src).collect(),
            Shorthand::None => (0..n)
                .filter(|&i| self.lapics[i].matches(msg.dest, msg.logical, msg.x2apic_dest))
                .collect(),
        };
        if msg.delivery == DeliveryMode::LowestPriority && targets.len() > 1 {
            // Lowest-priority arbitration: the LAPIC with the lowest PPR (then lowest index).
            let best = targets
                .iter()
                .copied()
                .min_by_key(|&i| (self.lapics[i].ppr(), i));
            targets = best.into_iter().collect();
        }
        for t in targets {
            self.lapics[t].accept(msg);
        }
    }

    fn run_action(&mut self, action: Option<Action>, src: usize) {
        match action {
            Some(Action::Ipi(m)) => self.deliver(&m, Some(src)),
            Some(Action::Eoi(v)) => self.ioapic_eoi(v),
            Some(Action::EdgeEoi(v)) => self.note_eoi(v),
            None => {}
        }
    }

    /// Tell the LAPICs' owner what each IOAPIC pin sends (after a redirection-table write).
    fn sync_ioapic_routes(&self) {
        if let Some(bus) = &self.lapic_bus {
            let routes: Vec<(u64, u32)> = (0..IOAPIC_PINS)
                .filter_map(|pin| {
                    let mut m = self.ioapic.pin_message(pin)?;
                    // KVM exits on the EOIs of the vectors its routes mark level-triggered
                    // (kvm_scan_ioapic_routes), and only the route says so: the messages
                    // themselves stay as the guest programmed them.
                    if pin_gsi(pin).is_some_and(|g| self.ack_wanted & (1 << g) != 0) {
                        m.level_triggered = true;
                    }
                    Some(m)
                })
                .map(|m| m.to_msi())
                .collect();
            bus.set_ioapic_routes(&routes);
        }
    }

    /// An EOI of `vector` reached the IOAPIC: deliver what it sends again.
    fn ioapic_eoi(&mut self, vector: u8) {
        let mut out = Vec::new();
        self.ioapic.eoi(vector, &mut out);
        for m in out {
            self.deliver(&m, None);
        }
        self.note_eoi(vector);
    }

    /// A local APIC EOIed `vector`: the GSIs of the IOAPIC pins that send it are acknowledged
    /// (by vector, as KVM's IOAPIC matches its ack notifiers).
    fn note_eoi(&mut self, vector: u8) {
        for pin in 0..IOAPIC_PINS {
            let sends = self
                .ioapic
                .entry(pin)
                .is_some_and(|e| e & 0xff == u64::from(vector));
            if let Some(g) = pin_gsi(pin).filter(|_| sends) {
                self.acked |= (1 << g) & self.ack_wanted;
            }
        }
    }

    /// GSIs acknowledged since the last call (IOAPIC pins' vectors EOIed, PIC EOIs) that
    /// have a notifier.
    fn take_acked(&mut self) -> u32 {
        let pic = u32::from(self.pic.take_acked());
        std::mem::take(&mut self.acked) | (pic & self.ack_wanted)
    }

    fn set_gsi(&mut self, gsi: usize, level: bool) {
        let mut out = Vec::new();
        match gsi {
            0 => {
                self.pic.set_irq(0, level);
                self.ioapic.set_irq(2, level, &mut out);
            }
            // The cascade: no device can use it (KVM routes nothing there either).
            2 => {}
            1..=15 => {
                self.pic.set_irq(gsi as u32, level);
                self.ioapic.set_irq(gsi, level, &mut out);
            }
            _ => self.ioapic.set_irq(gsi, level, &mut out),
        }
        for m in out {
            self.deliver(&m, None);
        }
    }
}

struct Slot {
    cv: Condvar,
    flags: AtomicU32,
    deadline: AtomicU64,
    kicked: AtomicBool,
    notifier: Mutex<Option<Notifier>>,
}

struct Shared {
    state: Mutex<State>,
    slots: Vec<Slot>,
    clock: Arc<dyn Clock>,
    tsc_hz: u64,
    next_source: AtomicU32,
    /// With a [`LapicBus`]: tells it the PIC's INTR rose ...
    extint: Option<Notifier>,
    /// ... once per request, until the boot CPU acknowledges one.
    extint_notified: AtomicBool,
    /// Per GSI: called when its interrupt is acknowledged ([`IrqChip::set_ack_notifier`]).
    ack_notifiers: Mutex<Vec<Option<Notifier>>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Recompute every vCPU's summary flags and timer deadline; wake those with news.
    /// Returns the notifiers to call once the lock is released.
    fn refresh(&self, st: &State) -> Vec<Notifier> {
        let pic_intr = st.pic.intr();
        let mut notify = Vec::new();
        for (slot, l) in self.slots.iter().zip(&st.lapics) {
            let mut f = 0;
            if l.deliverable().is_some() || (pic_intr && l.accepts_pic()) {
                f |= F_INTR;
            }
            if l.nmi_pending() {
                f |= F_NMI;
            }
            if l.init_pending() {
                f |= F_INIT;
            }
            if l.sipi_pending() {
                f |= F_SIPI;
            }
            let old = slot.flags.swap(f, Ordering::SeqCst);
            let old_deadline = slot.deadline.swap(
                l.next_timer_deadline().unwrap_or(u64::MAX),
                Ordering::SeqCst,
            );
            let new_deadline = slot.deadline.load(Ordering::SeqCst);
            if f & !old != 0 || new_deadline < old_deadline {
                slot.cv.notify_all();
                if let Some(n) = slot
                    .notifier
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
                {
                    notify.push(n);
                }
            }
        }
        if let Some(n) = &self.extint {
            if !pic_intr {
                self.extint_notified.store(false, Ordering::SeqCst);
            } else if !self.extint_notified.swap(true, Ordering::SeqCst) {
                notify.push(n.clone());
            }
        }
        notify
    }

    /// Run `f` on the state under the lock, then refresh flags and wake vCPUs, and tell the
    /// acknowledge notifiers of GSIs acknowledged meanwhile (outside the lock: they may raise
    /// their line again).
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let (r, notify, acked) = {
            let mut st = self.lock();
            let r = f(&mut st);
            let n = self.refresh(&st);
            (r, n, st.take_acked())
        };
        for n in notify {
            n();
        }
        if acked != 0 {
            let acks: Vec<Notifier> = {
                let all = self.ack_notifiers.lock().unwrap_or_else(|e| e.into_inner());
                (0..all.len())
                    .filter(|g| acked & (1 << g) != 0)
                    .filter_map(|g| all[g].clone())
                    .collect()
            };
            for a in acks {
                a();
            }
        }
        r
    }

    fn set_irq_source(&self, gsi: u32, source: u32, level: bool) -> Result<(), Error> {
        let g = usize::try_from(gsi).unwrap_or(usize::MAX);
        if g >= IOAPIC_PINS {
            return Err(Error::BadGsi(gsi));
        }
        let bit = 1u64 << source.min(63);
        self.with(|st| {
            let was = st.sources[g] != 0;
            if level {
                st.sources[g] |= bit;
            } else {
                st.sources[g] &= !bit;
            }
            let now = st.sources[g] != 0;
            if now != was || level {
                st.set_gsi(g, now);
            }
        });
        Ok(())
    }
}

/// The interrupt controllers of one VM run by the software engine: a [`Lapic`] per vCPU,
/// an [`IoApic`] and the [`Pic`] pair, behind one lock. Cheap to clone (a handle).
#[derive(Clone)]
pub struct IrqChip {
    sh: Arc<Shared>,
    vcpus: Arc<[VcpuIrq]>,
}

impl IrqChip {
    /// Controllers for `vcpus` vCPUs (APIC IDs 0..vcpus, vCPU 0 the BSP) timed by `clock`,
    /// with a guest TSC of `tsc_hz` that reads 0 at clock time 0.
    pub fn new(vcpus: u32, clock: Arc<dyn Clock>, tsc_hz: u64) -> Result<Self, Error> {
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(Error::VcpuCount(vcpus));
        }
        if tsc_hz == 0 {
            return Err(Error::TscHz);
        }
        Ok(Self::build(vcpus, clock, tsc_hz, None))
    }

    /// The IOAPIC and PIC pair of a VM whose local APICs live elsewhere (KVM's in-kernel ones
    /// with a split irqchip): IOAPIC messages go to `bus` as MSIs, redirection-table changes
    /// as routes, and a raised PIC output as [`LapicBus::extint_raised`]; the boot CPU's
    /// backend then takes the vector with [`PlatformIrq::extint_ack`] and hands EOIs back
    /// with [`PlatformIrq::eoi`]. The same controller code and state as the engine's.
    pub fn with_lapic_bus(clock: Arc<dyn Clock>, bus: Arc<dyn LapicBus>) -> Self {
        // No LAPIC here reads the TSC rate.
        Self::build(0, clock, 1, Some(bus))
    }

    fn build(
        vcpus: u32,
        clock: Arc<dyn Clock>,
        tsc_hz: u64,
        lapic_bus: Option<Arc<dyn LapicBus>>,
    ) -> Self {
        let extint: Option<Notifier> = lapic_bus.clone().map(|bus| {
            let n: Notifier = Arc::new(move || bus.extint_raised());
            n
        });
        let lapics = (0..vcpus).map(|i| Lapic::new(i, i == 0, tsc_hz)).collect();
        let slots = (0..vcpus)
            .map(|_| Slot {
                cv: Condvar::new(),
                flags: AtomicU32::new(0),
                deadline: AtomicU64::new(u64::MAX),
                kicked: AtomicBool::new(false),
                notifier: Mutex::new(None),
            })
            .collect();
        let sh = Arc::new(Shared {
            state: Mutex::new(State {
                lapics,
                ioapic: IoApic::new(),
                pic: Pic::new(),
                sources: [0; IOAPIC_PINS],
                dropped_msis: 0,
                lapic_bus,
                ack_wanted: 0,
                acked: 0,
            }),
            slots,
            clock,
            tsc_hz,
            next_source: AtomicU32::new(1),
            extint,
            extint_notified: AtomicBool::new(false),
            ack_notifiers: Mutex::new(vec![None; IOAPIC_PINS]),
        });
        let vcpus = (0..vcpus as usize)
            .map(|id| VcpuIrq { sh: sh.clone(), id })
            .collect();
        Self { sh, vcpus }
    }

    /// The handle of vCPU `id`, borrowed.
    pub fn vcpu_ref(&self, id: u32) -> Option<&VcpuIrq> {
        self.vcpus.get(usize::try_from(id).ok()?)
    }

    /// How many vCPUs the chip serves.
    pub fn vcpu_count(&self) -> u32 {
        self.sh.slots.len() as u32
    }

    /// The guest TSC frequency.
    pub fn tsc_hz(&self) -> u64 {
        self.sh.tsc_hz
    }

    /// The clock every controller and timer of this VM runs by.
    pub fn clock(&self) -> Arc<dyn Clock> {
        self.sh.clock.clone()
    }

    /// The handle vCPU `id` polls and waits on.
    pub fn vcpu(&self, id: u32) -> Result<VcpuIrq, Error> {
        self.vcpu_ref(id).cloned().ok_or(Error::NoVcpu(id))
    }

    /// Drive GSI `gsi` (0-23) to `level`. ISA IRQs 0-15 reach both the PIC and the IOAPIC,
    /// IRQ 0 on IOAPIC pin 2 (the MADT's override), the cascade GSI 2 nowhere; GSIs 16-23
    /// only the IOAPIC. This is the chip's own line source; [`IrqChip::irq_line`]s each have
    /// their own, and a GSI is high while any source holds it high.
    pub fn set_irq(&self, gsi: u32, level: bool) -> Result<(), Error> {
        self.sh.set_irq_source(gsi, 0, level)
    }

    /// Deliver the MSI `data` written to `addr` (0xfeeX_XXXX; anything else is dropped and
    /// counted, as the write would not reach an APIC).
    pub fn send_msi(&self, addr: u64, data: u32) {
        self.sh.with(|st| {
            if addr >> 20 != 0xfee {
                st.dropped_msis += 1;
                return;
            }
            let msg = IrqMessage {
                vector: (data & 0xff) as u8,
                delivery: DeliveryMode::from_bits(data),
                logical: addr & (1 << 2) != 0,
                dest: ((addr >> 12) & 0xff) as u32,
                x2apic_dest: false,
                shorthand: Shorthand::None,
                level_triggered: false,
                assert: true,
            };
            st.deliver(&msg, None);
        });
    }

    /// MSIs dropped so far because their address was not an APIC message address.
    pub fn dropped_msis(&self) -> u64 {
        self.sh.lock().dropped_msis
    }

    /// Raise LINT1 (wired to NMI by the BIOS convention) on vCPU `id`.
    pub fn nmi(&self, id: u32) -> Result<(), Error> {
        let v = self.vcpu(id)?;
        self.sh.with(|st| st.lapics[v.id].lint(1));
        Ok(())
    }

    /// An interrupt line to GSI `gsi` for a device, with its own line source.
    pub fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>, Error> {
        if usize::try_from(gsi).unwrap_or(usize::MAX) >= IOAPIC_PINS {
            return Err(Error::BadGsi(gsi));
        }
        let source = self.sh.next_source.fetch_add(1, Ordering::Relaxed).min(63);
        Ok(Arc::new(ChipIrqLine {
            chip: self.clone(),
            gsi,
            source,
        }))
    }

    /// A new MSI line (its message starts all zero: dropped until programmed).
    pub fn msi_line(&self) -> Arc<dyn MsiLine> {
        Arc::new(ChipMsiLine {
            chip: self.clone(),
            msg: Mutex::new((0, 0)),
        })
    }

    /// Have `f` called whenever the interrupt of GSI `gsi` is acknowledged: the PIC's EOI of
    /// its IRQ (or its acknowledge in auto-EOI mode), or a local APIC's EOI of the vector its
    /// IOAPIC pin sends (on KVM the pin's route then asks for that EOI's exit). `f` runs on
    /// the acknowledging thread outside the chip's lock, so it may raise the line again. The
    /// PIT gives [`kvmbox_devices::legacy::pit::Pit::ack_notifier`] for GSI 0.
    pub fn set_ack_notifier(&self, gsi: u32, f: Arc<dyn Fn() + Send + Sync>) -> Result<(), Error> {
        let g = usize::try_from(gsi).unwrap_or(usize::MAX);
        if g >= IOAPIC_PINS {
            return Err(Error::BadGsi(gsi));
        }
        self.sh
            .ack_notifiers
            .lock()
            .unwrap_or_else(|e| e.into_inner())[g] = Some(f);
        self.sh.with(|st| {
            st.ack_wanted |= 1 << g;
            st.sync_ioapic_routes();
        });
        Ok(())
    }

    /// The PIC's port device: insert it at 0x20 and 0xa0 (2 ports each) and 0x4d0 (2).
    pub fn pic_device(&self) -> PicDevice {
        PicDevice { chip: self.clone() }
    }

    /// The IOAPIC's MMIO device: insert it at `layout::IOAPIC_START`, [`IOAPIC_MMIO_SIZE`].
    pub fn ioapic_device(&self) -> IoApicDevice {
        IoApicDevice { chip: self.clone() }
    }

    /// Put the PIC and IOAPIC on `bus` at their PC addresses. The LAPIC page is per vCPU and
    /// not on the bus: the engine sends accesses to it to [`VcpuIrq::mmio_read`]/`_write`.
    pub fn attach(&self, bus: &IoBus) -> Result<(), Error> {
        let pic: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(self.pic_device()));
        for port in [PIC_MASTER_PORT, PIC_SLAVE_PORT, PIC_ELCR_PORT] {
            bus.pio.insert(pic.clone(), u64::from(port), 2)?;
        }
        bus.mmio.insert(
            Arc::new(Mutex::new(self.ioapic_device())),
            kvmbox_arch::layout::IOAPIC_START,
            IOAPIC_MMIO_SIZE,
        )?;
        Ok(())
    }
}

/// Why [`VcpuIrq::wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// A maskable interrupt is deliverable (only reported when waiting with IF set).
    Interrupt,
    /// An NMI is pending.
    Nmi,
    /// An INIT arrived.
    Init,
    /// A SIPI arrived.
    Sipi,
    /// [`VcpuIrq::kick`] was called.
    Kicked,
    /// The timeout passed.
    Timeout,
}

/// One vCPU's view of the interrupt controllers: polled by the engine between instructions,
/// waited on while the vCPU is halted. Cheap to clone; every method is thread-safe.
#[derive(Clone)]
pub struct VcpuIrq {
    sh: Arc<Shared>,
    id: usize,
}

impl VcpuIrq {
    /// This vCPU's index (and APIC ID).
    pub fn id(&self) -> u32 {
        self.id as u32
    }

    fn slot(&self) -> &Slot {
        &self.sh.slots[self.id]
    }

    fn now(&self) -> u64 {
        self.sh.clock.now_ns()
    }

    /// Run `f` on this vCPU's LAPIC (with its timer brought up to date).
    fn with_lapic<R>(&self, f: impl FnOnce(&mut State, u64) -> R) -> R {
        let now = self.now();
        self.sh.with(|st| {
            st.lapics[self.id].timer_tick(now);
            f(st, now)
        })
    }

    /// Cheap, lock-free check the engine can make every few instructions: is there anything
    /// to act on (an interrupt deliverable when `rflags_if`, NMI, INIT, SIPI, a kick, or an
    /// expired LAPIC timer)? When true, call the specific methods.
    pub fn has_events(&self, rflags_if: bool) -> bool {
        let s = self.slot();
        let mut mask = F_NMI | F_INIT | F_SIPI;
        if rflags_if {
            mask |= F_INTR;
        }
        if s.flags.load(Ordering::Acquire) & mask != 0 || s.kicked.load(Ordering::Acquire) {
            return true;
        }
        // Read the clock only when a timer is armed.
        let d = s.deadline.load(Ordering::Acquire);
        d != u64::MAX && self.now() >= d
    }

    /// The vector the CPU would take now if RFLAGS.IF is `rflags_if` (None when IF is clear):
    /// an ExtINT from the PIC first (as KVM does), else the LAPIC's highest deliverable.
    pub fn pending_interrupt(&self, rflags_if: bool) -> Option<u8> {
        if !rflags_if {
            return None;
        }
        self.with_lapic(|st, _| {
            let l = &st.lapics[self.id];
            if l.accepts_pic() && st.pic.intr() {
                return st.pic.peek_vector();
            }
            l.deliverable()
        })
    }

    /// The interrupt acknowledge cycle: call when about to deliver an external interrupt
    /// (IF set, no interrupt shadow). Returns the vector to deliver (it can differ from what
    /// [`Self::pending_interrupt`] returned when something higher arrived meanwhile; a PIC
    /// request that vanished yields its spurious vector), or None if nothing is pending.
    pub fn ack(&self) -> Option<u8> {
        self.with_lapic(|st, _| {
            let accepts_pic = st.lapics[self.id].accepts_pic();
            if accepts_pic && st.pic.intr() {
                return Some(st.pic.ack());
            }
            st.lapics[self.id].ack()
        })
    }

    /// Acknowledge exactly `vector`, as returned by an earlier [`Self::pending_interrupt`]
    /// (for engines that peek, then commit to delivering what they peeked). The PIC's
    /// request for it is acknowledged when the PIC supplied it, else the LAPIC's IRR bit
    /// moves to the ISR. False when neither still requests it.
    pub fn ack_vector(&self, vector: u8) -> bool {
        self.with_lapic(|st, _| {
            let l = &st.lapics[self.id];
            if l.accepts_pic() && st.pic.intr() && st.pic.peek_vector() == Some(vector) {
                st.pic.ack();
                return true;
            }
            if st.lapics[self.id].ack_vector(vector) {
                return true;
            }
            st.lapics[self.id].accepts_pic() && st.pic.ack_vector(vector)
        })
    }

    /// Take a pending NMI.
    pub fn take_nmi(&self) -> bool {
        self.sh.with(|st| st.lapics[self.id].take_nmi())
    }

    /// Take a pending INIT. When true the engine resets the vCPU to its INIT state (real
    /// mode, CS:IP F000:FFF0, caches of descriptors reset) and keeps it stopped until
    /// [`Self::take_sipi`] returns a vector. The LAPIC has already reset itself.
    pub fn take_init(&self) -> bool {
        self.sh.with(|st| st.lapics[self.id].take_init())
    }

    /// Take a pending SIPI: start the vCPU in real mode at CS = vector << 8, IP = 0.
    pub fn take_sipi(&self) -> Option<u8> {
        self.sh.with(|st| st.lapics[self.id].take_sipi())
    }

    /// Mark this vCPU as an AP waiting for INIT/SIPI (only a SIPI then starts it).
    pub fn set_wait_for_sipi(&self) {
        self.sh.with(|st| st.lapics[self.id].set_wait_for_sipi());
    }

    /// Whether the vCPU waits for a SIPI (it must not run guest code).
    pub fn waiting_for_sipi(&self) -> bool {
        let st = self.sh.lock();
        st.lapics[self.id].mp_state() == MpState::WaitForSipi && !st.lapics[self.id].sipi_pending()
    }

    /// When this vCPU's LAPIC timer next fires (clock ns), if armed.
    pub fn next_timer_deadline(&self) -> Option<u64> {
        self.with_lapic(|st, _| st.lapics[self.id].next_timer_deadline())
    }

    /// Block a halted vCPU until something wakes it: a deliverable interrupt (only if
    /// `rflags_if`), NMI, INIT, SIPI, a kick, or `timeout`. While the vCPU waits for a SIPI
    /// only INIT, SIPI and kicks wake it. LAPIC timer expiries that happen while waiting
    /// are processed here.
    pub fn wait(&self, rflags_if: bool, timeout: Option<Duration>) -> Wake {
        let end = timeout.map(|t| Instant::now() + t);
        let slot = self.slot();
        let mut st = self.sh.lock();
        loop {
            // A vCPU waiting for SIPI takes neither interrupts nor NMIs.
            let running = st.lapics[self.id].mp_state() == MpState::Running;
            let now = self.now();
            st.lapics[self.id].timer_tick(now);
            // Only this vCPU's state changed; nobody else needs waking.
            drop(self.sh.refresh(&st));
            if slot.kicked.swap(false, Ordering::AcqRel) {
                return Wake::Kicked;
            }
            let f = slot.flags.load(Ordering::Acquire);
            if f & F_INIT != 0 {
                return Wake::Init;
            }
            if f & F_SIPI != 0 {
                return Wake::Sipi;
            }
            if running && f & F_NMI != 0 {
                return Wake::Nmi;
            }
            if running && rflags_if && f & F_INTR != 0 {
                return Wake::Interrupt;
            }
            let mut sleep = match st.lapics[self.id].next_timer_deadline() {
                Some(d) => Duration::from_nanos(d.saturating_sub(now)),
                None => Duration::from_secs(3600),
            };
            if let Some(end) = end {
                let left = end.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Wake::Timeout;
                }
                sleep = sleep.min(left);
            }
            st = slot
                .cv
                .wait_timeout(st, sleep)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Make a current or next [`Self::wait`] return [`Wake::Kicked`] and [`Self::has_events`]
    /// true until [`Self::take_kick`]; calls the notifier too.
    pub fn kick(&self) {
        let slot = self.slot();
        {
            let _g = self.sh.lock();
            slot.kicked.store(true, Ordering::Release);
            slot.cv.notify_all();
        }
        let n = slot
            .notifier
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(n) = n {
            n();
        }
    }

    /// Take a pending kick.
    pub fn take_kick(&self) -> bool {
        self.slot().kicked.swap(false, Ordering::AcqRel)
    }

    /// Have `f` called whenever this vCPU gets news (a new interrupt, NMI, INIT, SIPI, an
    /// earlier timer deadline, a kick) so a running engine can break out of its inner loop.
    /// `f` runs on the sender's thread, outside the chip's lock; it must be quick.
    pub fn set_notifier(&self, f: Arc<dyn Fn() + Send + Sync>) {
        *self
            .slot()
            .notifier
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    /// Guest-physical base of this vCPU's xAPIC page, when mapped (xAPIC mode, enabled).
    pub fn apic_mmio_base(&self) -> Option<u64> {
        self.sh.lock().lapics[self.id].mmio_base()
    }

    /// A guest read at `offset` into this vCPU's APIC page.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        self.with_lapic(|st, now| st.lapics[self.id].mmio_read(offset, data, now));
    }

    /// A guest write at `offset` into this vCPU's APIC page (may send IPIs or EOIs).
    pub fn mmio_write(&self, offset: u64, data: &[u8]) {
        self.with_lapic(|st, now| {
            let a = st.lapics[self.id].mmio_write(offset, data, now);
            st.run_action(a, self.id);
        });
    }

    /// RDMSR of an interrupt-controller MSR ([`crate::is_irqchip_msr`]).
    /// `Err(GeneralProtection)` means inject #GP.
    pub fn read_msr(&self, msr: u32) -> Result<u64, Error> {
        self.with_lapic(|st, now| st.lapics[self.id].read_msr(msr, now))
    }

    /// WRMSR of an interrupt-controller MSR. `Err(GeneralProtection)` means inject #GP.
    pub fn write_msr(&self, msr: u32, value: u64) -> Result<(), Error> {
        self.with_lapic(|st, now| {
            let a = st.lapics[self.id].write_msr(msr, value, now)?;
            st.run_action(a, self.id);
            Ok(())
        })
    }

    /// CR8 (TPR bits 7-4).
    pub fn cr8(&self) -> u64 {
        u64::from(self.sh.lock().lapics[self.id].tpr() >> 4)
    }

    /// MOV to CR8 (values above 15 are the engine's #GP to raise; only bits 3-0 are used).
    pub fn set_cr8(&self, cr8: u64) {
        self.sh
            .with(|st| st.lapics[self.id].set_tpr(((cr8 & 0xf) as u8) << 4));
    }

    /// The guest's TSC now (RDTSC).
    pub fn guest_tsc(&self) -> u64 {
        let now = self.now();
        self.sh.lock().lapics[self.id].guest_tsc(now)
    }

    /// Set the guest's TSC (WRMSR IA32_TSC).
    pub fn set_guest_tsc(&self, tsc: u64) {
        let now = self.now();
        self.sh
            .with(|st| st.lapics[self.id].set_guest_tsc(tsc, now));
    }
}

impl VcpuKicker for VcpuIrq {
    fn kick(&self) {
        VcpuIrq::kick(self);
    }
}

struct ChipIrqLine {
    chip: IrqChip,
    gsi: u32,
    source: u32,
}

impl IrqLine for ChipIrqLine {
    fn trigger(&self) -> std::io::Result<()> {
        self.set_level(true)?;
        self.set_level(false)
    }

    fn set_level(&self, high: bool) -> std::io::Result<()> {
        self.chip
            .sh
            .set_irq_source(self.gsi, self.source, high)
            .map_err(std::io::Error::other)
    }
}

struct ChipMsiLine {
    chip: IrqChip,
    msg: Mutex<(u64, u32)>,
}

impl MsiLine for ChipMsiLine {
    fn set_message(&self, addr: u64, data: u32) -> std::io::Result<()> {
        *self.msg.lock().unwrap_or_else(|e| e.into_inner()) = (addr, data);
        Ok(())
    }

    fn trigger(&self) -> std::io::Result<()> {
        let (addr, data) = *self.msg.lock().unwrap_or_else(|e| e.into_inner());
        self.chip.send_msi(addr, data);
        Ok(())
    }
}

/// The chip as KVM's split irqchip uses it (see [`IrqChip::with_lapic_bus`]).
impl PlatformIrq for IrqChip {
    fn irq_line(&self, gsi: u32) -> kvmbox_cpu::Result<Arc<dyn IrqLine>> {
        IrqChip::irq_line(self, gsi).map_err(|e| kvmbox_cpu::Error::Unsupported(e.to_string()))
    }

    fn eoi(&self, vector: u8) {
        self.sh.with(|st| st.ioapic_eoi(vector));
    }

    fn extint_pending(&self) -> bool {
        self.sh.lock().pic.intr()
    }

    fn extint_ack(&self) -> Option<u8> {
        self.sh.with(|st| {
            self.sh.extint_notified.store(false, Ordering::SeqCst);
            st.pic.intr().then(|| st.pic.ack())
        })
    }
}

/// The 8259 pair on the port bus (0x20-0x21, 0xa0-0xa1, 0x4d0-0x4d1). Byte accesses only;
/// wider reads return all ones, wider writes are dropped.
pub struct PicDevice {
    chip: IrqChip,
}

impl BusDevice for PicDevice {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if data.len() != 1 {
            return;
        }
        let port = u16::try_from(base + offset).unwrap_or(0);
        data[0] = self.chip.sh.with(|st| st.pic.read_port(port));
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        let port = u16::try_from(base + offset).unwrap_or(0);
        self.chip.sh.with(|st| st.pic.write_port(port, data[0]));
    }
}

/// Offset of the IOAPIC's data window (IOWIN), through which redirection entries are written.
const IOAPIC_WINDOW: u64 = 0x10;

/// The IOAPIC on the MMIO bus.
pub struct IoApicDevice {
    chip: IrqChip,
}

impl BusDevice for IoApicDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        self.chip.sh.with(|st| st.ioapic.mmio_read(offset, data));
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        self.chip.sh.with(|st| {
            let mut out = Vec::new();
            st.ioapic.mmio_write(offset, data, &mut out);
            if offset == IOAPIC_WINDOW {
                st.sync_ioapic_routes();
            }
            for m in out {
                st.deliver(&m, None);
            }
        });
    }
}
