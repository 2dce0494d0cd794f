//! Local APIC of one vCPU: xAPIC register page and x2APIC MSRs, IRR/ISR/TMR, TPR/PPR, EOI,
//! the LVT timer (one-shot, periodic, TSC-deadline), LINT0/LINT1, the error register and
//! the ICR.
//!
//! A [`Lapic`] is a pure state machine: time comes in as `now` (nanoseconds of the VM's
//! clock), and anything that must reach other interrupt controllers (an IPI from the ICR,
//! an EOI of a level-triggered vector for the IOAPIC) comes back as an [`Action`] for the
//! caller ([`crate::IrqChip`]) to route.

use crate::Error;

mod persist;

/// Input clock of the LAPIC timer (the "bus" or core crystal clock), in Hz. CPUID leaf 0x15
/// reports it as the crystal frequency, from which Linux takes its APIC timer period.
pub const APIC_BUS_HZ: u64 = 1_000_000_000;
/// IA32_APIC_BASE.
pub const MSR_APIC_BASE: u32 = 0x1b;
/// IA32_TSC_DEADLINE.
pub const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// First x2APIC register MSR.
pub const MSR_X2APIC_FIRST: u32 = 0x800;
/// Last x2APIC register MSR.
pub const MSR_X2APIC_LAST: u32 = 0x8ff;
/// Size of the xAPIC register page.
pub const APIC_PAGE_SIZE: u64 = 0x1000;

/// APIC_BASE: this is the bootstrap processor.
pub const APIC_BASE_BSP: u64 = 1 << 8;
/// APIC_BASE: x2APIC mode.
pub const APIC_BASE_EXTD: u64 = 1 << 10;
/// APIC_BASE: the APIC is enabled.
pub const APIC_BASE_EN: u64 = 1 << 11;
const APIC_BASE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// The shortest period a periodic LAPIC timer fires at (a guest asking for less gets this;
/// the counter it reads still counts at the programmed rate).
pub const MIN_PERIODIC_NS: u64 = 50_000;

const NS_PER_SEC: u128 = 1_000_000_000;

// Register offsets in the xAPIC page (x2APIC MSR = 0x800 + offset / 16).
const REG_ID: u32 = 0x20;
const REG_VERSION: u32 = 0x30;
const REG_TPR: u32 = 0x80;
const REG_APR: u32 = 0x90;
const REG_PPR: u32 = 0xa0;
const REG_EOI: u32 = 0xb0;
const REG_RRD: u32 = 0xc0;
const REG_LDR: u32 = 0xd0;
const REG_DFR: u32 = 0xe0;
const REG_SVR: u32 = 0xf0;
const REG_ISR: u32 = 0x100;
const REG_TMR: u32 = 0x180;
const REG_IRR: u32 = 0x200;
const REG_ESR: u32 = 0x280;
const REG_LVT_CMCI: u32 = 0x2f0;
const REG_ICR_LO: u32 = 0x300;
const REG_ICR_HI: u32 = 0x310;
const REG_LVT_TIMER: u32 = 0x320;
const REG_LVT_THERMAL: u32 = 0x330;
const REG_LVT_PERF: u32 = 0x340;
const REG_LVT_LINT0: u32 = 0x350;
const REG_LVT_LINT1: u32 = 0x360;
const REG_LVT_ERROR: u32 = 0x370;
const REG_TIMER_INIT: u32 = 0x380;
const REG_TIMER_CUR: u32 = 0x390;
const REG_TIMER_DIV: u32 = 0x3e0;
const REG_SELF_IPI: u32 = 0x3f0;

/// Version 0x14 (integrated APIC), 6 LVT entries (max LVT index 5).
const VERSION: u32 = 0x0005_0014;
const LVT_MASKED: u32 = 1 << 16;
const SVR_ENABLE: u32 = 1 << 8;
const ESR_SEND_ILLEGAL: u32 = 1 << 5;
const ESR_RECV_ILLEGAL: u32 = 1 << 6;
const ESR_ILLEGAL_REG: u32 = 1 << 7;

const LVT_COUNT: usize = 7;
/// Index into `lvt` for each LVT register.
fn lvt_index(reg: u32) -> Option<usize> {
    match reg {
        REG_LVT_TIMER => Some(0),
        REG_LVT_THERMAL => Some(1),
        REG_LVT_PERF => Some(2),
        REG_LVT_LINT0 => Some(3),
        REG_LVT_LINT1 => Some(4),
        REG_LVT_ERROR => Some(5),
        REG_LVT_CMCI => Some(6),
        _ => None,
    }
}
const LVT_TIMER: usize = 0;
const LVT_LINT0: usize = 3;
const LVT_LINT1: usize = 4;
const LVT_ERROR: usize = 5;
/// Writable bits of each LVT register.
const LVT_WRITABLE: [u32; LVT_COUNT] = [
    0x0007_00ff, // timer: vector, mask, mode
    0x0001_07ff, // thermal
    0x0001_07ff, // perf
    0x0001_a7ff, // LINT0: vector, mode, polarity, trigger, mask
    0x0001_a7ff, // LINT1
    0x0001_00ff, // error
    0x0001_07ff, // CMCI
];

/// How an interrupt message is delivered (ICR / redirection entry / MSI bits 8-10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryMode {
    /// A vector into the IRR.
    Fixed,
    /// Lowest priority: delivered as fixed to one of the destinations.
    LowestPriority,
    /// System management interrupt (ignored).
    Smi,
    /// Non-maskable interrupt.
    Nmi,
    /// INIT: reset the processor into wait-for-SIPI.
    Init,
    /// Startup IPI: start a waiting processor at `vector << 12`.
    StartUp,
    /// External interrupt: the vector comes from the 8259 PIC.
    ExtInt,
    /// The reserved encoding 3.
    Reserved,
}

impl DeliveryMode {
    /// Decode bits 8-10 of an ICR, redirection entry or MSI data word.
    pub fn from_bits(bits: u32) -> Self {
        match (bits >> 8) & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            2 => DeliveryMode::Smi,
            4 => DeliveryMode::Nmi,
            5 => DeliveryMode::Init,
            6 => DeliveryMode::StartUp,
            7 => DeliveryMode::ExtInt,
            _ => DeliveryMode::Reserved,
        }
    }

    /// The encoding [`DeliveryMode::from_bits`] decodes, in bits 8-10.
    pub fn bits(self) -> u32 {
        let mode = match self {
            DeliveryMode::Fixed => 0,
            DeliveryMode::LowestPriority => 1,
            DeliveryMode::Smi => 2,
            DeliveryMode::Reserved => 3,
            DeliveryMode::Nmi => 4,
            DeliveryMode::Init => 5,
            DeliveryMode::StartUp => 6,
            DeliveryMode::ExtInt => 7,
        };
        mode << 8
    }
}

/// ICR destination shorthand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shorthand {
    /// Use the destination field.
    None,
    /// The sending APIC only.
    SelfOnly,
    /// Every APIC, the sender included.
    All,
    /// Every APIC but the sender.
    AllButSelf,
}

/// An interrupt message travelling to local APICs (from the ICR, the IOAPIC or an MSI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqMessage {
    /// Vector (for SIPI: the start page).
    pub vector: u8,
    /// Delivery mode.
    pub delivery: DeliveryMode,
    /// Logical (true) or physical destination mode.
    pub logical: bool,
    /// Destination: an APIC ID (physical) or a logical mask.
    pub dest: u32,
    /// The destination is 32 bits wide (x2APIC ICR); otherwise 8 bits with 0xff = broadcast.
    pub x2apic_dest: bool,
    /// Destination shorthand (ICR only).
    pub shorthand: Shorthand,
    /// Level-triggered (sets TMR; the EOI goes back to the IOAPIC).
    pub level_triggered: bool,
    /// Level assert (false only for the legacy "INIT level de-assert").
    pub assert: bool,
}

impl IrqMessage {
    /// A fixed, edge-triggered message to physical APIC ID `dest`.
    pub fn fixed(vector: u8, dest: u32) -> Self {
        Self {
            vector,
            delivery: DeliveryMode::Fixed,
            logical: false,
            dest,
            x2apic_dest: false,
            shorthand: Shorthand::None,
            level_triggered: false,
            assert: true,
        }
    }

    /// The message as an MSI address/data pair (8-bit destination in address bits 12-19,
    /// logical mode in bit 2; data: vector, delivery mode, level assert (bit 14) and trigger
    /// mode (bit 15)), the form a local APIC kept elsewhere (KVM's) accepts. Shorthands have
    /// no MSI form; IOAPIC messages use none.
    pub fn to_msi(&self) -> (u64, u32) {
        let addr =
            0xfee0_0000 | (u64::from(self.dest & 0xff) << 12) | (u64::from(self.logical) << 2);
        let data = u32::from(self.vector)
            | self.delivery.bits()
            | (u32::from(self.assert) << 14)
            | (u32::from(self.level_triggered) << 15);
        (addr, data)
    }
}

/// What a LAPIC access asks the rest of the interrupt system to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send this IPI (written to the ICR or the x2APIC SELF IPI register).
    Ipi(IrqMessage),
    /// A level-triggered vector was EOIed: the IOAPIC clears its remote IRR.
    Eoi(u8),
    /// An edge-triggered vector was EOIed: nothing for the IOAPIC's registers, but a device
    /// that waits for its interrupt's acknowledgement (the PIT's missed ticks) learns of it.
    EdgeEoi(u8),
}

/// The multiprocessor state the LAPIC tracks for its vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MpState {
    /// Running guest code (or halted).
    Running,
    /// After INIT: only a SIPI starts the vCPU.
    WaitForSipi,
}

/// 256-bit vector register (IRR, ISR, TMR).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct VecReg([u32; 8]);

impl VecReg {
    fn set(&mut self, v: u8) {
        self.0[usize::from(v >> 5)] |= 1 << (v & 31);
    }
    fn clear(&mut self, v: u8) {
        self.0[usize::from(v >> 5)] &= !(1 << (v & 31));
    }
    fn get(&self, v: u8) -> bool {
        self.0[usize::from(v >> 5)] & (1 << (v & 31)) != 0
    }
    fn highest(&self) -> Option<u8> {
        (0..8).rev().find_map(|i| {
            let w = self.0[i];
            (w != 0).then(|| (i as u8) * 32 + (31 - w.leading_zeros() as u8))
        })
    }
}

/// LVT timer mode (bits 17-18).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimerMode {
    OneShot,
    Periodic,
    TscDeadline,
}

/// One vCPU's local APIC.
#[derive(Debug, Clone)]
pub struct Lapic {
    apic_id: u32,
    bsp: bool,
    base: u64,
    id_reg: u32,
    tpr: u32,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: VecReg,
    tmr: VecReg,
    irr: VecReg,
    esr: u32,
    esr_pending: u32,
    icr_lo: u32,
    icr_hi: u32,
    lvt: [u32; LVT_COUNT],
    timer_init: u32,
    timer_div_reg: u32,
    /// Counter value at `timer_base_ns` (one-shot/periodic), 0 when stopped.
    timer_base_count: u64,
    timer_base_ns: u64,
    /// When the timer next expires.
    timer_next: Option<u64>,
    /// IA32_TSC_DEADLINE as armed by the guest (0 = disarmed).
    tsc_deadline: u64,
    tsc_hz: u64,
    tsc_offset: i128,
    nmi_pending: bool,
    init_pending: bool,
    sipi_vector: Option<u8>,
    mp_state: MpState,
}

impl Lapic {
    /// The LAPIC of the vCPU with APIC ID `apic_id` in its reset state, hardware-enabled at
    /// the default base; `bsp` marks the bootstrap processor (whose LINT0 starts in ExtINT
    /// mode so the 8259 reaches it, as a BIOS leaves it). `tsc_hz` is the guest TSC rate.
    pub fn new(apic_id: u32, bsp: bool, tsc_hz: u64) -> Self {
        let mut l = Self {
            apic_id,
            bsp,
            base: kvmbox_arch::layout::APIC_START
                | APIC_BASE_EN
                | if bsp { APIC_BASE_BSP } else { 0 },
            id_reg: 0,
            tpr: 0,
            ldr: 0,
            dfr: 0xffff_ffff,
            svr: 0xff,
            isr: VecReg::default(),
            tmr: VecReg::default(),
            irr: VecReg::default(),
            esr: 0,
            esr_pending: 0,
            icr_lo: 0,
            icr_hi: 0,
            lvt: [LVT_MASKED; LVT_COUNT],
            timer_init: 0,
            timer_div_reg: 0,
            timer_base_count: 0,
            timer_base_ns: 0,
            timer_next: None,
            tsc_deadline: 0,
            tsc_hz: tsc_hz.max(1),
            tsc_offset: 0,
            nmi_pending: false,
            init_pending: false,
            sipi_vector: None,
            mp_state: MpState::Running,
        };
        l.reset_registers();
        l
    }

    /// Power-on / INIT register state (keeps APIC_BASE and the APIC ID).
    fn reset_registers(&mut self) {
        self.id_reg = (self.apic_id & 0xff) << 24;
        self.tpr = 0;
        self.ldr = 0;
        self.dfr = 0xffff_ffff;
        self.svr = 0xff;
        self.isr = VecReg::default();
        self.tmr = VecReg::default();
        self.irr = VecReg::default();
        self.esr = 0;
        self.esr_pending = 0;
        self.icr_lo = 0;
        self.icr_hi = 0;
        self.lvt = [LVT_MASKED; LVT_COUNT];
        if self.bsp {
            // Virtual wire mode: the PIC's INTR reaches the BSP through LINT0 (KVM does the
            // same at reset), LINT1 is the NMI pin.
            self.lvt[LVT_LINT0] = 0x700;
            self.lvt[LVT_LINT1] = 0x400;
        }
        self.timer_init = 0;
        self.timer_div_reg = 0;
        self.stop_timer();
        self.tsc_deadline = 0;
        self.nmi_pending = false;
        if self.x2apic() {
            self.ldr = self.x2apic_ldr();
        }
    }

    /// This LAPIC's APIC ID.
    pub fn apic_id(&self) -> u32 {
        self.apic_id
    }

    /// IA32_APIC_BASE.
    pub fn apic_base(&self) -> u64 {
        self.base
    }

    /// The guest-physical address of the register page while in xAPIC mode.
    pub fn mmio_base(&self) -> Option<u64> {
        (self.hw_enabled() && !self.x2apic()).then_some(self.base & APIC_BASE_ADDR_MASK)
    }

    /// Hardware-enabled (APIC_BASE.EN).
    pub fn hw_enabled(&self) -> bool {
        self.base & APIC_BASE_EN != 0
    }

    /// In x2APIC mode (APIC_BASE.EXTD).
    pub fn x2apic(&self) -> bool {
        self.base & APIC_BASE_EXTD != 0
    }

    /// Software-enabled (SVR bit 8).
    pub fn sw_enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }

    /// The vCPU's multiprocessor state.
    pub fn mp_state(&self) -> MpState {
        self.mp_state
    }

    /// Put the vCPU into wait-for-SIPI (application processors before their first SIPI).
    pub fn set_wait_for_sipi(&mut self) {
        self.mp_state = MpState::WaitForSipi;
    }

    fn x2apic_ldr(&self) -> u32 {
        ((self.apic_id >> 4) << 16) | (1 << (self.apic_id & 0xf))
    }

    /// Write IA32_APIC_BASE. Invalid mode transitions fault (#GP) as on hardware.
    pub fn set_apic_base(&mut self, value: u64) -> Result<(), Error> {
        let gp = |why| {
            Err(Error::GeneralProtection {
                msr: MSR_APIC_BASE,
                why,
            })
        };
        if value & !(APIC_BASE_ADDR_MASK | APIC_BASE_EN | APIC_BASE_EXTD | APIC_BASE_BSP) != 0 {
            return gp("reserved bits set");
        }
        let old_x2 = self.x2apic();
        let new_en = value & APIC_BASE_EN != 0;
        let new_x2 = value & APIC_BASE_EXTD != 0;
        if new_x2 && !new_en {
            return gp("x2APIC mode with the APIC disabled");
        }
        if old_x2 && new_en && !new_x2 {
            return gp("x2APIC to xAPIC without disabling first");
        }
        if !self.hw_enabled() && new_x2 {
            return gp("disabled to x2APIC without going through xAPIC");
        }
        let bsp = if self.bsp { APIC_BASE_BSP } else { 0 };
        self.base = (value & (APIC_BASE_ADDR_MASK | APIC_BASE_EN | APIC_BASE_EXTD)) | bsp;
        if new_x2 && !old_x2 {
            self.ldr = self.x2apic_ldr();
        }
        if !new_en {
            // A hardware-disabled APIC comes back from reset state.
            self.reset_registers();
        }
        Ok(())
    }

    /// Change the guest TSC so that it reads `tsc` at clock time `now` (IA32_TSC writes).
    pub fn set_guest_tsc(&mut self, tsc: u64, now: u64) {
        self.tsc_offset = i128::from(tsc) - self.raw_tsc(now);
    }

    fn raw_tsc(&self, now: u64) -> i128 {
        (u128::from(now) * u128::from(self.tsc_hz) / NS_PER_SEC) as i128
    }

    /// The guest's TSC at clock time `now`.
    pub fn guest_tsc(&self, now: u64) -> u64 {
        (self.raw_tsc(now) + self.tsc_offset).clamp(0, i128::from(u64::MAX)) as u64
    }

    /// Clock time at which the guest TSC reaches `tsc` (saturating).
    fn tsc_to_ns(&self, tsc: u64) -> u64 {
        let raw = i128::from(tsc) - self.tsc_offset;
        if raw <= 0 {
            return 0;
        }
        let ns = (raw as u128 * NS_PER_SEC).div_ceil(u128::from(self.tsc_hz));
        u64::try_from(ns).unwrap_or(u64::MAX)
    }

    // ---- priorities and delivery -------------------------------------------------------

    /// Processor priority (PPR).
    pub fn ppr(&self) -> u32 {
        let isrv = self.isr.highest().map_or(0, u32::from);
        if (self.tpr & 0xf0) >= (isrv & 0xf0) {
            self.tpr & 0xff
        } else {
            isrv & 0xf0
        }
    }

    /// TPR (CR8 is bits 7-4 of it).
    pub fn tpr(&self) -> u8 {
        (self.tpr & 0xff) as u8
    }

    /// Set the TPR (a MOV to CR8 writes `cr8 << 4`).
    pub fn set_tpr(&mut self, tpr: u8) {
        self.tpr = u32::from(tpr);
    }

    /// The vector this LAPIC would deliver if interrupts were enabled.
    pub fn deliverable(&self) -> Option<u8> {
        if !self.hw_enabled() || !self.sw_enabled() {
            return None;
        }
        let v = self.irr.highest()?;
        (u32::from(v) & 0xf0 > self.ppr() & 0xf0).then_some(v)
    }

    /// Acknowledge the deliverable vector: move it from IRR to ISR and return it.
    pub fn ack(&mut self) -> Option<u8> {
        let v = self.deliverable()?;
        self.irr.clear(v);
        self.isr.set(v);
        Some(v)
    }

    /// Acknowledge exactly `vector` (IRR to ISR) when it is requested: the CPU took it
    /// before anything of higher priority arrived. False when `vector` is not in the IRR.
    pub fn ack_vector(&mut self, vector: u8) -> bool {
        if !self.irr.get(vector) {
            return false;
        }
        self.irr.clear(vector);
        self.isr.set(vector);
        true
    }

    /// Whether the 8259's INTR reaches this CPU (LINT0 unmasked in ExtINT mode, or the APIC
    /// hardware-disabled so the pin goes straight to the core).
    pub fn accepts_pic(&self) -> bool {
        if !self.hw_enabled() {
            return true;
        }
        let l = self.lvt[LVT_LINT0];
        l & LVT_MASKED == 0 && DeliveryMode::from_bits(l) == DeliveryMode::ExtInt
    }

    /// Does destination `dest` in `logical` mode address this LAPIC?
    pub fn matches(&self, dest: u32, logical: bool, x2apic_dest: bool) -> bool {
        if !self.hw_enabled() {
            return false;
        }
        let broadcast = if x2apic_dest { u32::MAX } else { 0xff };
        if dest == broadcast {
            return true;
        }
        if !logical {
            let id = if self.x2apic() {
                self.apic_id
            } else {
                self.id_reg >> 24
            };
            return dest == id;
        }
        if self.x2apic() {
            return (dest >> 16) == (self.ldr >> 16) && dest & self.ldr & 0xffff != 0;
        }
        let ldr = self.ldr >> 24;
        let dest = dest & 0xff;
        if (self.dfr >> 28) == 0xf {
            dest & ldr != 0
        } else {
            (dest >> 4) == (ldr >> 4) && dest & ldr & 0xf != 0
        }
    }

    fn set_error(&mut self, bit: u32) -> bool {
        self.esr_pending |= bit;
        let lvt = self.lvt[LVT_ERROR];
        if lvt & LVT_MASKED == 0 {
            return self.set_irr((lvt & 0xff) as u8, false);
        }
        false
    }

    fn set_irr(&mut self, vector: u8, level: bool) -> bool {
        if vector < 16 {
            self.esr_pending |= ESR_RECV_ILLEGAL;
            return false;
        }
        self.irr.set(vector);
        if level {
            self.tmr.set(vector);
        } else {
            self.tmr.clear(vector);
        }
        true
    }

    /// Accept a message already addressed to this LAPIC.
    pub fn accept(&mut self, msg: &IrqMessage) {
        if !self.hw_enabled() {
            return;
        }
        match msg.delivery {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                if msg.vector < 16 {
                    self.set_error(ESR_RECV_ILLEGAL);
                } else {
                    self.set_irr(msg.vector, msg.level_triggered);
                }
            }
            DeliveryMode::Nmi => self.nmi_pending = true,
            DeliveryMode::Init => {
                if msg.level_triggered && !msg.assert {
                    // INIT level de-assert: only re-synchronizes arbitration IDs.
                    return;
                }
                self.reset_registers();
                self.init_pending = true;
                self.sipi_vector = None;
                self.mp_state = MpState::WaitForSipi;
            }
            DeliveryMode::StartUp => {
                if self.mp_state == MpState::WaitForSipi {
                    self.sipi_vector = Some(msg.vector);
                    self.mp_state = MpState::Running;
                }
            }
            DeliveryMode::Smi | DeliveryMode::ExtInt | DeliveryMode::Reserved => {}
        }
    }

    /// Drive local interrupt pin `pin` (0 = LINT0, 1 = LINT1) with an edge, as its LVT says.
    /// LINT0 in ExtINT mode is not handled here: the PIC is polled through
    /// [`Lapic::accepts_pic`].
    pub fn lint(&mut self, pin: usize) {
        let l = self.lvt[if pin == 0 { LVT_LINT0 } else { LVT_LINT1 }];
        if !self.hw_enabled() {
            // A disabled APIC passes LINT1 straight through as NMI.
            if pin == 1 {
                self.nmi_pending = true;
            }
            return;
        }
        if l & LVT_MASKED != 0 {
            return;
        }
        match DeliveryMode::from_bits(l) {
            DeliveryMode::Fixed => {
                self.set_irr((l & 0xff) as u8, l & (1 << 15) != 0);
            }
            DeliveryMode::Nmi => self.nmi_pending = true,
            _ => {}
        }
    }

    /// Take a pending NMI.
    pub fn take_nmi(&mut self) -> bool {
        std::mem::take(&mut self.nmi_pending)
    }

    /// An NMI is pending.
    pub fn nmi_pending(&self) -> bool {
        self.nmi_pending
    }

    /// Take a pending INIT: the vCPU resets its registers and waits for a SIPI.
    pub fn take_init(&mut self) -> bool {
        std::mem::take(&mut self.init_pending)
    }

    /// An INIT is pending.
    pub fn init_pending(&self) -> bool {
        self.init_pending
    }

    /// Take a received SIPI vector: the vCPU starts in real mode at `vector << 12`.
    pub fn take_sipi(&mut self) -> Option<u8> {
        self.sipi_vector.take()
    }

    /// A SIPI is pending.
    pub fn sipi_pending(&self) -> bool {
        self.sipi_vector.is_some()
    }

    // ---- timer ---------------------------------------------------------------------------

    fn timer_mode(&self) -> TimerMode {
        match (self.lvt[LVT_TIMER] >> 17) & 3 {
            1 => TimerMode::Periodic,
            2 => TimerMode::TscDeadline,
            _ => TimerMode::OneShot,
        }
    }

    /// Nanoseconds per timer count for the current divide configuration.
    fn timer_tick_ns(&self) -> u64 {
        let v = (self.timer_div_reg & 3) | ((self.timer_div_reg & 8) >> 1);
        let div = 1u64 << ((v + 1) & 7);
        div * 1_000_000_000 / APIC_BUS_HZ
    }

    fn stop_timer(&mut self) {
        self.timer_base_count = 0;
        self.timer_next = None;
    }

    fn start_count(&mut self, count: u64, now: u64) {
        if count == 0 {
            self.stop_timer();
            return;
        }
        self.timer_base_count = count;
        self.timer_base_ns = now;
        self.timer_next = Some(now.saturating_add(count.saturating_mul(self.timer_tick_ns())));
    }

    /// The current-count register at `now`.
    fn current_count(&self, now: u64) -> u32 {
        if self.timer_base_count == 0 || self.timer_mode() == TimerMode::TscDeadline {
            return 0;
        }
        let e = now.saturating_sub(self.timer_base_ns) / self.timer_tick_ns();
        if e < self.timer_base_count {
            return (self.timer_base_count - e) as u32;
        }
        match self.timer_mode() {
            TimerMode::Periodic if self.timer_init != 0 => {
                let init = u64::from(self.timer_init);
                (init - (e - self.timer_base_count) % init) as u32
            }
            _ => 0,
        }
    }

    /// When the timer next expires (clock ns), if armed.
    pub fn next_timer_deadline(&self) -> Option<u64> {
        self.timer_next
    }

    /// Fire the timer if it expired by `now`. Returns true when it set an IRR bit.
    pub fn timer_tick(&mut self, now: u64) -> bool {
        let Some(next) = self.timer_next else {
            return false;
        };
        if now < next {
            return false;
        }
        match self.timer_mode() {
            TimerMode::Periodic if self.timer_init != 0 => {
                let period =
                    (u64::from(self.timer_init) * self.timer_tick_ns()).max(MIN_PERIODIC_NS);
                let missed = (now - next) / period + 1;
                self.timer_next = Some(next.saturating_add(missed.saturating_mul(period)));
            }
            TimerMode::TscDeadline => {
                self.tsc_deadline = 0;
                self.timer_next = None;
            }
            _ => {
                self.timer_next = None;
            }
        }
        let lvt = self.lvt[LVT_TIMER];
        if lvt & LVT_MASKED == 0 && self.hw_enabled() {
            return self.set_irr((lvt & 0xff) as u8, false);
        }
        false
    }

    /// Read IA32_TSC_DEADLINE.
    pub fn tsc_deadline(&self) -> u64 {
        if self.timer_mode() == TimerMode::TscDeadline {
            self.tsc_deadline
        } else {
            0
        }
    }

    /// Write IA32_TSC_DEADLINE (ignored unless the LVT timer is in TSC-deadline mode).
    pub fn set_tsc_deadline(&mut self, value: u64, now: u64) {
        if self.timer_mode() != TimerMode::TscDeadline {
            return;
        }
        self.tsc_deadline = value;
        self.timer_next = (value != 0).then(|| self.tsc_to_ns(value).max(now));
    }

    // ---- registers ---------------------------------------------------------------------

    /// Read the 32-bit register at page offset `reg` (a multiple of 16) as the xAPIC page
    /// shows it. Unimplemented offsets read 0.
    pub fn read_reg(&mut self, reg: u32, now: u64) -> u32 {
        self.timer_tick(now);
        self.peek_reg(reg, now)
    }

    /// The register at `reg` as [`Lapic::read_reg`] shows it, without running the timer.
    fn peek_reg(&self, reg: u32, now: u64) -> u32 {
        match reg {
            REG_ID => {
                if self.x2apic() {
                    self.apic_id
                } else {
                    self.id_reg
                }
            }
            REG_VERSION => VERSION,
            REG_TPR => self.tpr,
            REG_PPR => self.ppr(),
            REG_LDR => self.ldr,
            REG_DFR => self.dfr,
            REG_SVR => self.svr,
            0x100..=0x170 => self.isr.0[((reg - REG_ISR) >> 4) as usize],
            0x180..=0x1f0 => self.tmr.0[((reg - REG_TMR) >> 4) as usize],
            0x200..=0x270 => self.irr.0[((reg - REG_IRR) >> 4) as usize],
            REG_ESR => self.esr,
            REG_ICR_LO => self.icr_lo & !(1 << 12),
            REG_ICR_HI => self.icr_hi,
            REG_TIMER_INIT => self.timer_init,
            REG_TIMER_CUR => self.current_count(now),
            REG_TIMER_DIV => self.timer_div_reg,
            r => lvt_index(r).map_or(0, |i| self.lvt[i]),
        }
    }

    /// Write the 32-bit register at page offset `reg` (a multiple of 16).
    pub fn write_reg(&mut self, reg: u32, value: u32, now: u64) -> Option<Action> {
        self.timer_tick(now);
        match reg {
            REG_ID => {
                if !self.x2apic() {
                    self.id_reg = value & 0xff00_0000;
                }
            }
            REG_TPR => self.tpr = value & 0xff,
            REG_EOI => return self.eoi(),
            REG_LDR => {
                if !self.x2apic() {
                    self.ldr = value & 0xff00_0000;
                }
            }
            REG_DFR => {
                if !self.x2apic() {
                    self.dfr = value | 0x0fff_ffff;
                }
            }
            REG_SVR => {
                self.svr = value & 0x1ff;
                if !self.sw_enabled() {
                    for l in &mut self.lvt {
                        *l |= LVT_MASKED;
                    }
                }
            }
            REG_ESR => {
                self.esr = std::mem::take(&mut self.esr_pending);
            }
            REG_ICR_LO => {
                self.icr_lo = value & !(1 << 12);
                return self.send_ipi(now);
            }
            REG_ICR_HI => self.icr_hi = value & 0xff00_0000,
            REG_TIMER_INIT => {
                if self.timer_mode() != TimerMode::TscDeadline {
                    self.timer_init = value;
                    self.start_count(u64::from(value), now);
                }
            }
            REG_TIMER_DIV => {
                let cur = self.current_count(now);
                let running =
                    self.timer_next.is_some() && self.timer_mode() != TimerMode::TscDeadline;
                self.timer_div_reg = value & 0xb;
                if running {
                    // Keep the remaining count; it now counts at the new rate.
                    self.start_count(u64::from(cur), now);
                }
            }
            REG_SELF_IPI if self.x2apic() => {
                let mut m = IrqMessage::fixed((value & 0xff) as u8, self.apic_id);
                m.shorthand = Shorthand::SelfOnly;
                return Some(Action::Ipi(m));
            }
            r => {
                if let Some(i) = lvt_index(r) {
                    let mut v = value & LVT_WRITABLE[i];
                    if !self.sw_enabled() {
                        v |= LVT_MASKED;
                    }
                    let old_mode = self.timer_mode();
                    self.lvt[i] = v;
                    if i == LVT_TIMER && self.timer_mode() != old_mode {
                        // A mode change disarms the timer.
                        self.timer_init = 0;
                        self.tsc_deadline = 0;
                        self.stop_timer();
                    }
                }
            }
        }
        None
    }

    fn eoi(&mut self) -> Option<Action> {
        let v = self.isr.highest()?;
        self.isr.clear(v);
        if self.tmr.get(v) {
            self.tmr.clear(v);
            return Some(Action::Eoi(v));
        }
        Some(Action::EdgeEoi(v))
    }

    fn send_ipi(&mut self, _now: u64) -> Option<Action> {
        let lo = self.icr_lo;
        let delivery = DeliveryMode::from_bits(lo);
        let vector = (lo & 0xff) as u8;
        if matches!(delivery, DeliveryMode::Fixed | DeliveryMode::LowestPriority) && vector < 16 {
            self.set_error(ESR_SEND_ILLEGAL);
            return None;
        }
        let shorthand = match (lo >> 18) & 3 {
            0 => Shorthand::None,
            1 => Shorthand::SelfOnly,
            2 => Shorthand::All,
            _ => Shorthand::AllButSelf,
        };
        let (dest, x2apic_dest) = if self.x2apic() {
            (self.icr_hi, true)
        } else {
            (self.icr_hi >> 24, false)
        };
        Some(Action::Ipi(IrqMessage {
            vector,
            delivery,
            logical: lo & (1 << 11) != 0,
            dest,
            x2apic_dest,
            shorthand,
            level_triggered: lo & (1 << 15) != 0,
            assert: lo & (1 << 14) != 0,
        }))
    }

    /// A read of the xAPIC page at `offset`. Accesses within one 32-bit register return its
    /// bytes; anything else, or an access while the page is not mapped (x2APIC mode or
    /// disabled), reads as 0.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8], now: u64) {
        data.fill(0);
        if self.mmio_base().is_none() || offset >= APIC_PAGE_SIZE {
            return;
        }
        let within = (offset & 0xf) as usize;
        if within + data.len() > 4 {
            return;
        }
        let v = self.read_reg((offset & !0xf) as u32, now).to_le_bytes();
        data.copy_from_slice(&v[within..within + data.len()]);
    }

    /// A write to the xAPIC page. Only aligned 32-bit writes reach registers (as on KVM).
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], now: u64) -> Option<Action> {
        if self.mmio_base().is_none() || offset >= APIC_PAGE_SIZE || offset & 0xf != 0 {
            return None;
        }
        let v: [u8; 4] = data.try_into().ok()?;
        let reg = offset as u32;
        if reg == REG_SELF_IPI {
            return None;
        }
        self.write_reg(reg, u32::from_le_bytes(v), now)
    }

    /// Read an MSR this LAPIC implements: IA32_APIC_BASE, IA32_TSC_DEADLINE, x2APIC.
    pub fn read_msr(&mut self, msr: u32, now: u64) -> Result<u64, Error> {
        match msr {
            MSR_APIC_BASE => return Ok(self.base),
            MSR_TSC_DEADLINE => {
                self.timer_tick(now);
                return Ok(self.tsc_deadline());
            }
            MSR_X2APIC_FIRST..=MSR_X2APIC_LAST => {}
            _ => return Err(Error::NotApicMsr(msr)),
        }
        let reg = self.x2apic_reg(msr)?;
        match reg {
            REG_EOI | REG_SELF_IPI | REG_DFR | REG_APR | REG_RRD | REG_ICR_HI => {
                Err(Error::GeneralProtection {
                    msr,
                    why: "write-only or absent in x2APIC mode",
                })
            }
            REG_ICR_LO => Ok((u64::from(self.icr_hi) << 32) | u64::from(self.icr_lo)),
            _ if self.is_register(reg) => Ok(u64::from(self.read_reg(reg, now))),
            _ => Err(Error::GeneralProtection {
                msr,
                why: "reserved x2APIC register",
            }),
        }
    }

    /// Write an MSR this LAPIC implements.
    pub fn write_msr(&mut self, msr: u32, value: u64, now: u64) -> Result<Option<Action>, Error> {
        match msr {
            MSR_APIC_BASE => return self.set_apic_base(value).map(|_| None),
            MSR_TSC_DEADLINE => {
                self.timer_tick(now);
                self.set_tsc_deadline(value, now);
                return Ok(None);
            }
            MSR_X2APIC_FIRST..=MSR_X2APIC_LAST => {}
            _ => return Err(Error::NotApicMsr(msr)),
        }
        let reg = self.x2apic_reg(msr)?;
        let gp = |why| Err(Error::GeneralProtection { msr, why });
        match reg {
            REG_ID | REG_VERSION | REG_PPR | REG_LDR | REG_TIMER_CUR => {
                gp("read-only x2APIC register")
            }
            REG_DFR | REG_APR | REG_RRD | REG_ICR_HI => gp("absent in x2APIC mode"),
            0x100..=0x270 => gp("read-only x2APIC register"),
            REG_ICR_LO => {
                self.icr_hi = (value >> 32) as u32;
                Ok(self.write_reg(REG_ICR_LO, value as u32, now))
            }
            _ if value >> 32 != 0 => gp("reserved bits set"),
            _ if self.is_register(reg) || reg == REG_SELF_IPI => {
                Ok(self.write_reg(reg, value as u32, now))
            }
            _ => gp("reserved x2APIC register"),
        }
    }

    fn x2apic_reg(&self, msr: u32) -> Result<u32, Error> {
        if !self.x2apic() {
            return Err(Error::GeneralProtection {
                msr,
                why: "x2APIC MSR while not in x2APIC mode",
            });
        }
        Ok((msr - MSR_X2APIC_FIRST) << 4)
    }

    fn is_register(&self, reg: u32) -> bool {
        matches!(
            reg,
            REG_ID | REG_VERSION | REG_TPR | REG_PPR | REG_EOI | REG_LDR | REG_SVR | 0x100
                ..=0x270 | REG_ESR | REG_ICR_LO | REG_TIMER_INIT | REG_TIMER_CUR | REG_TIMER_DIV
        ) || lvt_index(reg).is_some()
    }

    /// Report an illegal register access to the error register (used by callers that
    /// detect one).
    pub fn illegal_register(&mut self) -> bool {
        self.set_error(ESR_ILLEGAL_REG)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000;

    fn enabled(id: u32, bsp: bool) -> Lapic {
        let mut l = Lapic::new(id, bsp, 2_000_000_000);
        l.write_reg(REG_SVR, 0x1ff, NOW);
        l
    }

    #[test]
    fn fixed_interrupts_prioritize_by_class_and_tpr() {
        let mut l = enabled(0, true);
        l.accept(&IrqMessage::fixed(0x31, 0));
        l.accept(&IrqMessage::fixed(0x52, 0));
        assert_eq!(l.deliverable(), Some(0x52));
        assert_eq!(l.ack(), Some(0x52));
        // 0x31 is a lower class than the in-service 0x52.
        assert_eq!(l.deliverable(), None);
        assert_eq!(l.ppr(), 0x50);
        l.write_reg(REG_EOI, 0, NOW);
        assert_eq!(l.deliverable(), Some(0x31));
        l.set_tpr(0x30);
        assert_eq!(l.deliverable(), None, "TPR class 3 blocks vector 0x31");
        l.set_tpr(0x20);
        assert_eq!(l.ack(), Some(0x31));
        assert_eq!(l.read_reg(REG_ISR + 0x10, NOW), 1 << 0x11);
    }

    #[test]
    fn illegal_vectors_and_software_disable() {
        let mut l = Lapic::new(0, true, 1);
        l.accept(&IrqMessage::fixed(0x40, 0));
        assert_eq!(l.deliverable(), None, "software-disabled APIC holds IRR");
        l.write_reg(REG_SVR, 0x1ff, NOW);
        assert_eq!(l.deliverable(), Some(0x40));
        l.accept(&IrqMessage::fixed(3, 0));
        l.write_reg(REG_ESR, 0, NOW);
        assert_eq!(l.read_reg(REG_ESR, NOW), ESR_RECV_ILLEGAL);
        l.write_reg(REG_SVR, 0xff, NOW);
        assert!(l.lvt.iter().all(|v| v & LVT_MASKED != 0));
        l.write_reg(REG_LVT_LINT0, 0x700, NOW);
        assert_ne!(l.lvt[LVT_LINT0] & LVT_MASKED, 0, "LVTs stay masked");
    }

    #[test]
    fn oneshot_periodic_and_divide() {
        let mut l = enabled(0, true);
        l.write_reg(REG_TIMER_DIV, 0x3, NOW); // divide by 16
        l.write_reg(REG_LVT_TIMER, 0xec, NOW);
        l.write_reg(REG_TIMER_INIT, 1000, NOW);
        assert_eq!(l.next_timer_deadline(), Some(NOW + 16_000));
        assert_eq!(l.read_reg(REG_TIMER_CUR, NOW + 1600), 900);
        assert!(!l.timer_tick(NOW + 15_999));
        assert!(l.timer_tick(NOW + 16_000));
        assert_eq!(l.ack(), Some(0xec));
        assert_eq!(l.next_timer_deadline(), None);
        assert_eq!(l.read_reg(REG_TIMER_CUR, NOW + 20_000), 0);
        // Periodic, divide by 1, 100 µs.
        l.write_reg(REG_TIMER_DIV, 0xb, NOW);
        l.write_reg(REG_LVT_TIMER, 0x2_00ec, NOW);
        l.write_reg(REG_TIMER_INIT, 100_000, NOW);
        assert!(l.timer_tick(NOW + 100_000));
        assert_eq!(l.next_timer_deadline(), Some(NOW + 200_000));
        assert_eq!(l.read_reg(REG_TIMER_CUR, NOW + 150_000), 50_000);
        // Late: missed periods coalesce.
        assert!(l.timer_tick(NOW + 1_050_000));
        assert_eq!(l.next_timer_deadline(), Some(NOW + 1_100_000));
        // Masked: counts, but no IRR.
        l.write_reg(REG_LVT_TIMER, 0x3_00ec, NOW);
        assert!(!l.timer_tick(NOW + 1_100_000));
        // Writing 0 stops it.
        l.write_reg(REG_TIMER_INIT, 0, NOW);
        assert_eq!(l.next_timer_deadline(), None);
    }

    #[test]
    fn tsc_deadline_mode() {
        let mut l = enabled(0, true);
        l.write_reg(REG_LVT_TIMER, 0x4_00ef, NOW);
        // 2 GHz TSC: deadline 4_000_000 cycles = 2 ms.
        l.write_msr(MSR_TSC_DEADLINE, 4_000_000, NOW).unwrap();
        assert_eq!(l.next_timer_deadline(), Some(2_000_000));
        assert_eq!(l.read_msr(MSR_TSC_DEADLINE, NOW).unwrap(), 4_000_000);
        l.write_reg(REG_TIMER_INIT, 5, NOW);
        assert_eq!(
            l.read_reg(REG_TIMER_INIT, NOW),
            0,
            "ignored in deadline mode"
        );
        assert!(l.timer_tick(2_000_000));
        assert_eq!(l.read_msr(MSR_TSC_DEADLINE, 2_000_000).unwrap(), 0);
        assert_eq!(l.ack(), Some(0xef));
        // A deadline in the past fires at once; switching modes disarms.
        l.write_msr(MSR_TSC_DEADLINE, 1, 3_000_000).unwrap();
        assert_eq!(l.next_timer_deadline(), Some(3_000_000));
        l.write_reg(REG_LVT_TIMER, 0x00ef, NOW);
        assert_eq!(l.next_timer_deadline(), None);
        // Guest TSC writes shift the deadline base.
        l.set_guest_tsc(0, 10_000_000);
        assert_eq!(l.guest_tsc(10_500_000), 1_000_000);
    }

    #[test]
    fn icr_encodes_ipis() {
        let mut l = enabled(0, true);
        l.write_reg(REG_ICR_HI, 0x0300_0000, NOW);
        let a = l.write_reg(REG_ICR_LO, 0x0000_4500, NOW).unwrap();
        let Action::Ipi(m) = a else { panic!("{a:?}") };
        assert_eq!(
            (m.delivery, m.dest, m.assert, m.level_triggered),
            (DeliveryMode::Init, 3, true, false)
        );
        let Action::Ipi(m) = l.write_reg(REG_ICR_LO, 0x000c_4699, NOW).unwrap() else {
            panic!()
        };
        assert_eq!(
            (m.delivery, m.vector, m.shorthand),
            (DeliveryMode::StartUp, 0x99, Shorthand::AllButSelf)
        );
        assert_eq!(
            l.write_reg(REG_ICR_LO, 0x0000_0005, NOW),
            None,
            "illegal vector"
        );
        assert_eq!(l.read_reg(REG_ICR_LO, NOW) & (1 << 12), 0, "never busy");
    }

    #[test]
    fn destinations_physical_flat_cluster_x2apic() {
        let mut l = enabled(5, false);
        assert!(l.matches(5, false, false));
        assert!(l.matches(0xff, false, false));
        assert!(!l.matches(4, false, false));
        l.write_reg(REG_LDR, 0x2000_0000, NOW);
        assert!(l.matches(0x20, true, false));
        assert!(!l.matches(0x10, true, false));
        l.write_reg(REG_DFR, 0x0fff_ffff, NOW); // cluster
        l.write_reg(REG_LDR, 0x3200_0000, NOW);
        assert!(l.matches(0x36, true, false));
        assert!(!l.matches(0x22, true, false));
        l.write_msr(
            MSR_APIC_BASE,
            0xfee0_0000 | APIC_BASE_EN | APIC_BASE_EXTD,
            NOW,
        )
        .unwrap();
        assert_eq!(l.read_msr(0x80d, NOW).unwrap(), 1 << 5);
        assert!(l.matches(5, false, true));
        assert!(l.matches(0x0000_0020, true, true));
        assert!(l.matches(u32::MAX, false, true));
        assert_eq!(l.mmio_base(), None);
    }

    #[test]
    fn apic_base_transitions_and_x2apic_msrs() {
        let mut l = enabled(1, false);
        assert!(l.read_msr(0x802, NOW).is_err(), "x2APIC MSR in xAPIC mode");
        assert!(l.set_apic_base(0xfee0_0000 | APIC_BASE_EXTD).is_err());
        l.set_apic_base(0xfee0_0000 | APIC_BASE_EN | APIC_BASE_EXTD)
            .unwrap();
        assert_eq!(l.read_msr(0x802, NOW).unwrap(), 1);
        assert!(l.set_apic_base(0xfee0_0000 | APIC_BASE_EN).is_err());
        assert!(l.write_msr(0x802, 7, NOW).is_err(), "ID is read-only");
        assert!(l.read_msr(0x80b, NOW).is_err(), "EOI is write-only");
        let a = l
            .write_msr(0x830, (2u64 << 32) | 0x40f1, NOW)
            .unwrap()
            .unwrap();
        assert_eq!(
            a,
            Action::Ipi(IrqMessage {
                x2apic_dest: true,
                assert: true,
                ..IrqMessage::fixed(0xf1, 2)
            })
        );
        let a = l.write_msr(0x83f, 0x55, NOW).unwrap().unwrap();
        let Action::Ipi(m) = a else { panic!() };
        assert_eq!((m.vector, m.shorthand), (0x55, Shorthand::SelfOnly));
        assert!(matches!(
            l.read_msr(0x10, NOW),
            Err(Error::NotApicMsr(0x10))
        ));
        l.set_apic_base(0).unwrap();
        assert!(!l.hw_enabled());
        assert!(l.accepts_pic());
    }

    #[test]
    fn init_sipi_and_level_eoi() {
        let mut l = enabled(1, false);
        l.set_wait_for_sipi();
        let sipi = IrqMessage {
            delivery: DeliveryMode::StartUp,
            ..IrqMessage::fixed(0x9a, 1)
        };
        let init = IrqMessage {
            delivery: DeliveryMode::Init,
            ..IrqMessage::fixed(0, 1)
        };
        l.accept(&init);
        assert!(l.take_init());
        l.accept(&sipi);
        l.accept(&IrqMessage {
            vector: 0x11,
            ..sipi
        });
        assert_eq!(l.take_sipi(), Some(0x9a));
        assert_eq!(l.take_sipi(), None, "second SIPI ignored once running");
        // De-assert INIT is a no-op.
        l.accept(&IrqMessage {
            level_triggered: true,
            assert: false,
            ..init
        });
        assert!(!l.init_pending());
        l.write_reg(REG_SVR, 0x1ff, NOW);
        l.accept(&IrqMessage {
            level_triggered: true,
            ..IrqMessage::fixed(0x61, 1)
        });
        assert_eq!(l.ack(), Some(0x61));
        assert_eq!(l.write_reg(REG_EOI, 0, NOW), Some(Action::Eoi(0x61)));
        assert_eq!(l.write_reg(REG_EOI, 0, NOW), None);
        l.accept(&IrqMessage::fixed(0x62, 1));
        assert_eq!(l.ack(), Some(0x62));
        assert_eq!(l.write_reg(REG_EOI, 0, NOW), Some(Action::EdgeEoi(0x62)));
    }

    #[test]
    fn mmio_access_sizes() {
        let mut l = enabled(3, false);
        let mut d = [0u8; 4];
        l.mmio_read(0x20, &mut d, NOW);
        assert_eq!(u32::from_le_bytes(d), 3 << 24);
        let mut b = [0u8; 1];
        l.mmio_read(0x23, &mut b, NOW);
        assert_eq!(b[0], 3);
        let mut q = [0u8; 8];
        l.mmio_read(0x20, &mut q, NOW);
        assert_eq!(q, [0; 8]);
        l.mmio_write(0x80, &[0x40, 0, 0, 0], NOW);
        l.mmio_write(0x80, &[0x50], NOW);
        l.mmio_write(0x84, &[0x60, 0, 0, 0], NOW);
        assert_eq!(l.tpr(), 0x40);
        l.mmio_write(0xfff, &[1], NOW);
        l.mmio_read(0x2000, &mut d, NOW);
    }
}
