/*
 * Interrupts: COM1's ISA IRQ through the IOAPIC to the bootstrap processor's local APIC
 * (the 8259 pair masked), and the `irq` scenario. Everything here runs in ring 0; the
 * interrupt is only ever taken in ring 0 (ring 3 runs with IF=0).
 */
#include "tg.h"

#define MSR_APIC_BASE 0x1b
#define APIC_BASE_EXTD (1UL << 10)
#define APIC_BASE_EN (1UL << 11)
#define APIC_TPR 0x80
#define APIC_EOI 0xb0
#define APIC_SVR 0xf0
#define APIC_SVR_ENABLE 0x100
#define X2APIC_MSR(reg) (0x800 + ((reg) >> 4))

#define IOAPIC_REGSEL 0x00
#define IOAPIC_WIN 0x10
#define IOAPIC_VER 0x01
#define IOAPIC_REDIR(pin) (0x10 + 2 * (pin))
#define REDIR_MASKED (1u << 16)
#define REDIR_LEVEL (1u << 15)
#define REDIR_ACTIVE_LOW (1u << 13)

#define PIC1_DATA 0x21
#define PIC2_DATA 0xa1

#define UART_IIR 2
#define UART_IER 1
#define UART_MCR 4
#define IER_THRE 0x02
#define MCR_DTR_RTS_OUT2 0x0b
#define IIR_ID_MASK 0x0f
#define IIR_THRE 0x02 /* bits 0-3 = 0010: transmitter holding register empty */

static int x2apic;
static u64 lapic_base;
static void (*com1_handler)(void);
static u32 com1_gsi;
static u64 com1_ioapic;
static u32 com1_pin;

static void lapic_write(u32 reg, u32 v)
{
	if (x2apic)
		wrmsr(X2APIC_MSR(reg), v);
	else
		mmio_write32(lapic_base + reg, v);
}

static void ioapic_write(u64 base, u32 reg, u32 v)
{
	mmio_write32(base + IOAPIC_REGSEL, reg);
	mmio_write32(base + IOAPIC_WIN, v);
}

static u32 ioapic_read(u64 base, u32 reg)
{
	mmio_write32(base + IOAPIC_REGSEL, reg);
	return mmio_read32(base + IOAPIC_WIN);
}

static u32 bsp_apic_id(void)
{
	u32 a, b, c, d, max;
	cpuid(0, 0, &max, &b, &c, &d);
	if (max >= 0xb) {
		cpuid(0xb, 0, &a, &b, &c, &d);
		if (b)
			return d;
	}
	cpuid(1, 0, &a, &b, &c, &d);
	return b >> 24;
}

void irq_eoi(void)
{
	lapic_write(APIC_EOI, 0);
}

/* Called by irq_com1_entry (entry.S) with interrupts off. */
void com1_interrupt(void)
{
	if (com1_handler)
		com1_handler();
	irq_eoi();
}

/*
 * Routes COM1 (ISA IRQ 4, or the GSI a MADT override names) to VECTOR_COM1 on this CPU
 * and calls `handler` on each interrupt (with interrupts off; EOI is sent after it). Masks
 * the 8259s and enables the local APIC. Does not touch the UART or RFLAGS.IF. Returns NULL
 * or what is wrong. Needs acpi_parse() first.
 */
const char *irq_setup(void (*handler)(void))
{
	u64 apic_msr = rdmsr(MSR_APIC_BASE);
	x2apic = (apic_msr & APIC_BASE_EXTD) != 0;
	lapic_base = apic_msr & 0xffffff000UL;
	if (!(apic_msr & APIC_BASE_EN)) {
		wrmsr(MSR_APIC_BASE, apic_msr | APIC_BASE_EN);
		if (!(rdmsr(MSR_APIC_BASE) & APIC_BASE_EN))
			return "apic-disabled";
	}
	if (!x2apic && lapic_base + 0x1000 > boot.mapped_top)
		return "apic-unmapped";

	u64 ioapic = acpi.ioapic ? acpi.ioapic : IOAPIC_ADDR;
	u32 gsi_base = acpi.ioapic ? acpi.ioapic_gsi_base : 0;
	if (ioapic + 0x1000 > boot.mapped_top)
		return "ioapic-unmapped";
	u32 gsi = acpi.parsed ? acpi.isa_gsi[COM1_ISA_IRQ] : COM1_ISA_IRQ;
	u16 flags = acpi.parsed ? acpi.isa_flags[COM1_ISA_IRQ] : 0;
	u32 max_pin = (ioapic_read(ioapic, IOAPIC_VER) >> 16) & 0xff;
	if (gsi < gsi_base || gsi - gsi_base > max_pin)
		return "com1-gsi-not-on-ioapic";
	u32 pin = gsi - gsi_base;
	com1_gsi = gsi;
	com1_ioapic = ioapic;
	com1_pin = pin;

	/* The 8259s would also see IRQ 4 (and deliver it through LINT0 as ExtINT). */
	outb(PIC1_DATA, 0xff);
	outb(PIC2_DATA, 0xff);

	idt_set_gate(VECTOR_COM1, irq_com1_entry);
	idt_set_gate(VECTOR_SPURIOUS, irq_spurious_entry);
	lapic_write(APIC_TPR, 0);
	lapic_write(APIC_SVR, APIC_SVR_ENABLE | VECTOR_SPURIOUS);

	/* MPS INTI flags: polarity bits 0-1 (3 = active low), trigger bits 2-3 (3 = level);
	 * 0 means the ISA default, active high and edge. */
	u32 lo = VECTOR_COM1; /* fixed delivery, physical destination */
	if ((flags & 3) == 3)
		lo |= REDIR_ACTIVE_LOW;
	if (((flags >> 2) & 3) == 3)
		lo |= REDIR_LEVEL;
	com1_handler = handler;
	ioapic_write(ioapic, IOAPIC_REDIR(pin), REDIR_MASKED);
	ioapic_write(ioapic, IOAPIC_REDIR(pin) + 1, bsp_apic_id() << 24);
	ioapic_write(ioapic, IOAPIC_REDIR(pin), lo);
	if (ioapic_read(ioapic, IOAPIC_REDIR(pin)) != lo)
		return "ioapic-redirection-readback";
	return NULL;
}

/* ------------------------------------------------------------ irq scenario */

static volatile u32 irq_count;
static volatile u32 irq_first_iir = 0xffffffff;

static void count_thre(void)
{
	u8 iir = inb(COM1_PORT + UART_IIR); /* identifies (and so acknowledges) THRE */
	if (irq_first_iir == 0xffffffff)
		irq_first_iir = iir;
	irq_count++;
}

/*
 * The serial interrupt path without a user: enable the transmitter-empty interrupt, which
 * an idle 16550 raises at once, and count it. Passes with at least one interrupt within 1 s.
 */
int test_irq(const char *arg)
{
	(void)arg;
	const char *err = irq_setup(count_thre);
	if (err) {
		printk("KVMBOX-TEST irq error=%s\n", err);
		return 1;
	}
	u64 hz = tsc_hz();
	irq_count = 0;
	outb(COM1_PORT + UART_MCR, MCR_DTR_RTS_OUT2);
	outb(COM1_PORT + UART_IER, IER_THRE);
	sti();
	u64 t0 = rdtsc();
	while (!irq_count && rdtsc() - t0 < hz)
		pause();
	cli();
	u64 t1 = rdtsc();
	outb(COM1_PORT + UART_IER, 0);
	u32 n = irq_count;
	printk("KVMBOX-TEST irq vector=0x%x count=%u gsi=%u iir=0x%x cycles=%lu\n", VECTOR_COM1, n,
	       com1_gsi, irq_first_iir & 0xff, t1 - t0);
	return n == 0 || (irq_first_iir & IIR_ID_MASK) != IIR_THRE;
}

/* ------------------------------------------------------------ irqlevel and irqpic scenarios */

#define REDIR_REMOTE_IRR (1u << 14)
#define APIC_LVT0 0x350
#define APIC_MODE_EXTINT (7u << 8)
#define PIC1_CMD 0x20
#define PIC2_CMD 0xa0
#define PIC_EOI 0x20
#define IRQ_ROUNDS 8

static void count_thre_pic(void)
{
	count_thre();
	outb(PIC1_CMD, PIC_EOI);
}

/*
 * Re-arm COM1's transmitter-empty interrupt up to IRQ_ROUNDS times, each only after the
 * previous interrupt was handled and EOIed, and wait up to 1 s for each. Returns how many
 * rounds got their interrupt.
 */
static u32 rearm_rounds(void)
{
	u64 hz = tsc_hz();
	irq_count = 0;
	irq_first_iir = 0xffffffff;
	outb(COM1_PORT + UART_MCR, MCR_DTR_RTS_OUT2);
	u32 round;
	for (round = 0; round < IRQ_ROUNDS; round++) {
		u32 before = irq_count;
		outb(COM1_PORT + UART_IER, 0);
		outb(COM1_PORT + UART_IER, IER_THRE);
		sti();
		u64 t0 = rdtsc();
		while (irq_count == before && rdtsc() - t0 < hz)
			pause();
		cli();
		if (irq_count == before)
			break;
	}
	outb(COM1_PORT + UART_IER, 0);
	return round;
}

/*
 * The level-triggered path: COM1's redirection entry switched to level-triggered, active
 * high. Each interrupt sets the IOAPIC's remote IRR, which only the local APIC's EOI of the
 * vector, broadcast back to the IOAPIC, clears; a lost EOI blocks every later interrupt of
 * the pin. Passes when all rounds got their interrupt and remote IRR is clear at the end.
 */
int test_irqlevel(const char *arg)
{
	(void)arg;
	const char *err = irq_setup(count_thre);
	if (err) {
		printk("KVMBOX-TEST irqlevel error=%s\n", err);
		return 1;
	}
	u32 lo = ioapic_read(com1_ioapic, IOAPIC_REDIR(com1_pin));
	lo = (lo & ~REDIR_ACTIVE_LOW) | REDIR_LEVEL;
	ioapic_write(com1_ioapic, IOAPIC_REDIR(com1_pin), lo);
	u32 rounds = rearm_rounds();
	u32 redir = ioapic_read(com1_ioapic, IOAPIC_REDIR(com1_pin));
	printk("KVMBOX-TEST irqlevel rounds=%u count=%u level=%u remote_irr=%u iir=0x%x\n", rounds,
	       irq_count, (redir & REDIR_LEVEL) != 0, (redir & REDIR_REMOTE_IRR) != 0,
	       irq_first_iir & 0xff);
	return rounds != IRQ_ROUNDS || (redir & REDIR_REMOTE_IRR) ||
	       (irq_first_iir & IIR_ID_MASK) != IIR_THRE;
}

/* arch/x86/kernel/i8259.c init_8259A(): master vectors from `base`, slave from base + 8. */
static void pic_init(u8 base)
{
	outb(PIC1_CMD, 0x11);
	outb(PIC1_DATA, base);
	outb(PIC1_DATA, 1 << 2);
	outb(PIC1_DATA, 0x01);
	outb(PIC2_CMD, 0x11);
	outb(PIC2_DATA, base + 8);
	outb(PIC2_DATA, 2);
	outb(PIC2_DATA, 0x01);
}

/*
 * The 8259 path: COM1's IOAPIC pin masked, IRQ 4 unmasked at the master PIC (vectors from
 * VECTOR_COM1 - 4), the local APIC's LINT0 set to ExtINT, so each interrupt reaches the CPU
 * as an external interrupt whose vector comes from the PIC's acknowledge cycle (on KVM with a
 * split irqchip: KVM_INTERRUPT into the in-kernel LAPIC). The handler sends the PIC a
 * non-specific EOI; a lost one leaves IRQ 4 in service and blocks the next rounds.
 */
int test_irqpic(const char *arg)
{
	(void)arg;
	const char *err = irq_setup(count_thre_pic);
	if (err) {
		printk("KVMBOX-TEST irqpic error=%s\n", err);
		return 1;
	}
	ioapic_write(com1_ioapic, IOAPIC_REDIR(com1_pin), REDIR_MASKED);
	pic_init(VECTOR_COM1 - COM1_ISA_IRQ);
	outb(PIC1_DATA, (u8)~(1u << COM1_ISA_IRQ));
	outb(PIC2_DATA, 0xff);
	lapic_write(APIC_LVT0, APIC_MODE_EXTINT);
	u32 rounds = rearm_rounds();
	outb(PIC1_DATA, 0xff);
	outb(PIC1_CMD, 0x0b); /* OCW3: read ISR */
	u8 isr = inb(PIC1_CMD);
	printk("KVMBOX-TEST irqpic rounds=%u count=%u vector=0x%x isr=0x%x iir=0x%x\n", rounds,
	       irq_count, VECTOR_COM1, isr, irq_first_iir & 0xff);
	return rounds != IRQ_ROUNDS || isr || (irq_first_iir & IIR_ID_MASK) != IIR_THRE;
}
