//! The timing probe: a throwaway KVM VM that runs a `dec rcx; jnz` loop in guest ring 0 and in
//! guest ring 3 and reports how many iterations per second each ring manages.
//!
//! The guest is built in-process: identity-mapped user-accessible page tables, a GDT with
//! kernel and user segments and a 64-bit TSS; the vCPU enters long mode directly through
//! KVM_SET_SREGS (ring 3 too: CS/SS selectors with RPL 3 and DPL 3, RFLAGS.IOPL = 3, so the
//! final `out` exits to us from either ring). The probe VM's addresses live in
//! `kvmbox_arch::layout` (`PROBE_*`).

use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use kvmbox_arch::layout::{
    DEBUG_EXIT_PORT, PDE_START, PDPTE_START, PML4_START, PROBE_CODE_START, PROBE_GDT_START,
    PROBE_MEM_SIZE, PROBE_STACK_POINTER, PROBE_TSS_START,
};

use crate::{Error, Result};

/// Which privilege level the timed loop runs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ring {
    /// Guest kernel mode (CPL 0).
    Zero,
    /// Guest user mode (CPL 3).
    Three,
}

impl Ring {
    fn name(self) -> &'static str {
        match self {
            Ring::Zero => "ring 0",
            Ring::Three => "ring 3",
        }
    }
}

/// How fast one ring ran the loop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoopRate {
    /// Loop iterations in the measured run.
    pub iterations: u64,
    /// Time of that run minus the time of a 1-iteration run (VM entry/exit cost removed).
    pub elapsed: Duration,
}

impl LoopRate {
    /// Iterations per second.
    pub fn per_sec(&self) -> f64 {
        // A run shorter than the clock can resolve still counts as 1 ns.
        self.iterations as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// How long a measured run must take at least, and where the iteration count starts and stops.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// First iteration count tried.
    pub start: u64,
    /// The count is multiplied by 8 until a run takes at least this long (beyond the fixed
    /// entry/exit cost) ...
    pub min_time: Duration,
    /// ... or the count reaches this.
    pub max_iterations: u64,
}

// Descriptor flags (access byte in bits 0-7, G/DB/L/AVL in bits 12-15), as Firecracker's gdt_entry.
const CODE64_KERNEL: u16 = 0xa09b;
const DATA_KERNEL: u16 = 0xc093;
const DATA_USER: u16 = 0xc0f3;
const CODE64_USER: u16 = 0xa0fb;
const TSS64_BUSY: u16 = 0x008b;

const GDT_KERNEL_CODE: u16 = 1;
const GDT_KERNEL_DATA: u16 = 2;
const GDT_USER_DATA: u16 = 3;
const GDT_USER_CODE: u16 = 4;
const GDT_TSS: u16 = 5; // 16 bytes: entries 5 and 6
const GDT_ENTRIES: u16 = 7;
const TSS_IOPB_OFFSET: u16 = 104;
/// The TSS covers its 104 bytes, a 32-byte I/O bitmap (ports 0-255) and the closing 0xff byte.
const TSS_LIMIT: u32 = 104 + 32;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_RESERVED: u64 = 1 << 1;
const RFLAGS_IOPL3: u64 = 3 << 12;

/// Signals tolerated during one timed run before the probe gives up.
const MAX_INTERRUPTIONS: u32 = 100;

const PTE_PRESENT_RW_USER: u64 = 0x7;
const PDE_2M_PAGE: u64 = 0x80;

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags = u64::from(flags);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The `kvm_segment` KVM must see for GDT entry `entry` at `index`, selected with `rpl`.
fn segment(entry: u64, index: u16, rpl: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = bit(55);
    kvm_segment {
        base,
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: (index * 8) | rpl,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(bit(47) == 0),
        padding: 0,
    }
}

/// The loop: `dec rcx; jnz loop; mov dx, DEBUG_EXIT_PORT; out dx, al; hlt; jmp hlt`.
fn loop_code() -> Vec<u8> {
    let [lo, hi] = DEBUG_EXIT_PORT.to_le_bytes();
    vec![
        0x48, 0xff, 0xc9, // dec rcx
        0x75, 0xfb, // jnz -5
        0x66, 0xba, lo, hi,   // mov dx, port
        0xee, // out dx, al
        0xf4, // hlt
        0xeb, 0xfd, // jmp -3 (back to hlt)
    ]
}

/// Anonymous host memory backing the probe VM's RAM.
struct GuestRam {
    ptr: *mut u8,
    len: usize,
}

impl GuestRam {
    fn new(len: usize) -> Result<Self> {
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing touches no
        // existing memory; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Mmap(std::io::Error::last_os_error()));
        }
        Ok(GuestRam {
            ptr: ptr.cast(),
            len,
        })
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: ptr/len describe a live mapping we own (unmapped only in Drop), and the
        // returned slice borrows self mutably, so no other Rust reference aliases it. The guest
        // is not running while the VMM holds this slice (the probe runs the vCPU on this thread).
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    fn write(&mut self, addr: u64, data: &[u8]) {
        // Addresses come from our own constants, all inside PROBE_MEM_SIZE.
        let start = usize::try_from(addr).expect("probe address fits usize");
        self.bytes()[start..start + data.len()].copy_from_slice(data);
    }

    fn write_u64(&mut self, addr: u64, val: u64) {
        self.write(addr, &val.to_le_bytes());
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: ptr/len came from a successful mmap in `new` and are unmapped exactly once.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// A throwaway VM with one vCPU that runs the timed loop.
pub struct ProbeVm {
    // Field order is drop order: the vCPU and VM go before their memory.
    vcpu: VcpuFd,
    _vm: VmFd,
    _ram: GuestRam,
    kernel_sregs: kvm_sregs,
    user_sregs: kvm_sregs,
    current: Option<Ring>,
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |e| Error::Kvm {
        op,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

impl ProbeVm {
    /// Create the VM, its memory, page tables, GDT, TSS and code, and one vCPU.
    pub fn new(kvm: &Kvm) -> Result<Self> {
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let mem_size = usize::try_from(PROBE_MEM_SIZE).expect("probe memory fits usize");
        let mut ram = GuestRam::new(mem_size)?;

        // Page tables: one 2 MiB user-accessible identity page at 0.
        ram.write_u64(PML4_START, PDPTE_START | PTE_PRESENT_RW_USER);
        ram.write_u64(PDPTE_START, PDE_START | PTE_PRESENT_RW_USER);
        ram.write_u64(PDE_START, PDE_2M_PAGE | PTE_PRESENT_RW_USER);

        // GDT.
        let tss_base = u32::try_from(PROBE_TSS_START).expect("probe TSS below 4 GiB");
        let gdt = [
            0,
            gdt_entry(CODE64_KERNEL, 0, 0xfffff),
            gdt_entry(DATA_KERNEL, 0, 0xfffff),
            gdt_entry(DATA_USER, 0, 0xfffff),
            gdt_entry(CODE64_USER, 0, 0xfffff),
            gdt_entry(TSS64_BUSY, tss_base, TSS_LIMIT),
            0, // upper half of the TSS descriptor: base bits 32-63
        ];
        for (i, e) in gdt.iter().enumerate() {
            ram.write_u64(PROBE_GDT_START + 8 * i as u64, *e);
        }

        // TSS: RSP0 at offset 4; the I/O permission bitmap right after the 104-byte TSS (offset
        // at 0x66) opens DEBUG_EXIT_PORT to ring 3. RFLAGS.IOPL = 3 alone is not enough:
        // kvm_pvm clears IOPL when it enters guest ring 3, but honours the bitmap.
        ram.write_u64(PROBE_TSS_START + 4, PROBE_STACK_POINTER);
        ram.write(PROBE_TSS_START + 0x66, &TSS_IOPB_OFFSET.to_le_bytes());
        // Ports 0-255, then the all-ones byte the CPU requires after the bitmap.
        let mut bitmap = [0xffu8; 33];
        bitmap[usize::from(DEBUG_EXIT_PORT / 8)] &= !(1 << (DEBUG_EXIT_PORT % 8));
        ram.write(PROBE_TSS_START + u64::from(TSS_IOPB_OFFSET), &bitmap);

        ram.write(PROBE_CODE_START, &loop_code());

        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: PROBE_MEM_SIZE,
            userspace_addr: ram.ptr as u64,
        };
        // SAFETY: the region is our own mapping of PROBE_MEM_SIZE bytes, which lives in `ProbeVm`
        // next to the VM and is unmapped only after the VM fd is closed (field drop order).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;

        let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let mut base = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        base.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
        base.cr3 = PML4_START;
        base.cr4 = CR4_PAE;
        base.efer = EFER_LME | EFER_LMA;
        base.gdt.base = PROBE_GDT_START;
        base.gdt.limit = GDT_ENTRIES * 8 - 1;
        base.idt.base = 0;
        base.idt.limit = 0;
        base.tr = segment(gdt[usize::from(GDT_TSS)], GDT_TSS, 0);

        let mut kernel_sregs = base;
        let kdata = segment(gdt[usize::from(GDT_KERNEL_DATA)], GDT_KERNEL_DATA, 0);
        kernel_sregs.cs = segment(gdt[usize::from(GDT_KERNEL_CODE)], GDT_KERNEL_CODE, 0);
        kernel_sregs.ds = kdata;
        kernel_sregs.es = kdata;
        kernel_sregs.fs = kdata;
        kernel_sregs.gs = kdata;
        kernel_sregs.ss = kdata;

        let mut user_sregs = base;
        let udata = segment(gdt[usize::from(GDT_USER_DATA)], GDT_USER_DATA, 3);
        user_sregs.cs = segment(gdt[usize::from(GDT_USER_CODE)], GDT_USER_CODE, 3);
        user_sregs.ds = udata;
        user_sregs.es = udata;
        user_sregs.fs = udata;
        user_sregs.gs = udata;
        user_sregs.ss = udata;

        Ok(ProbeVm {
            vcpu,
            _vm: vm,
            _ram: ram,
            kernel_sregs,
            user_sregs,
            current: None,
        })
    }

    /// Run the loop once with `iterations` (>= 1) in `ring`; return the wall time of KVM_RUN.
    pub fn run_loop(&mut self, ring: Ring, iterations: u64) -> Result<Duration> {
        let iterations = iterations.max(1);
        if self.current != Some(ring) {
            let sregs = match ring {
                Ring::Zero => &self.kernel_sregs,
                Ring::Three => &self.user_sregs,
            };
            self.vcpu
                .set_sregs(sregs)
                .map_err(kvm_err("KVM_SET_SREGS"))?;
            self.current = Some(ring);
        }
        let regs = kvm_regs {
            rip: PROBE_CODE_START,
            rsp: PROBE_STACK_POINTER,
            rflags: RFLAGS_RESERVED | RFLAGS_IOPL3,
            rcx: iterations,
            ..Default::default()
        };
        self.vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        let start = Instant::now();
        let mut interrupted = 0;
        loop {
            let exit = self.vcpu.run();
            let elapsed = start.elapsed();
            match exit {
                Ok(VcpuExit::IoOut(port, _)) if port == DEBUG_EXIT_PORT => return Ok(elapsed),
                // A signal reached this thread mid-loop: the registers hold the loop's state,
                // so running again finishes it (and the time keeps counting).
                Ok(VcpuExit::Intr) if interrupted < MAX_INTERRUPTIONS => interrupted += 1,
                Err(e) if e.errno() == libc::EINTR && interrupted < MAX_INTERRUPTIONS => {
                    interrupted += 1
                }
                Ok(other) => {
                    // Forget the ring so the next run reloads the registers from scratch.
                    self.current = None;
                    return Err(Error::ProbeExit {
                        ring: ring.name(),
                        exit: format!("{other:?}"),
                    });
                }
                Err(e) => {
                    self.current = None;
                    return Err(kvm_err("KVM_RUN")(e));
                }
            }
        }
    }

    /// The fixed cost of one run (VM entry, one iteration, the `out` exit): the fastest of three.
    fn baseline(&mut self, ring: Ring) -> Result<Duration> {
        let mut best = Duration::MAX;
        for _ in 0..3 {
            best = best.min(self.run_loop(ring, 1)?);
        }
        Ok(best)
    }

    /// Time the loop in `ring`, growing the count 8x until a run takes `budget.min_time`.
    pub fn measure(&mut self, ring: Ring, budget: Budget) -> Result<LoopRate> {
        let base = self.baseline(ring)?;
        let mut n = budget.start.max(1);
        loop {
            let t = self.run_loop(ring, n)?;
            let net = t.saturating_sub(base);
            if net >= budget.min_time || n >= budget.max_iterations {
                return Ok(LoopRate {
                    iterations: n,
                    elapsed: net,
                });
            }
            n = n.saturating_mul(8).min(budget.max_iterations);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_the_segments_kvm_expects() {
        let cs = segment(gdt_entry(CODE64_USER, 0, 0xfffff), GDT_USER_CODE, 3);
        assert_eq!(cs.selector, 0x23);
        assert_eq!((cs.dpl, cs.l, cs.db, cs.s, cs.present), (3, 1, 0, 1, 1));
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
        let ss = segment(gdt_entry(DATA_USER, 0, 0xfffff), GDT_USER_DATA, 3);
        assert_eq!((ss.selector, ss.dpl, ss.type_, ss.db), (0x1b, 3, 3, 1));
        let tr = segment(gdt_entry(TSS64_BUSY, 0x12_3456, TSS_LIMIT), GDT_TSS, 0);
        assert_eq!(
            (tr.base, tr.limit, tr.type_, tr.s, tr.g),
            (0x12_3456, TSS_LIMIT, 0xb, 0, 0)
        );
        assert_eq!(tr.selector, 0x28);
    }

    #[test]
    fn loop_code_branches_back_to_dec() {
        let code = loop_code();
        // jnz rel8 at offset 3..5 lands on offset 0.
        assert_eq!(5 + i64::from(code[4] as i8), 0);
        // jmp rel8 at 11..13 lands on the hlt at 10.
        assert_eq!(code[10], 0xf4);
        assert_eq!(13 + i64::from(code[12] as i8), 10);
    }
}
