/*
 * kvmbox test guest: boot-info parsing, page tables, GDT/TSS/IDT, traps, ring-3
 * switching, command line and scenario dispatch. Everything here runs in ring 0.
 */
#include "tg.h"

#define SEL_KCODE 0x08
#define SEL_TSS 0x28

#define PVH_MAGIC 0x336ec578
#define PTE_P 0x1
#define PTE_RW 0x2
#define PTE_US 0x4
#define PTE_PWT 0x8
#define PTE_PCD 0x10
#define PTE_PS 0x80
#define GIB (1UL << 30)
#define MIB2 (2UL << 20)
#define EARLY_MAPPED GIB /* both entry paths map at least the first 1 GiB */

struct boot_info boot;
volatile u64 gp_io_emulated;

/* 64-bit TSS. */
struct tss {
	u32 rsvd0;
	u64 rsp[3];
	u64 rsvd1;
	u64 ist[7];
	u64 rsvd2;
	u16 rsvd3;
	u16 iomap_base;
} __attribute__((packed));

struct idt_gate {
	u16 off_lo;
	u16 sel;
	u8 ist;
	u8 type_attr;
	u16 off_mid;
	u32 off_hi;
	u32 zero;
} __attribute__((packed));

struct desc_ptr {
	u16 limit;
	u64 base;
} __attribute__((packed));

extern u64 gdt[];
extern struct desc_ptr idt_ptr;
extern const u64 isr_table[32];

static struct tss tss __attribute__((aligned(16)));
static struct idt_gate idt[256] __attribute__((aligned(16)));
static u8 trap_stack[16384] NOINIT __attribute__((aligned(16)));
static u8 ist_stack[8192] NOINIT __attribute__((aligned(16)));
static u8 user_stack[65536] NOINIT __attribute__((aligned(16)));

void kmain(u32 entry, u64 info);
void trap(struct trap_frame *f);

void exit_vm(u8 code)
{
	outb(DEBUG_EXIT_PORT, code);
	for (;;)
		__asm__ volatile("cli; hlt");
}

void fail(const char *reason)
{
	printk("KVMBOX-TEST done result=fail reason=%s\n", reason);
	exit_vm(1);
}

/* ------------------------------------------------------------ descriptors */

static void setup_cpu_tables(void)
{
	u64 base = (u64)&tss;
	u64 limit = sizeof(tss) - 1;

	memset(&tss, 0, sizeof(tss));
	tss.rsp[0] = (u64)(trap_stack + sizeof(trap_stack));
	tss.ist[0] = (u64)(ist_stack + sizeof(ist_stack));
	tss.iomap_base = sizeof(tss); /* no I/O bitmap */
	gdt[SEL_TSS / 8] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89UL << 40) |
			   (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
	gdt[SEL_TSS / 8 + 1] = base >> 32;
	__asm__ volatile("ltr %w0" : : "r"(SEL_TSS));

	for (int v = 0; v < 32; v++) {
		u64 h = isr_table[v];
		idt[v].off_lo = (u16)h;
		idt[v].sel = SEL_KCODE;
		/* NMI, #DF and #MC run on their own stack. */
		idt[v].ist = (v == 2 || v == 8 || v == 18) ? 1 : 0;
		idt[v].type_attr = 0x8e; /* present, DPL 0, 64-bit interrupt gate */
		idt[v].off_mid = (u16)(h >> 16);
		idt[v].off_hi = (u32)(h >> 32);
		idt[v].zero = 0;
	}
	/* Vectors 32-255 stay not-present (an unexpected interrupt is a #NP report) until
	 * idt_set_gate() installs a handler. */
	idt_ptr.limit = sizeof(idt) - 1;
	idt_ptr.base = (u64)idt;
	__asm__ volatile("lidt %0" : : "m"(idt_ptr));
}

/* Installs a ring-0 interrupt gate for an external-interrupt vector (32-255). */
void idt_set_gate(u32 vector, void (*handler)(void))
{
	u64 h = (u64)handler;
	if (vector < 32 || vector > 255)
		return;
	idt[vector].off_lo = (u16)h;
	idt[vector].sel = SEL_KCODE;
	idt[vector].ist = 0;
	idt[vector].off_mid = (u16)(h >> 16);
	idt[vector].off_hi = (u32)(h >> 32);
	idt[vector].zero = 0;
	idt[vector].type_attr = 0x8e; /* present, DPL 0, 64-bit interrupt gate */
}

/* ------------------------------------------------------------ boot info */

/* Copy the NUL-terminated string at paddr into dst (at most max bytes with the NUL). */
static void copy_str(char *dst, u64 max, u64 paddr)
{
	if (!paddr || paddr >= EARLY_MAPPED - max)
		return;
	const char *s = (const char *)paddr;
	u64 i = 0;
	for (; i < max - 1 && s[i]; i++)
		dst[i] = s[i];
	dst[i] = 0;
}

static void copy_cmdline(u64 paddr)
{
	copy_str(boot.cmdline, CMDLINE_MAX, paddr);
}

/* Multiboot information: flags @0, mem_lower @4, mem_upper @8, cmdline @16, mods_count @20,
 * mods_addr @24, mmap_length @44, mmap_addr @48 (entries: size @0, then base, length, type). */
static const char *read_multiboot_info(u64 info)
{
	const u32 *mbi = (const u32 *)info;
	u32 flags = mbi[0];
	if (!(flags & (1 << 6)))
		return "multiboot-without-mmap";
	if (flags & 1) {
		boot.mb_mem_lower = mbi[1];
		boot.mb_mem_upper = mbi[2];
	}
	if (flags & (1 << 2))
		copy_cmdline(mbi[4]);
	u64 mm = mbi[12], end = mm + mbi[11];
	if (!mm || end >= EARLY_MAPPED)
		return "multiboot-bad-mmap";
	u32 n = 0;
	while (mm + 24 <= end && n < MAX_MEMMAP) {
		const u8 *e = (const u8 *)mm;
		boot.memmap[n].addr = *(const u64 *)(e + 4);
		boot.memmap[n].size = *(const u64 *)(e + 12);
		boot.memmap[n].type = *(const u32 *)(e + 20);
		n++;
		mm += 4 + *(const u32 *)e;
	}
	boot.nr_memmap = n;
	if ((flags & (1 << 3)) && mbi[5]) {
		const u32 *mod = (const u32 *)(u64)mbi[6];
		if ((u64)mod >= EARLY_MAPPED - 16 || mod[1] < mod[0] || mod[1] >= EARLY_MAPPED)
			return "multiboot-bad-module";
		boot.mb_mods = mbi[5];
		boot.mb_mod_start = mod[0];
		boot.mb_mod_size = mod[1] - mod[0];
		const char *data = (const char *)(u64)mod[0];
		u64 k = 0;
		for (; k < MB_MODULE_HEAD && k < boot.mb_mod_size; k++)
			boot.mb_mod_head[k] = (data[k] > 0x20 && data[k] < 0x7f) ? data[k] : '.';
		boot.mb_mod_head[k] = 0;
		copy_str(boot.mb_mod_cmdline, sizeof(boot.mb_mod_cmdline), mod[2]);
	}
	return NULL;
}

static const char *read_boot_info(u32 entry, u64 info)
{
	boot.entry = entry;
	if (!info || info >= EARLY_MAPPED - 0x1000)
		return "no-boot-info";
	if (entry == ENTRY_PVH) {
		const u32 *si = (const u32 *)info;
		if (si[0] != PVH_MAGIC)
			return "bad-pvh-magic";
		u32 version = si[1];
		/* magic, version, flags, nr_modules, modlist_paddr, cmdline_paddr @24,
		 * rsdp_paddr @32, memmap_paddr @40, memmap_entries @48 */
		copy_cmdline(*(const u64 *)(info + 24));
		boot.rsdp = *(const u64 *)(info + 32);
		if (version < 1)
			return "pvh-without-memmap";
		u64 mm = *(const u64 *)(info + 40);
		u32 n = *(const u32 *)(info + 48);
		if (n > MAX_MEMMAP)
			n = MAX_MEMMAP;
		if (!mm || mm >= EARLY_MAPPED - n * 24UL)
			return "pvh-bad-memmap";
		for (u32 i = 0; i < n; i++) {
			const u8 *e = (const u8 *)(mm + i * 24UL);
			boot.memmap[i].addr = *(const u64 *)e;
			boot.memmap[i].size = *(const u64 *)(e + 8);
			boot.memmap[i].type = *(const u32 *)(e + 16);
		}
		boot.nr_memmap = n;
	} else if (entry == ENTRY_MULTIBOOT) {
		const char *err = read_multiboot_info(info);
		if (err)
			return err;
	} else {
		const u8 *bp = (const u8 *)info;
		u64 cmd = *(const u32 *)(bp + 0x228) | ((u64) * (const u32 *)(bp + 0xc8) << 32);
		copy_cmdline(cmd);
		boot.rsdp = *(const u64 *)(bp + 0x70);
		u32 n = bp[0x1e8];
		if (n > MAX_MEMMAP)
			n = MAX_MEMMAP;
		for (u32 i = 0; i < n; i++) {
			const u8 *e = bp + 0x2d0 + i * 20UL;
			boot.memmap[i].addr = *(const u64 *)e;
			boot.memmap[i].size = *(const u64 *)(e + 8);
			boot.memmap[i].type = *(const u32 *)(e + 16);
		}
		boot.nr_memmap = n;
	}
	if (!boot.nr_memmap)
		return "empty-memmap";
	return NULL;
}

/* ------------------------------------------------------------ page tables */

static u64 pde_flags(u64 addr)
{
	u64 flags = PTE_P | PTE_RW | PTE_US | PTE_PS;
	if (addr >= HOLE_START && addr < HOLE_END)
		flags |= PTE_PCD | PTE_PWT;
	return flags;
}

static void map_gib(u64 g)
{
	u64 a = g * GIB;
	for (u64 i = 0; i < 512; i++, a += MIB2)
		pds[g][i] = a | pde_flags(a);
	pdpt[g] = (u64)pds[g] | PTE_P | PTE_RW | PTE_US;
}

/* Ring 3: the page tables live in the (user-accessible) first GiB. */
static u64 map_all(u64 gibs)
{
	for (u64 g = 0; g < gibs; g++)
		map_gib(g);
	return 0;
}

/*
 * Identity map [0, max(4 GiB, top of RAM)) with user-accessible 2 MiB pages; the
 * 3-4 GiB MMIO hole (MMIO probe page, IOAPIC, LAPIC) uncached. Ring 0 is emulated here,
 * so it writes no page table: the image's static tables (entry.S: pml4, pdpt, boot_pd) map
 * the first GiB well enough to enter ring 3, and ring 3 writes every page directory,
 * including the first GiB's, which replaces boot_pd.
 */
static void setup_paging(void)
{
	u64 top = HOLE_END;
	for (u32 i = 0; i < boot.nr_memmap; i++) {
		/* RAM and ACPI (reclaimable / NVS) only: far-away reserved ranges such as
		 * QEMU's HyperTransport hole at 1 TiB need no mapping. */
		u32 t = boot.memmap[i].type;
		if (t != 1 && t != 3 && t != 4)
			continue;
		u64 end = boot.memmap[i].addr + boot.memmap[i].size;
		if (end > top && end > boot.memmap[i].addr)
			top = end;
	}
	top = (top + GIB - 1) & ~(GIB - 1);
	if (top > PD_PAGES * GIB)
		top = PD_PAGES * GIB;
	u64 cr4 = 0x20; /* PAE only: no SMEP/SMAP (ring 0 reads ring-3 pages), no PGE */
	__asm__ volatile("mov %0, %%cr4" : : "r"(cr4));
	__asm__ volatile("mov %0, %%cr3" : : "r"((u64)pml4) : "memory");
	user(map_all, top / GIB);
	__asm__ volatile("mov %0, %%cr3" : : "r"((u64)pml4) : "memory");
	boot.mapped_top = top;
}

/* ------------------------------------------------------------ traps */

u64 user(u64 (*fn)(u64), u64 arg)
{
	return run_user(fn, arg, user_stack + sizeof(user_stack));
}

/* Ring 3 executed IN/OUT and got #GP (the host drops IOPL): do it here and skip it. */
static int emulate_user_io(struct trap_frame *f)
{
	if (f->rip < (u64)__image_start || f->rip + 4 > (u64)__image_end)
		return 0;
	const u8 *ip = (const u8 *)f->rip;
	u32 len = 0, opsize = 4, size, port;
	if (ip[0] == 0x66) {
		opsize = 2;
		len = 1;
	}
	u8 op = ip[len++];
	int in;
	switch (op) {
	case 0xe4:
	case 0xe5:
	case 0xe6:
	case 0xe7:
		port = ip[len++];
		break;
	case 0xec:
	case 0xed:
	case 0xee:
	case 0xef:
		port = (u16)f->rdx;
		break;
	default:
		return 0;
	}
	size = (op & 1) ? opsize : 1;
	in = !(op & 2);
	if (in) {
		u64 v = size == 1 ? inb((u16)port) : size == 2 ? inw((u16)port) : inl((u16)port);
		if (size == 1)
			f->rax = (f->rax & ~0xffUL) | v;
		else if (size == 2)
			f->rax = (f->rax & ~0xffffUL) | v;
		else
			f->rax = v;
	} else if (size == 1) {
		outb((u16)port, (u8)f->rax);
	} else if (size == 2) {
		outw((u16)port, (u16)f->rax);
	} else {
		outl((u16)port, (u32)f->rax);
	}
	f->rip += len;
	gp_io_emulated++;
	return 1;
}

void trap(struct trap_frame *f)
{
	static volatile u32 fatal;
	int from_user = (f->cs & 3) == 3;

	/* The end of run_user() (#UD at user_exit) never gets here: isr6 in entry.S handles it. */
	if (from_user && f->vector == 13 && emulate_user_io(f))
		return;
	if (!from_user && attack_catch_gp(f))
		return;

	if (__atomic_exchange_n(&fatal, 1, __ATOMIC_SEQ_CST))
		exit_vm(1);
	u64 cr2;
	__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
	printk_break_lock();
	printk("KVMBOX-TEST exception vector=%lu error=0x%lx rip=0x%lx cr2=0x%lx cs=0x%lx rsp=0x%lx\n",
	       f->vector, f->error, f->rip, cr2, f->cs, f->rsp);
	printk("KVMBOX-TEST done result=fail reason=exception-%lu\n", f->vector);
	exit_vm(1);
}

/* ------------------------------------------------------------ command line */

/* What a scenario accepts after ':'. */
enum { ARG_NONE, ARG_NUMBER, ARG_REBOOT_METHOD, ARG_RO, ARG_S3_WAKE };

struct scenario {
	const char *name;
	int (*run)(const char *arg);
	int takes_arg;
	int needs_acpi;
};

static const struct scenario scenarios[] = {
	{"hello", test_hello, ARG_NONE, 0},
	{"multiboot", test_multiboot, ARG_NONE, 0},
	{"fwcfg", test_fwcfg, ARG_NONE, 0},
	{"testdev", test_testdev, ARG_NONE, 0},
	{"cpuid", test_cpuid, ARG_NONE, 0},
	{"acpi", test_acpi, ARG_NONE, 1},
	{"mem", test_mem, ARG_NONE, 0},
	{"pio", test_pio, ARG_NUMBER, 0},
	{"pio3", test_pio3, ARG_NUMBER, 0},
	{"mmio", test_mmio, ARG_NUMBER, 0},
	{"compute", test_compute, ARG_NUMBER, 0},
	{"dirty", test_dirty, ARG_NUMBER, 0},
	{"smp", test_smp, ARG_NONE, 1},
	{"fault", test_fault, ARG_NONE, 0},
	{"ring3", test_ring3, ARG_NUMBER, 0},
	{"shell", test_shell, ARG_NONE, 1},
	{"poweroff", test_poweroff, ARG_NONE, 1},
	{"s3", test_s3, ARG_S3_WAKE, 1},
	{"reboot", test_reboot, ARG_REBOOT_METHOD, 1},
	{"triplefault", test_triplefault, ARG_NONE, 0},
	{"irq", test_irq, ARG_NONE, 1},
	{"irqlevel", test_irqlevel, ARG_NONE, 1},
	{"irqpic", test_irqpic, ARG_NONE, 1},
	{"blk", test_blk, ARG_RO, 0},
	{"blkbench", test_blkbench, ARG_NUMBER, 0},
	{"net", test_net, ARG_NUMBER, 0},
	{"netecho", test_netecho, ARG_NUMBER, 0},
	{"netbench", test_netbench, ARG_NUMBER, 0},
	{"netrx", test_netrx, ARG_NUMBER, 0},
	{"udpecho", test_udpecho, ARG_NUMBER, 0},
	{"rng", test_rng, ARG_NONE, 0},
	{"vsock", test_vsock, ARG_NONE, 0},
	ATTACK_SCENARIOS
	{"crashrec", test_crashrec, ARG_NUMBER, 0},
	{"soak", test_soak, ARG_NUMBER, 0},
};
#define NR_SCENARIOS (sizeof(scenarios) / sizeof(scenarios[0]))

#define MAX_TESTS 32
static const struct scenario *plan[MAX_TESTS];
static char plan_args[MAX_TESTS][32];
static char plan_names[MAX_TESTS][32];
static u32 nr_plan;

static const char *find_tests(void)
{
	const char *s = boot.cmdline;
	while (*s) {
		while (*s == ' ')
			s++;
		if (!memcmp(s, "tests=", 6))
			return s + 6;
		while (*s && *s != ' ')
			s++;
	}
	return "hello";
}

/* A decimal number or 0x-prefixed lower-case hex, as scenario arguments are written. */
int valid_number(const char *s)
{
	if (s[0] == '0' && s[1] == 'x') {
		if (!s[2])
			return 0;
		for (s += 2; *s; s++)
			if (!((*s >= '0' && *s <= '9') || (*s >= 'a' && *s <= 'f')))
				return 0;
		return 1;
	}
	if (!*s)
		return 0;
	for (; *s; s++)
		if (*s < '0' || *s > '9')
			return 0;
	return 1;
}

static void parse_plan(void)
{
	const char *s = find_tests();
	while (*s && *s != ' ') {
		char name[32], arg[32];
		u32 n = 0, a = 0;
		while (*s && *s != ' ' && *s != ',' && *s != ':') {
			if (n < sizeof(name) - 1)
				name[n++] = *s;
			s++;
		}
		name[n] = 0;
		if (*s == ':') {
			s++;
			while (*s && *s != ' ' && *s != ',') {
				if (a < sizeof(arg) - 1)
					arg[a++] = *s;
				s++;
			}
		}
		arg[a] = 0;
		if (*s == ',')
			s++;
		if (!n)
			continue;
		const struct scenario *sc = NULL;
		for (u32 i = 0; i < NR_SCENARIOS && !sc; i++)
			if (scenarios[i].name[0] == name[0] && !memcmp(scenarios[i].name, name, n + 1))
				sc = &scenarios[i];
		if (!sc) {
			printk("KVMBOX-TEST done result=fail reason=unknown-test:%s\n", name);
			exit_vm(1);
		}
		int arg_ok = sc->takes_arg == ARG_NUMBER	     ? valid_number(arg)
			     : sc->takes_arg == ARG_REBOOT_METHOD ? !memcmp(arg, "i8042", 6) ||
									!memcmp(arg, "acpi", 5)
			     : sc->takes_arg == ARG_RO		  ? !memcmp(arg, "ro", 3)
			     : sc->takes_arg == ARG_S3_WAKE	  ? !memcmp(arg, "button", 7)
								  : 0;
		if (a && !arg_ok) {
			printk("KVMBOX-TEST done result=fail reason=bad-argument:%s:%s\n", name, arg);
			exit_vm(1);
		}
		if (nr_plan == MAX_TESTS)
			fail("too-many-tests");
		plan[nr_plan] = sc;
		memcpy(plan_args[nr_plan], arg, a + 1);
		memcpy(plan_names[nr_plan], name, n + 1);
		nr_plan++;
	}
	if (!nr_plan) {
		plan[0] = &scenarios[0];
		plan_args[0][0] = 0;
		memcpy(plan_names[0], "hello", 6);
		nr_plan = 1;
	}
}

/* ------------------------------------------------------------ main */

void kmain(u32 entry, u64 info)
{
	serial_init();
	setup_cpu_tables();
	const char *err = read_boot_info(entry, info);
	if (err)
		fail(err);
	setup_paging();
	parse_plan();

	/* ACPI lives in memory the mem scenario may not touch, but read it first anyway. */
	for (u32 i = 0; i < nr_plan; i++)
		if (plan[i]->needs_acpi && !acpi.parsed)
			acpi_parse();

	char reason[64] = {0};
	for (u32 i = 0; i < nr_plan; i++) {
		if (plan[i]->run(plan_args[i]) && !reason[0]) {
			u64 n = strlen(plan_names[i]);
			memcpy(reason, plan_names[i], n);
			memcpy(reason + n, "-failed", 8);
		}
	}
	if (reason[0])
		fail(reason);
	printk("KVMBOX-TEST done result=ok\n");
	exit_vm(0);
}
