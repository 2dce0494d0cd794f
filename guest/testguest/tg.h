/* kvmbox test guest: shared declarations. */
#ifndef TG_H
#define TG_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;

#define NULL ((void *)0)

/* Big buffers whose initial content does not matter: not stored in the ELF file, not zeroed. */
#define NOINIT __attribute__((section(".bss.noinit")))

/* Guest addresses this guest touches (see crates/arch/src/layout.rs). */
#define COM1_PORT 0x3f8
#define DEBUG_EXIT_PORT 0xf4
#define UNCLAIMED_PORT 0xed
#define MMIO_PROBE_ADDR 0xdf000000UL
#define LAPIC_ADDR 0xfee00000UL
#define IOAPIC_ADDR 0xfec00000UL /* used only when the MADT names no IOAPIC */
#define I8042_CMD_PORT 0x64
#define COM1_ISA_IRQ 4
#define VECTOR_COM1 0x24     /* IDT vector the IOAPIC sends COM1's interrupt to */
#define VECTOR_SPURIOUS 0xff /* LAPIC spurious-interrupt vector */
#define TRAMP_BASE 0x8000UL
#define HOLE_START 0xc0000000UL
#define HOLE_END 0x100000000UL

#define MAX_CPUS 64
#define MAX_MEMMAP 128
#define MAX_TABLES 32
#define CMDLINE_MAX 4096
#define PD_PAGES 64 /* 64 GiB of address space mapped with 2 MiB pages */

enum { ENTRY_PVH = 1, ENTRY_LINUX64 = 2, ENTRY_MULTIBOOT = 3 };
#define MB_MODULE_HEAD 64

/* One RAM-map entry, normalised from PVH or e820. */
struct memmap_entry {
	u64 addr;
	u64 size;
	u32 type;
};

/* What the boot protocol told us, copied out of low memory at entry. */
struct boot_info {
	u32 entry;
	u64 rsdp; /* 0 if the boot protocol gave none */
	u32 nr_memmap;
	struct memmap_entry memmap[MAX_MEMMAP];
	char cmdline[CMDLINE_MAX];
	u64 mapped_top; /* page tables map [0, mapped_top) */
	/* Multiboot only: memory bounds, module count, the first module's start, size, first
	 * bytes and command line (copied at entry: the mem scenario may overwrite modules). */
	u32 mb_mem_lower, mb_mem_upper, mb_mods;
	u64 mb_mod_start, mb_mod_size;
	char mb_mod_head[MB_MODULE_HEAD + 1];
	char mb_mod_cmdline[256];
};
extern struct boot_info boot;

/* Results of the ACPI walk (done in ring 3). */
struct acpi_info {
	int parsed;
	int found;
	int checksums_ok;
	int dsdt;
	u64 rsdp_addr;
	u32 rsdp_rev;
	u32 nr_tables;
	char sigs[MAX_TABLES][5];
	u32 nr_cpus;		/* enabled processor local APIC / x2APIC entries */
	u32 apic_ids[MAX_CPUS]; /* their APIC IDs, in MADT order */
	u64 ioapic;		/* first IOAPIC address, 0 if none */
	u32 ioapic_gsi_base;	/* its first GSI */
	u32 isa_gsi[16];	/* ISA IRQ -> GSI after MADT interrupt source overrides */
	u16 isa_flags[16];	/* MPS INTI flags of the override (0: ISA default, high/edge) */
	u32 pm1a_cnt;		/* FADT PM1a control block I/O port, 0 if none */
	int s5_slp_typ;		/* SLP_TYPa of the DSDT's \_S5_ package, -1 if absent */
	int s3_slp_typ;		/* SLP_TYPa of the DSDT's \_S3_ package, -1 if absent */
	u32 pm1a_evt;		/* FADT PM1a event block I/O port (status, then enable), 0 if none */
	u64 facs;		/* FACS address (FADT FIRMWARE_CTRL or X_FIRMWARE_CTRL), 0 if none */
	int reset_supported;	/* FADT flag RESET_REG_SUP with an I/O-space reset register */
	u32 reset_port;		/* FADT RESET_REG (I/O space) */
	u8 reset_value;		/* FADT RESET_VALUE */
	const char *error;	/* first problem found, or NULL */
};
extern struct acpi_info acpi;
void acpi_parse(void);

/* Frame built by isr_common (entry.S). */
struct trap_frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 vector, error;
	u64 rip, cs, rflags, rsp, ss;
};

/* entry.S */
u64 run_user(u64 (*fn)(u64), u64 arg, void *user_stack_top);
extern char ap_tramp_start[], ap_tramp_end[];
extern volatile u32 ap_next_index;
extern u64 pml4[512], pdpt[512], pds[PD_PAGES][512];
extern char __image_start[], __image_end[];

/* main.c */
u64 user(u64 (*fn)(u64), u64 arg);
void idt_set_gate(u32 vector, void (*handler)(void));
int valid_number(const char *s);
u64 parse_u64(const char *s, u64 dflt);
extern volatile u64 gp_io_emulated;
void fail(const char *reason) __attribute__((noreturn));
void exit_vm(u8 code) __attribute__((noreturn));

/* serial.c */
void serial_init(void);
void printk(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void printk_break_lock(void);
void *memset(void *d, int c, u64 n);
void *memcpy(void *d, const void *s, u64 n);
int memcmp(const void *a, const void *b, u64 n);
u64 strlen(const char *s);

/* tests.c */
int test_hello(const char *arg);
int test_multiboot(const char *arg);
int test_fwcfg(const char *arg);
int test_testdev(const char *arg);
int test_cpuid(const char *arg);
int test_acpi(const char *arg);
int test_mem(const char *arg);
int test_pio(const char *arg);
int test_pio3(const char *arg);
int test_mmio(const char *arg);
int test_compute(const char *arg);
int test_dirty(const char *arg);
int test_fault(const char *arg);
int test_ring3(const char *arg);

/* smp.c */
int test_smp(const char *arg);
void ap_main(u32 index);
u64 tsc_hz(void);
void delay(u64 cycles);

/* power.c: power-off and reset through ACPI, the i8042 and a triple fault */
const char *acpi_poweroff(void);
const char *i8042_reset(void);
const char *acpi_reset(void);
int test_poweroff(const char *arg);
int test_s3(const char *arg);
int test_reboot(const char *arg);
int test_triplefault(const char *arg);

/* irq.c: IOAPIC, LAPIC and PIC setup, COM1 interrupt */
const char *irq_setup(void (*handler)(void));
void irq_eoi(void);
void irq_com1_entry(void);     /* entry.S: saves registers, calls com1_interrupt() */
void irq_spurious_entry(void); /* entry.S: iretq */
void com1_interrupt(void);
int test_irq(const char *arg);
int test_irqlevel(const char *arg);
int test_irqpic(const char *arg);

/* shell.c */
int test_shell(const char *arg);

/* virtio.c: virtio 1.x PCI driver and its scenarios */
int test_blk(const char *arg);
int test_blkbench(const char *arg);
int test_net(const char *arg);
int test_netecho(const char *arg);
int test_netbench(const char *arg);
int test_netrx(const char *arg);
int test_udpecho(const char *arg);
int test_rng(const char *arg);
int test_vsock(const char *arg);
const char *vblk_open(u64 *sectors, const char **serial);
void *vblk_alloc(u64 bytes);
const char *vblk_write(u64 sector, void *buf, u64 bytes);
const char *vblk_read(u64 sector, void *buf, u64 bytes);
const char *vblk_flush(void);
u32 pci_read(u32 bdf, u32 off);
int pci_find_id(u32 want, u32 *bdf);
void vblk_close(void);

/* records.c: numbered, checksummed disk records (crash consistency and soak) */
int test_crashrec(const char *arg);
int test_soak(const char *arg);

/* attack.c: scenarios that attack the VMM (ports, MMIO holes, MSRs, CPUID, virtqueues) */
int attack_catch_gp(struct trap_frame *f);
int test_attackport(const char *arg);
int test_attackmmio(const char *arg);
int test_attackmsr(const char *arg);
int test_attackvq(const char *arg);
int test_attackportlow(const char *arg);
#define ATTACK_SCENARIOS                                                                          \
	{"attackport", test_attackport, ARG_NUMBER, 0},                                           \
		{"attackportlow", test_attackportlow, ARG_NUMBER, 0},                             \
		{"attackmmio", test_attackmmio, ARG_NONE, 1}, {"attackmsr", test_attackmsr, ARG_NONE, 0}, \
		{"attackvq", test_attackvq, ARG_NUMBER, 0},

static inline void outb(u16 port, u8 v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}
static inline void outw(u16 port, u16 v)
{
	__asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port));
}
static inline void outl(u16 port, u32 v)
{
	__asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}
static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline u16 inw(u16 port)
{
	u16 v;
	__asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline u32 inl(u16 port)
{
	u32 v;
	__asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}
static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}
static inline u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}
static inline void wrmsr(u32 msr, u64 v)
{
	__asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}
static inline void cli(void)
{
	__asm__ volatile("cli" : : : "memory");
}
static inline void sti(void)
{
	__asm__ volatile("sti" : : : "memory");
}
/* Enables interrupts and halts: the STI shadow means no interrupt slips in between. */
static inline void sti_hlt(void)
{
	__asm__ volatile("sti; hlt" : : : "memory");
}
static inline void pause(void)
{
	__asm__ volatile("pause");
}
static inline u32 mmio_read32(u64 addr)
{
	return *(volatile u32 *)addr;
}
static inline void mmio_write32(u64 addr, u32 v)
{
	*(volatile u32 *)addr = v;
}

#endif
