/*
 * A guest that misbehaves on purpose: scenarios that attack the VMM through its ports, its
 * MMIO holes, MSRs and CPUID. Every bad request must fail (0xff reads, #GP for a bad MSR)
 * while the VMM stays up; the scenario then reports and the guest goes on. Everything here
 * runs in ring 0 with interrupts off.
 */
#include "tg.h"

/* ------------------------------------------------------------ #GP catching */

/* Set while a probe wants a #GP on RDMSR/WRMSR to be skipped instead of ending the guest. */
static volatile int catching_gp;
static volatile u64 gp_caught;

/* Called by trap() for a ring-0 #GP: skip a faulting RDMSR/WRMSR while catching. */
int attack_catch_gp(struct trap_frame *f)
{
	if (!catching_gp || f->vector != 13)
		return 0;
	const u8 *ip = (const u8 *)f->rip;
	if (ip[0] != 0x0f || (ip[1] != 0x30 && ip[1] != 0x32))
		return 0;
	f->rip += 2;
	gp_caught++;
	return 1;
}

/* RDMSR; 0 if it raised #GP. */
static int safe_rdmsr(u32 msr, u64 *v)
{
	u64 before = gp_caught;
	u32 lo = 0, hi = 0;
	catching_gp = 1;
	__asm__ volatile("rdmsr" : "+a"(lo), "+d"(hi) : "c"(msr) : "memory");
	catching_gp = 0;
	*v = ((u64)hi << 32) | lo;
	return gp_caught == before;
}

/* WRMSR; 0 if it raised #GP. */
static int safe_wrmsr(u32 msr, u64 v)
{
	u64 before = gp_caught;
	catching_gp = 1;
	__asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
	catching_gp = 0;
	return gp_caught == before;
}

/* ------------------------------------------------------------ attackport */

/*
 * Ports whose normal function would end or disturb the run itself: the console, the
 * debug-exit port, the i8042 (0xfe = reset), the ACPI PM block (S5 and the reset register)
 * and PCI configuration (attacked through ECAM by attackmmio instead).
 */
static int port_skipped1(u32 p)
{
	return (p >= COM1_PORT && p < COM1_PORT + 8) || (p >= DEBUG_EXIT_PORT && p < DEBUG_EXIT_PORT + 4) || p == 0x60 ||
	       p == I8042_CMD_PORT || (p >= 0x600 && p < 0x610) || (p >= 0xcf8 && p < 0xd00);
}

/* An access of `width` bytes at `p` touches a skipped port. */
static int port_skipped(u32 p, u32 width)
{
	for (u32 i = 0; i < width; i++)
		if (port_skipped1((p + i) & 0xffff))
			return 1;
	return 0;
}

/*
 * Ports 0..last (but the few above) get V byte values spread over 0..0xff (V=256: every
 * value), then word and dword writes of 0 and all-ones, each followed by a read of that size.
 */
static int port_sweep(const char *name, u32 last, const char *arg)
{
	u64 values = parse_u64(arg, 4);
	if (values < 1 || values > 256) {
		printk("KVMBOX-TEST %s error=bad-values\n", name);
		return 1;
	}
	u64 t0 = rdtsc(), accesses = 0, skipped = 0, ports = 0;
	for (u32 p = 0; p <= last; p++) {
		if (port_skipped(p, 1)) {
			skipped++;
			continue;
		}
		ports++;
		for (u64 i = 0; i < values; i++) {
			u8 v = values == 1 ? 0xff : (u8)(i * 255 / (values - 1));
			outb((u16)p, v);
			(void)inb((u16)p);
			accesses += 2;
		}
		if (!port_skipped(p, 2)) {
			outw((u16)p, 0);
			(void)inw((u16)p);
			outw((u16)p, 0xffff);
			accesses += 3;
		}
		if (!port_skipped(p, 4)) {
			outl((u16)p, 0);
			(void)inl((u16)p);
			outl((u16)p, 0xffffffff);
			accesses += 3;
		}
	}
	printk("KVMBOX-TEST %s ports=%lu skipped=%lu values=%lu accesses=%lu cycles=%lu\n", name,
	       ports, skipped, values, accesses, rdtsc() - t0);
	return 0;
}

/* attackport[:V]: every port 0-0xffff. */
int test_attackport(const char *arg)
{
	return port_sweep("attackport", 0xffff, arg);
}

/* attackportlow[:V]: the legacy range 0-0xfff, where the PC's devices are (each port access
 * is a ~10-100 us exit on a KVM that emulates guest ring 0: the full range takes minutes). */
int test_attackportlow(const char *arg)
{
	return port_sweep("attackportlow", 0xfff, arg);
}

/* ------------------------------------------------------------ attackmmio */

static u64 mmio_accesses;

/* Reads, then writes all-ones and zero, every `stride` bytes of [base, base + len). */
static void sweep(u64 base, u64 len, u64 stride)
{
	for (u64 a = base; a < base + len; a += stride) {
		(void)mmio_read32(a);
		mmio_write32(a, 0xffffffff);
		mmio_write32(a, 0);
		mmio_accesses += 3;
	}
}

/* Every dword of PCI bus 0's configuration space through ECAM: zero (a BAR moves onto RAM
 * at 0), all-ones (BAR sizing), then the old value back. */
static void ecam_bus0(void)
{
	const u64 ecam = 0xe0000000UL;
	for (u64 off = 0; off < (1UL << 20); off += 4) {
		u32 old = mmio_read32(ecam + off);
		if ((off & 0xfff) == 0 && (old & 0xffff) == 0xffff) {
			off += 0xffc; /* no function here: one read is enough */
			mmio_accesses++;
			continue;
		}
		mmio_write32(ecam + off, 0);
		mmio_write32(ecam + off, 0xffffffff);
		mmio_write32(ecam + off, old);
		mmio_accesses += 4;
	}
}

/* The IOAPIC's 256 register indices: read, write zero and all-ones, restore. */
static void ioapic_regs(u64 base)
{
	for (u32 r = 0; r < 256; r++) {
		mmio_write32(base, r);
		u32 old = mmio_read32(base + 0x10);
		mmio_write32(base + 0x10, 0);
		mmio_write32(base + 0x10, 0xffffffff);
		mmio_write32(base, r);
		mmio_write32(base + 0x10, old);
		mmio_accesses += 6;
	}
	/* Undefined offsets in the page. */
	sweep(base + 0x20, 0x1000 - 0x20, 0x10);
}

/* Every local APIC register but the ICR (which would send real IPIs, INIT to ourselves
 * included): read, write all-ones and zero, restore. In x2APIC mode MMIO is ignored. */
static void lapic_regs(u64 base)
{
	for (u64 off = 0; off < 0x1000; off += 0x10) {
		if (off == 0x300 || off == 0x310)
			continue;
		u32 old = mmio_read32(base + off);
		mmio_write32(base + off, 0xffffffff);
		mmio_write32(base + off, 0);
		mmio_write32(base + off, old);
		mmio_accesses += 4;
	}
}

/*
 * attackmmio: reads and writes across every MMIO hole: RAM's end to the 32-bit hole (1 MiB
 * stride), the PCI BAR window (every 4 KiB page: virtio registers, notify, MSI-X tables),
 * the virtio-mmio windows (every dword of the first two, then 4 KiB), ECAM (bus 0 every
 * dword, the rest every 64 KiB), the IOAPIC and LAPIC registers and the gaps between.
 */
int test_attackmmio(const char *arg)
{
	(void)arg;
	u64 t0 = rdtsc();
	u64 ram_top = 0;
	for (u32 i = 0; i < boot.nr_memmap; i++) {
		u64 e = boot.memmap[i].addr + boot.memmap[i].size;
		if (boot.memmap[i].type == 1 && e <= HOLE_START && e > ram_top)
			ram_top = e;
	}
	ram_top = (ram_top + 0xfffff) & ~0xfffffUL;
	u64 ioapic = acpi.ioapic ? acpi.ioapic : IOAPIC_ADDR;
	if (ram_top < HOLE_START)
		sweep(ram_top, HOLE_START - ram_top, 1UL << 20);
	sweep(0xc0000000UL, 0x10000000UL, 0x1000);
	sweep(0xd0000000UL, 0x2000, 4);
	sweep(0xd0002000UL, 0x10000000UL - 0x2000, 0x10000);
	ecam_bus0();
	sweep(0xe0100000UL, 0x10000000UL - 0x100000, 0x10000);
	sweep(0xf0000000UL, ioapic - 0xf0000000UL, 0x100000);
	ioapic_regs(ioapic);
	sweep(ioapic + 0x1000, LAPIC_ADDR - ioapic - 0x1000, 0x10000);
	lapic_regs(LAPIC_ADDR);
	sweep(LAPIC_ADDR + 0x1000, HOLE_END - LAPIC_ADDR - 0x1000, 0x100000);
	printk("KVMBOX-TEST attackmmio ram_top=0x%lx accesses=%lu cycles=%lu\n", ram_top,
	       mmio_accesses, rdtsc() - t0);
	return 0;
}

/* ------------------------------------------------------------ attackmsr */

/* MSR indices that exist nowhere: every access must raise #GP. */
static const u32 invalid_msrs[] = {0x00002fff, 0x12345678, 0x3fffffff, 0x7fffffff,
				   0x80000000, 0xbfffffff, 0xdeadbeef, 0xffffffff};

/* Ranges probed with RDMSR; those marked writable get each readable value written back. */
static const struct {
	u32 start, count;
	int write_back;
} msr_ranges[] = {
	{0x00000000, 0x2000, 1}, {0x40000000, 0x200, 0}, {0x4b564d00, 0x100, 0},
	{0xc0000000, 0x1000, 1}, {0xc0010000, 0x2000, 0},
};

/* Writing these back with an old value would move time or the APIC under our feet. */
static int msr_keep(u32 msr)
{
	return msr == 0x10 || msr == 0x3b || msr == 0x6e0 || msr == 0x1b;
}

/*
 * attackmsr: RDMSR of ~15,000 indices (architectural, hypervisor, AMD ranges), the readable
 * ones in the architectural ranges written back unchanged, RDMSR and WRMSR of indices that
 * exist nowhere (each must raise #GP, caught here), then CPUID of every leaf in the basic,
 * hypervisor, extended and unassigned ranges with subleaves 0-3; CPUID 0 must not change.
 */
int test_attackmsr(const char *arg)
{
	(void)arg;
	u64 t0 = rdtsc();
	u64 read_ok = 0, read_gp = 0, write_ok = 0, write_gp = 0, invalid_gp = 0;
	for (u32 r = 0; r < sizeof(msr_ranges) / sizeof(msr_ranges[0]); r++) {
		for (u32 i = 0; i < msr_ranges[r].count; i++) {
			u32 msr = msr_ranges[r].start + i;
			u64 v;
			if (!safe_rdmsr(msr, &v)) {
				read_gp++;
				continue;
			}
			read_ok++;
			if (!msr_ranges[r].write_back || msr_keep(msr))
				continue;
			if (safe_wrmsr(msr, v))
				write_ok++;
			else
				write_gp++;
		}
	}
	u32 n_invalid = sizeof(invalid_msrs) / sizeof(invalid_msrs[0]);
	for (u32 i = 0; i < n_invalid; i++) {
		u64 v;
		invalid_gp += !safe_rdmsr(invalid_msrs[i], &v);
		invalid_gp += !safe_wrmsr(invalid_msrs[i], 0x5a5a5a5a5a5a5a5aUL);
	}

	u32 a0, b0, c0, d0, a, b, c, d;
	cpuid(0, 0, &a0, &b0, &c0, &d0);
	static const u32 leaf_base[] = {0, 0x40000000, 0x80000000, 0xc0000000, 0x8fffff00,
					0xffffff00};
	u64 leaves = 0;
	for (u32 r = 0; r < sizeof(leaf_base) / sizeof(leaf_base[0]); r++)
		for (u32 l = 0; l < 0x100; l++)
			for (u32 s = 0; s < 4; s++) {
				cpuid(leaf_base[r] + l, s, &a, &b, &c, &d);
				leaves++;
			}
	cpuid(0, 0, &a, &b, &c, &d);
	int cpuid_same = a == a0 && b == b0 && c == c0 && d == d0;
	int ok = invalid_gp == 2 * n_invalid && cpuid_same;
	printk("KVMBOX-TEST attackmsr read_ok=%lu read_gp=%lu write_ok=%lu write_gp=%lu "
	       "invalid=%u invalid_gp=%lu cpuid_leaves=%lu cpuid_stable=%d cycles=%lu\n",
	       read_ok, read_gp, write_ok, write_gp, 2 * n_invalid, invalid_gp, leaves, cpuid_same,
	       rdtsc() - t0);
	return !ok;
}

/* ------------------------------------------------------------ attackvq */

/* virtio.c: raw access to one device's queue 0 */
const char *vio_open(u16 type, u64 rings);
u16 vio_qsize(void);
u64 vio_alloc(u64 size);
void vio_desc(u16 i, u64 addr, u32 len, u16 flags, u16 next);
void vio_submit(u16 head, u16 advance);
void vio_notify(u16 value);
u16 vio_used_idx(void);
u32 vio_used_len(u16 i);
u8 vio_status(void);
void vio_close(void);
u16 vio_msix(u64 addr, u32 data, u16 vector);

#define VQ_NEXT 1
#define VQ_WRITE 2
#define VQ_INDIRECT 4
#define ST_NEEDS_RESET 0x40
#define BLK_HDR_IN 0 /* virtio-blk request type: read */

enum { VQ_IGNORED, VQ_REJECTED, VQ_BROKEN, VQ_SERVED, VQ_REFUSED, VQ_SURVIVED, VQ_STALLED };
static const char *const vq_outcome_name[] = {"ignored", "rejected", "broken", "served",
					      "refused", "survived", "stalled"};

/* What the device did within 1 s: marked itself broken (NEEDS_RESET), returned the chain
 * with nothing written (rejected), served it (len > 0), or nothing. */
static int vq_outcome(u16 used_before)
{
	u64 end = rdtsc() + tsc_hz();
	while (rdtsc() < end) {
		if (vio_status() & ST_NEEDS_RESET)
			return VQ_BROKEN;
		if (vio_used_idx() != used_before)
			return vio_used_len(used_before) ? VQ_SERVED : VQ_REJECTED;
		pause();
	}
	return VQ_IGNORED;
}

#define VIRTIO_TYPE_NET 1
#define VIRTIO_TYPE_BLK 2

/* The flag of a data buffer: the device writes rng and blk-read buffers, reads net frames. */
static u16 data_flag(u16 type)
{
	return type == VIRTIO_TYPE_NET ? 0 : VQ_WRITE;
}

/* A good request done: served with bytes written, or for a transmit queue (nothing to
 * write) returned at all. */
static int vq_done(u16 type, int outcome)
{
	return outcome == VQ_SERVED || (type == VIRTIO_TYPE_NET && outcome == VQ_REJECTED);
}

/* One good request on a freshly reset device: a 64-byte buffer (rng), a 512-byte read of
 * sector 0 (blk) or one 60-byte frame sent (net) must be served. */
static int vq_good_request(u16 type)
{
	if (vio_open(type, 0))
		return 0;
	u64 buf = vio_alloc(4096);
	u16 before = vio_used_idx();
	if (type == 2) {
		u32 *hdr = (u32 *)buf;
		hdr[0] = BLK_HDR_IN;
		hdr[1] = 0;
		*(u64 *)(buf + 8) = 0;
		*(u8 *)(buf + 1024) = 0xff;
		vio_desc(0, buf, 16, VQ_NEXT, 1);
		vio_desc(1, buf + 512, 512, VQ_NEXT | VQ_WRITE, 2);
		vio_desc(2, buf + 1024, 1, VQ_WRITE, 0);
	} else if (type == VIRTIO_TYPE_NET) {
		/* virtio_net_hdr_v1 (zeros), then a broadcast frame of ethertype 0x88b5 (local). */
		memset((void *)buf, 0, 12 + 60);
		memset((void *)(buf + 12), 0xff, 6);
		*(u16 *)(buf + 12 + 12) = 0xb588;
		vio_desc(0, buf, 12 + 60, 0, 0);
	} else {
		vio_desc(0, buf, 64, VQ_WRITE, 0);
	}
	vio_submit(0, 1);
	int served = vq_done(type, vq_outcome(before)) && (type != 2 || *(u8 *)(buf + 1024) == 0);
	vio_close();
	return served;
}

/* The attacks, each on a freshly set-up device; `buf` is 64 KiB of RAM for it. */
enum {
	VQA_LOOP,
	VQA_LONG_CHAIN,
	VQA_NESTED_INDIRECT,
	VQA_ADDR_OUTSIDE,
	VQA_ADDR_WRAP,
	VQA_HUGE_LEN,
	VQA_BAD_HEAD,
	VQA_BAD_NEXT,
	VQA_AVAIL_JUMP,
	VQA_RINGS_HIGH,
	VQA_RINGS_HOLE,
	VQA_NOTIFY_FLOOD,
	VQA_MSIX_BAD_VECTOR,
	VQA_MSIX_GARBAGE,
	VQA_MSIX_STORM,
	VQA_COUNT
};
static const char *const vqa_name[] = {"loop",	  "long_chain", "nested_indirect", "addr_outside",
				       "addr_wrap", "huge_len",   "bad_head",	     "bad_next",
				       "avail_jump", "rings_high", "rings_hole",	     "notify_flood",
				       "msix_bad_vector", "msix_garbage", "msix_storm"};

/* A chain starting at descriptor 0 whose data part is `d`; for blk a request header first. */
static void vq_chain(u16 type, u64 buf, u64 addr, u32 len, u16 flags, u16 next)
{
	if (type == 2) {
		*(u32 *)buf = BLK_HDR_IN;
		*(u64 *)(buf + 8) = 0;
		vio_desc(0, buf, 16, VQ_NEXT, 1);
		vio_desc(1, addr, len, flags | VQ_WRITE, next);
	} else {
		vio_desc(0, addr, len, flags | data_flag(type), next);
	}
}

/* `n` good requests, one at a time, each with an interrupt wanted (through whatever MSI-X
 * entry the attack set up); interrupts stay off in the guest, so they only pile up. */
static int vq_interrupt_flood(u16 type, u64 buf, u32 n)
{
	for (u32 i = 0; i < n; i++) {
		u16 before = vio_used_idx();
		vq_chain(type, buf, buf + 512, type == 2 ? 512 : 64, type == 2 ? VQ_NEXT : 0, 2);
		if (type == 2)
			vio_desc(2, buf + 1024, 1, VQ_WRITE, 0);
		vio_submit(0, 1);
		if (!vq_done(type, vq_outcome(before)))
			return VQ_STALLED;
	}
	return VQ_SURVIVED;
}

static int vq_attack(u16 type, u32 which)
{
	u64 rings = which == VQA_RINGS_HIGH ? 0xf00000000UL : which == VQA_RINGS_HOLE ? 0xd0000000UL
											: 0;
	if (vio_open(type, rings))
		return -1;
	u16 q = vio_qsize(), before = rings ? 0 : vio_used_idx(), d0 = type == 2 ? 1 : 0;
	u64 buf = vio_alloc(64 << 10);
	struct {
		u64 addr;
		u32 len;
		u16 flags, next;
	} *table = (void *)(buf + 4096);
	switch (which) {
	case VQA_LOOP: /* d0 -> d0+1 -> d0 -> ... */
		vq_chain(type, buf, buf + 512, 8, VQ_NEXT, d0 + 1);
		vio_desc(d0 + 1, buf + 1024, 8, VQ_NEXT | data_flag(type), d0);
		vio_submit(0, 1);
		break;
	case VQA_LONG_CHAIN: /* an indirect table of 3584 entries, more than any queue */
		for (u32 i = 0; i < 3584; i++) {
			table[i].addr = buf + 2048;
			table[i].len = 1;
			table[i].flags = data_flag(type) | (i + 1 < 3584 ? VQ_NEXT : 0);
			table[i].next = (u16)(i + 1);
		}
		vq_chain(type, buf, (u64)table, 3584 * 16, VQ_INDIRECT, 0);
		vio_desc(d0, (u64)table, 3584 * 16, VQ_INDIRECT, 0);
		vio_submit(0, 1);
		break;
	case VQA_NESTED_INDIRECT: /* an indirect table whose entry is itself indirect */
		table[0].addr = (u64)table;
		table[0].len = 16;
		table[0].flags = VQ_INDIRECT;
		table[0].next = 0;
		vq_chain(type, buf, (u64)table, 16, 0, 0);
		vio_desc(d0, (u64)table, 16, VQ_INDIRECT, 0);
		vio_submit(0, 1);
		break;
	case VQA_ADDR_OUTSIDE:
		vq_chain(type, buf, 0xffffffff00000000UL, 4096, 0, 0);
		vio_submit(0, 1);
		break;
	case VQA_ADDR_WRAP:
		vq_chain(type, buf, 0xfffffffffffff000UL, 0x2000, 0, 0);
		vio_submit(0, 1);
		break;
	case VQA_HUGE_LEN:
		vq_chain(type, buf, buf + 512, 0xffffffff, 0, 0);
		vio_submit(0, 1);
		break;
	case VQA_BAD_HEAD:
		vio_submit(0xffff, 1);
		break;
	case VQA_BAD_NEXT:
		vq_chain(type, buf, buf + 512, 8, VQ_NEXT, 0xfff0);
		vio_submit(0, 1);
		break;
	case VQA_AVAIL_JUMP: /* the index moves by more than the queue holds */
		vq_chain(type, buf, buf + 512, 8, 0, 0);
		vio_submit(0, (u16)(q + 7));
		break;
	case VQA_RINGS_HIGH:
	case VQA_RINGS_HOLE:
		vio_notify(0);
		break;
	case VQA_NOTIFY_FLOOD:
		for (u32 i = 0; i < 20000; i++)
			vio_notify(0);
		for (u32 i = 0; i < 2000; i++)
			vio_notify((u16)(0xffff - i));
		break;
	case VQA_MSIX_BAD_VECTOR: { /* a vector beyond the MSI-X table must read back 0xffff */
		u16 v = vio_msix(LAPIC_ADDR, 0x40, 0x7ff);
		vio_close();
		return v == 0xffff ? VQ_REFUSED : VQ_SERVED;
	}
	case VQA_MSIX_GARBAGE: { /* MSI-X to an address that is no interrupt controller */
		u16 v = vio_msix(0xdead0000UL, 0xffffffff, 0);
		int r = v == 0 ? vq_interrupt_flood(type, buf, 64) : VQ_STALLED;
		vio_close();
		return r;
	}
	case VQA_MSIX_STORM: { /* a real interrupt for each of 2000 requests, never taken */
		u16 v = vio_msix(LAPIC_ADDR, 0x40, 0);
		int r = v == 0 ? vq_interrupt_flood(type, buf, 2000) : VQ_STALLED;
		vio_close();
		return r;
	}
	}
	int r = which == VQA_NOTIFY_FLOOD || rings ? (vio_status() & ST_NEEDS_RESET ? VQ_BROKEN
										      : VQ_IGNORED)
						    : vq_outcome(before);
	vio_close();
	return r;
}

/*
 * attackvq[:TYPE] (4 = virtio-rng, the default; 2 = virtio-blk; 1 = virtio-net, its transmit
 * queue): each attack on a freshly set-up device, then a reset and one good request that must
 * be served. A bad request may be rejected (returned with nothing written), break the queue
 * (NEEDS_RESET) or be ignored; it may never be served (for net the host counts the frames).
 */
int test_attackvq(const char *arg)
{
	u16 type = (u16)parse_u64(arg, 4);
	if (!vq_good_request(type)) {
		printk("KVMBOX-TEST attackvq type=%u error=no-working-device\n", type);
		return 1;
	}
	char line[512];
	u32 n = 0, recovered = 0, served = 0;
	for (u32 a = 0; a < VQA_COUNT; a++) {
		int r = vq_attack(type, a);
		const char *o = r < 0 ? "setup-failed" : vq_outcome_name[r];
		served += r == VQ_SERVED || r < 0;
		for (const char *s = vqa_name[a]; *s && n < sizeof(line) - 40; s++)
			line[n++] = *s;
		line[n++] = '=';
		for (const char *s = o; *s && n < sizeof(line) - 40; s++)
			line[n++] = *s;
		line[n++] = ' ';
		recovered += vq_good_request(type);
	}
	line[n] = 0;
	printk("KVMBOX-TEST attackvq type=%u %sattacks=%u recovered=%u\n", type, line, VQA_COUNT,
	       recovered);
	return served || recovered != VQA_COUNT;
}
