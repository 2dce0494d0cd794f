/*
 * Scenarios. Port I/O and MMIO loops run in ring 0 (each access exits to the VMM anyway);
 * compute and memory loops run in ring 3, which this host executes natively.
 */
#include "tg.h"

/* Parses what valid_number() accepted; `dflt` for an empty string. */
u64 parse_u64(const char *s, u64 dflt)
{
	u64 v = 0;
	if (!*s)
		return dflt;
	if (s[0] == '0' && s[1] == 'x') {
		for (s += 2; *s; s++)
			v = v * 16 + (u64)(*s <= '9' ? *s - '0' : *s - 'a' + 10);
		return v;
	}
	for (; *s; s++)
		v = v * 10 + (u64)(*s - '0');
	return v;
}

/* ------------------------------------------------------------ hello */

int test_hello(const char *arg)
{
	(void)arg;
	printk("KVMBOX-TEST hello msg=hello-from-guest entry=%s cmdline=\"%s\"\n",
	       boot.entry == ENTRY_PVH ? "pvh" : boot.entry == ENTRY_MULTIBOOT ? "multiboot" : "linux64",
	       boot.cmdline);
	return 0;
}

/* ------------------------------------------------------------ fw_cfg, testdev */

#define FW_CFG_PORT 0x510
#define FW_CFG_DMA_HI 0x514
#define FW_CFG_DMA_LO 0x518

static void fw_cfg_read(u16 key, void *buf, u32 n)
{
	outw(FW_CFG_PORT, key);
	for (u32 i = 0; i < n; i++)
		((u8 *)buf)[i] = inb(FW_CFG_PORT + 1);
}

static struct {
	u32 control, length;
	u64 addr;
} __attribute__((aligned(16))) fw_dma;
static u8 fw_e820[32 * 20];

/* fw_cfg as firmware reads it: the signature, ID, CPU count and RAM size through the data port,
 * the file directory, and etc/e820 through the DMA interface. */
int test_fwcfg(const char *arg)
{
	(void)arg;
	char sig[5] = {0};
	u32 id = 0, count = 0, sel = 0, size = 0;
	u16 cpus = 0;
	u64 ram = 0;
	fw_cfg_read(0x00, sig, 4);
	fw_cfg_read(0x01, &id, 4);
	fw_cfg_read(0x05, &cpus, 2);
	fw_cfg_read(0x03, &ram, 8);
	fw_cfg_read(0x19, &count, 4);
	count = __builtin_bswap32(count);
	for (u32 i = 0; i < count && i < 64; i++) {
		u8 e[64];
		for (u32 k = 0; k < 64; k++)
			e[k] = inb(FW_CFG_PORT + 1);
		if (!memcmp(e + 8, "etc/e820", 9)) {
			size = __builtin_bswap32(*(u32 *)e);
			sel = __builtin_bswap16(*(u16 *)(e + 4));
		}
	}
	u32 status = 0xffffffff;
	u64 e820_ram = 0;
	if (sel && size <= sizeof(fw_e820)) {
		fw_dma.control = __builtin_bswap32((sel << 16) | 0x08 | 0x02); /* select + read */
		fw_dma.length = __builtin_bswap32(size);
		fw_dma.addr = __builtin_bswap64((u64)fw_e820);
		outl(FW_CFG_DMA_HI, __builtin_bswap32((u32)((u64)&fw_dma >> 32)));
		outl(FW_CFG_DMA_LO, __builtin_bswap32((u32)(u64)&fw_dma));
		__asm__ volatile("" ::: "memory"); /* the device wrote fw_dma and fw_e820 */
		status = __builtin_bswap32(fw_dma.control);
		for (u32 i = 0; i + 20 <= size; i += 20)
			if (*(u32 *)(fw_e820 + i + 16) == 1)
				e820_ram += *(u64 *)(fw_e820 + i + 8);
	}
	printk("KVMBOX-TEST fwcfg sig=%s id=%u cpus=%u ram=%lu files=%u e820_size=%u dma_status=%u "
	       "e820_ram=%lu\n",
	       sig, id, cpus, ram, count, size, status, e820_ram);
	return 0;
}

/* pc-testdev's scratch register (0xe0, byte window 0xe8): with --testdev it holds what is
 * written; without, nothing answers and reads return all ones. */
int test_testdev(const char *arg)
{
	(void)arg;
	outl(0xe0, 0x12345678);
	u32 word = inl(0xe0);
	u8 byte = inb(0xe9);
	/* pci-testdev (1b36:0005): on its port BAR, select test 2 (its header names it and its
	 * width), write its value at its offset 3 times, read the count back. */
	u32 bdf, count = 0, width = 0;
	char name[16] = "-";
	int pci = pci_find_id(0x00051b36, &bdf);
	if (pci) {
		u16 io = (u16)(pci_read(bdf, 0x14) & ~3u);
		outb(io, 2);
		width = inb(io + 1);
		u32 off = inl(io + 4), data = inl(io + 8);
		for (int i = 0; i < 3 && width == 4; i++)
			outl(io + off, data);
		count = inl(io + 12);
		for (u32 i = 0; i < sizeof(name) - 1; i++)
			if (!(name[i] = (char)inb(io + 0x10 + i)))
				break;
		name[sizeof(name) - 1] = 0;
	}
	printk("KVMBOX-TEST testdev ioport=0x%x byte=0x%x pci=%s pci_test=%s pci_width=%u "
	       "pci_count=%u\n",
	       word, byte, pci ? "found" : "absent", name, width, count);
	return 0;
}

/* What the multiboot information said (copied at entry): memory bounds, the memory map's RAM,
 * the first module's place, first bytes and command line. */
int test_multiboot(const char *arg)
{
	(void)arg;
	if (boot.entry != ENTRY_MULTIBOOT) {
		printk("KVMBOX-TEST multiboot result=fail reason=not-booted-through-multiboot\n");
		return 1;
	}
	u64 ram = 0;
	for (u32 i = 0; i < boot.nr_memmap; i++)
		if (boot.memmap[i].type == 1)
			ram += boot.memmap[i].size;
	printk("KVMBOX-TEST multiboot mem_lower=%u mem_upper=%u mmap_entries=%u mmap_ram=%lu mods=%u "
	       "mod_start=0x%lx mod_size=%lu mod_head=\"%s\" mod_cmdline=\"%s\"\n",
	       boot.mb_mem_lower, boot.mb_mem_upper, boot.nr_memmap, ram, boot.mb_mods,
	       boot.mb_mod_start, boot.mb_mod_size, boot.mb_mod_head, boot.mb_mod_cmdline);
	/* What a BIOS leaves for a multiboot kernel: the real-mode vectors of IRQ 0 and IRQ 8
	 * (segment:offset), the 8259 masks (read back from the PICs), whether the PIT's channel 0
	 * counts (two latched reads differ). */
	u32 ivt8, ivt70;
	__asm__ volatile("movl (%1), %0" : "=r"(ivt8) : "r"((u64)0x08 * 4));
	__asm__ volatile("movl (%1), %0" : "=r"(ivt70) : "r"((u64)0x70 * 4));
	u8 first_code8 = *(volatile u8 *)(u64)(((ivt8 >> 16) << 4) + (ivt8 & 0xffff));
	u16 c0 = 0, c1 = 0;
	int moving = 0;
	for (int i = 0; i < 100000 && !moving; i++) {
		outb(0x43, 0x00);
		c1 = inb(0x40);
		c1 |= (u16)inb(0x40) << 8;
		if (i == 0)
			c0 = c1;
		else
			moving = c1 != c0;
	}
	printk("KVMBOX-TEST bios ivt8=%x:%x ivt70=%x:%x code8=0x%x master_imr=0x%x "
	       "slave_imr=0x%x pit=%s\n",
	       ivt8 >> 16, ivt8 & 0xffff, ivt70 >> 16, ivt70 & 0xffff, first_code8, inb(0x21),
	       inb(0xa1), moving ? "counting" : "stopped");
	return 0;
}

/* ------------------------------------------------------------ cpuid */

static void sig_string(char *out, u32 a, u32 b, u32 c)
{
	u32 w[3] = {a, b, c};
	int n = 0;
	for (int i = 0; i < 12; i++) {
		char ch = (char)(w[i / 4] >> (8 * (i % 4)));
		if (!ch)
			break;
		out[n++] = (ch > 0x20 && ch < 0x7f) ? ch : '.';
	}
	if (!n)
		out[n++] = '-';
	out[n] = 0;
}

int test_cpuid(const char *arg)
{
	(void)arg;
	u32 a, b, c, d, max, maxext, fam, model, step, logical, leafb = 0;
	char vendor[16], hv[16];

	cpuid(0, 0, &max, &b, &c, &d);
	sig_string(vendor, b, d, c);
	cpuid(0x80000000, 0, &maxext, &b, &c, &d);
	cpuid(1, 0, &a, &b, &c, &d);
	fam = (a >> 8) & 0xf;
	model = (a >> 4) & 0xf;
	step = a & 0xf;
	if (fam == 0xf || fam == 0x6)
		model |= ((a >> 16) & 0xf) << 4;
	if (fam == 0xf)
		fam += (a >> 20) & 0xff;
	logical = (d & (1u << 28)) ? (b >> 16) & 0xff : 1;
	int hv_bit = (c >> 31) & 1;
	if (max >= 0xb) {
		for (u32 sub = 0; sub < 8; sub++) {
			u32 la, lb, lc, ld;
			cpuid(0xb, sub, &la, &lb, &lc, &ld);
			if (((lc >> 8) & 0xff) == 0)
				break;
			leafb = lb & 0xffff;
		}
	}
	u32 hvmax = 0;
	if (hv_bit) {
		cpuid(0x40000000, 0, &hvmax, &b, &c, &d);
		sig_string(hv, b, c, d);
	} else {
		memcpy(hv, "none", 5);
	}
	printk("KVMBOX-TEST cpuid vendor=%s max_leaf=0x%x max_ext=0x%x family=0x%x model=0x%x "
	       "stepping=%u logical=%u leafb_logical=%u hypervisor=%s hv_max=0x%x\n",
	       vendor, max, maxext, fam, model, step, logical, leafb, hv, hvmax);
	return 0;
}

/* ------------------------------------------------------------ acpi */

int test_acpi(const char *arg)
{
	(void)arg;
	if (!acpi.found) {
		printk("KVMBOX-TEST acpi found=no error=%s\n", acpi.error ? acpi.error : "unknown");
		return 1;
	}
	char list[MAX_TABLES * 5 + 1];
	u32 n = 0;
	for (u32 i = 0; i < acpi.nr_tables; i++) {
		if (i)
			list[n++] = ',';
		memcpy(list + n, acpi.sigs[i], 4);
		n += 4;
	}
	list[n] = 0;
	printk("KVMBOX-TEST acpi tables=%s cpus=%u ioapic=0x%lx checksums=%s rsdp=0x%lx rev=%u dsdt=%s",
	       n ? list : "-", acpi.nr_cpus, acpi.ioapic, acpi.checksums_ok ? "ok" : "bad",
	       acpi.rsdp_addr, acpi.rsdp_rev, acpi.dsdt ? "yes" : "no");
	if (acpi.error)
		printk(" error=%s", acpi.error);
	printk("\n");
	return !acpi.checksums_ok;
}

/* ------------------------------------------------------------ mem */

#define MAX_RANGES (MAX_MEMMAP * 2)
static struct {
	u64 start, end;
} ranges[MAX_RANGES];
static u32 nr_ranges;

static inline u64 pattern(u64 a)
{
	return (a * 0x9e3779b97f4a7c15UL) ^ (a >> 17) ^ 0x5a5a5a5a5a5a5a5aUL;
}

static void add_range(u64 s, u64 e)
{
	s = (s + 7) & ~7UL;
	e &= ~7UL;
	if (s < e && nr_ranges < MAX_RANGES) {
		ranges[nr_ranges].start = s;
		ranges[nr_ranges].end = e;
		nr_ranges++;
	}
}

static u64 mem_fill_verify(u64 unused)
{
	(void)unused;
	u64 errors = 0;
	for (u32 r = 0; r < nr_ranges; r++)
		for (u64 a = ranges[r].start; a < ranges[r].end; a += 8)
			*(volatile u64 *)a = pattern(a);
	for (u32 r = 0; r < nr_ranges; r++)
		for (u64 a = ranges[r].start; a < ranges[r].end; a += 8)
			if (*(volatile u64 *)a != pattern(a))
				errors++;
	return errors;
}

int test_mem(const char *arg)
{
	(void)arg;
	u64 ram = 0, tested = 0;
	u64 img_s = (u64)__image_start, img_e = ((u64)__image_end + 0xfff) & ~0xfffUL;
	nr_ranges = 0;
	for (u32 i = 0; i < boot.nr_memmap; i++) {
		if (boot.memmap[i].type != 1)
			continue;
		u64 s = boot.memmap[i].addr, e = s + boot.memmap[i].size;
		if (e < s)
			continue;
		ram += e - s;
		if (s < 0x100000)
			s = 0x100000;
		if (e > boot.mapped_top)
			e = boot.mapped_top;
		if (s >= e)
			continue;
		/* Subtract the guest image (code, data, page tables, stacks). */
		if (e <= img_s || s >= img_e) {
			add_range(s, e);
		} else {
			add_range(s, img_s);
			add_range(img_e, e);
		}
	}
	for (u32 r = 0; r < nr_ranges; r++)
		tested += ranges[r].end - ranges[r].start;
	u64 t0 = rdtsc();
	u64 errors = user(mem_fill_verify, 0);
	u64 t1 = rdtsc();
	printk("KVMBOX-TEST mem ram_mib=%lu tested_mib=%lu errors=%lu cycles=%lu\n", ram >> 20,
	       tested >> 20, errors, t1 - t0);
	return errors != 0 || tested == 0;
}

/* ------------------------------------------------------------ pio */

int test_pio(const char *arg)
{
	u64 n = parse_u64(arg, 1000), bad = 0;
	u64 t0 = rdtsc();
	for (u64 i = 0; i < n; i++)
		if (inb(UNCLAIMED_PORT) != 0xff)
			bad++;
	u64 t1 = rdtsc();
	printk("KVMBOX-TEST pio count=%lu bad=%lu cycles=%lu\n", n, bad, t1 - t0);
	return bad != 0;
}

static u64 pio_user_loop(u64 n)
{
	u64 bad = 0;
	for (u64 i = 0; i < n; i++)
		if (inb(UNCLAIMED_PORT) != 0xff)
			bad++;
	return bad;
}

/* The same loop from ring 3: native if IOPL=3 holds, else each IN traps to the #GP emulator. */
int test_pio3(const char *arg)
{
	u64 n = parse_u64(arg, 1000);
	u64 trapped0 = gp_io_emulated;
	u64 t0 = rdtsc();
	u64 bad = user(pio_user_loop, n);
	u64 t1 = rdtsc();
	u64 trapped = gp_io_emulated - trapped0;
	printk("KVMBOX-TEST pio3 count=%lu bad=%lu cycles=%lu mode=%s trapped=%lu\n", n, bad, t1 - t0,
	       trapped ? "trap" : "native", trapped);
	return bad != 0;
}

/* ------------------------------------------------------------ mmio */

int test_mmio(const char *arg)
{
	u64 n = parse_u64(arg, 1000), bad = 0;
	u32 v, first_bad = 0xffffffff;
	mmio_write32(MMIO_PROBE_ADDR, 0x12345678); /* must be dropped */
	u64 t0 = rdtsc();
	for (u64 i = 0; i < n; i++)
		if ((v = mmio_read32(MMIO_PROBE_ADDR)) != 0xffffffff && !bad++)
			first_bad = v;
	u64 t1 = rdtsc();
	printk("KVMBOX-TEST mmio count=%lu bad=%lu cycles=%lu", n, bad, t1 - t0);
	if (bad)
		printk(" first_bad=0x%x", first_bad);
	printk("\n");
	return bad != 0;
}

/* ------------------------------------------------------------ compute */

static u64 compute_loop(u64 n)
{
	u64 x = 0x9e3779b97f4a7c15UL, sum = 0;
	for (u64 i = 0; i < n; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		sum = ((sum << 5) | (sum >> 59)) ^ (x * 0x2545f4914f6cdd1dUL) ^ i;
	}
	return sum;
}

int test_compute(const char *arg)
{
	u64 n = parse_u64(arg, 100000000);
	u64 t0 = rdtsc();
	u64 r = user(compute_loop, n);
	u64 t1 = rdtsc();
	printk("KVMBOX-TEST compute iters=%lu result=0x%lx cycles=%lu\n", n, r, t1 - t0);
	return 0;
}

/* ------------------------------------------------------------ dirty */

/*
 * dirty:SPIN fills a 32 MiB buffer, then takes DIRTY_STEPS steps: each spins SPIN xorshift
 * rounds and rewrites one pseudo-randomly chosen page from the page after it. The result is
 * a checksum of the whole buffer, so a snapshot restore that lost any page the guest wrote
 * changes it; and between two snapshots the guest writes about one page per SPIN rounds,
 * which is what a Diff snapshot carries (a full one carries the whole buffer). It prints
 * "dirty: buffer filled" when the buffer is filled and the steps begin, and "dirty: N steps"
 * after every 100 steps, so a test can take its snapshots by the guest's progress.
 */
#define DIRTY_BUF 0x3000000UL
#define DIRTY_PAGES 8192UL
#define DIRTY_STEPS 1000UL
#define DIRTY_CHUNK 100UL

static u64 dirty_spin;

static u64 xorshift(u64 x)
{
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return x;
}

static u64 dirty_fill(u64 seed)
{
	volatile u64 *buf = (volatile u64 *)DIRTY_BUF;
	u64 x = seed;
	for (u64 i = 0; i < DIRTY_PAGES * 512; i++) {
		x = xorshift(x);
		buf[i] = x;
	}
	return x;
}

/* DIRTY_CHUNK steps from state x; returns the new state. */
static u64 dirty_steps(u64 x)
{
	volatile u64 *buf = (volatile u64 *)DIRTY_BUF;
	for (u64 s = 0; s < DIRTY_CHUNK; s++) {
		for (u64 j = 0; j < dirty_spin; j++)
			x = xorshift(x);
		u64 page = x % DIRTY_PAGES;
		volatile u64 *p = buf + page * 512;
		volatile u64 *q = buf + ((page + 1) % DIRTY_PAGES) * 512;
		for (u64 k = 0; k < 512; k++) {
			x = xorshift(x) ^ q[k];
			p[k] ^= x;
		}
	}
	return x;
}

static u64 dirty_sum(u64 x)
{
	volatile u64 *buf = (volatile u64 *)DIRTY_BUF;
	u64 sum = 0;
	for (u64 i = 0; i < DIRTY_PAGES * 512; i++)
		sum = ((sum << 5) | (sum >> 59)) ^ buf[i];
	return sum ^ x;
}

int test_dirty(const char *arg)
{
	dirty_spin = parse_u64(arg, 1000000);
	u64 s = DIRTY_BUF, e = DIRTY_BUF + DIRTY_PAGES * 4096, in_ram = 0;
	for (u32 i = 0; i < boot.nr_memmap; i++)
		if (boot.memmap[i].type == 1 && boot.memmap[i].addr <= s &&
		    boot.memmap[i].addr + boot.memmap[i].size >= e)
			in_ram = 1;
	if (!in_ram || e > boot.mapped_top || e <= (u64)__image_end)
		fail("dirty-needs-80M-of-RAM");
	u64 x = user(dirty_fill, 0x9e3779b97f4a7c15UL);
	printk("dirty: buffer filled\n");
	for (u64 done = DIRTY_CHUNK; done <= DIRTY_STEPS; done += DIRTY_CHUNK) {
		x = user(dirty_steps, x);
		printk("dirty: %lu steps\n", done);
	}
	u64 r = user(dirty_sum, x);
	printk("KVMBOX-TEST dirty iters=%lu result=0x%lx\n", dirty_spin, r);
	return 0;
}

/* ------------------------------------------------------------ ring3 */

static u64 ring3_nothing(u64 x)
{
	return x + 1;
}

/* N ring 0 -> ring 3 -> ring 0 round trips (IRETQ in, #UD out) of an empty function. */
int test_ring3(const char *arg)
{
	u64 n = parse_u64(arg, 100), bad = 0;
	u64 t0 = rdtsc();
	for (u64 i = 0; i < n; i++)
		if (user(ring3_nothing, i) != i + 1)
			bad++;
	u64 t1 = rdtsc();
	printk("KVMBOX-TEST ring3 count=%lu bad=%lu cycles=%lu\n", n, bad, t1 - t0);
	return bad != 0;
}

/* ------------------------------------------------------------ fault */

static u64 fault_user(u64 addr)
{
	return *(volatile u64 *)addr;
}

/*
 * Deliberately reads an unmapped address from ring 3 to check exception reporting: the
 * guest prints the #PF (vector 14, CR2 = the address) and ends with result=fail.
 */
int test_fault(const char *arg)
{
	(void)arg;
	u64 addr = boot.mapped_top + 0x1000;
	printk("KVMBOX-TEST fault addr=0x%lx\n", addr);
	user(fault_user, addr);
	printk("KVMBOX-TEST fault error=no-exception\n");
	return 1;
}
