/*
 * SMP bring-up: INIT-SIPI-SIPI to every enabled MADT local APIC through the xAPIC
 * (MMIO at 0xfee00000) or x2APIC (MSR) ICR. The AP trampoline (entry.S, copied to
 * TRAMP_BASE) goes real -> protected -> long mode and calls ap_main.
 */
#include "tg.h"

#define MSR_APIC_BASE 0x1b
#define APIC_BASE_EXTD (1UL << 10)
#define APIC_BASE_EN (1UL << 11)
#define MSR_X2APIC_ICR 0x830
#define MSR_EFER 0xc0000080
#define EFER_LMA (1UL << 10)
#define ICR_LO 0x300
#define ICR_HI 0x310
#define ICR_BUSY (1u << 12)
#define ICR_INIT 0x4500
#define ICR_SIPI 0x4600
#define AP_CHECK_ITERS 64

static volatile u32 ap_online;
static volatile u32 ap_apic_ids[MAX_CPUS];
static volatile u32 ap_bad;
static u64 ap_check_expected;

/* Nominal TSC rate for delays and timeouts: CPUID 0x15/0x16 or the hypervisor leaf, else 3 GHz. */
u64 tsc_hz(void)
{
	u32 a, b, c, d, max;
	cpuid(0, 0, &max, &b, &c, &d);
	if (max >= 0x15) {
		cpuid(0x15, 0, &a, &b, &c, &d);
		if (a && b && c)
			return (u64)c * b / a;
	}
	if (max >= 0x16) {
		cpuid(0x16, 0, &a, &b, &c, &d);
		if (a)
			return (u64)a * 1000000;
	}
	cpuid(1, 0, &a, &b, &c, &d);
	if (c >> 31) {
		cpuid(0x40000000, 0, &max, &b, &c, &d);
		if (max >= 0x40000010) {
			cpuid(0x40000010, 0, &a, &b, &c, &d);
			if (a)
				return (u64)a * 1000;
		}
	}
	return 3000000000UL;
}

/* Spins for `cycles` TSC cycles. */
void delay(u64 cycles)
{
	u64 t = rdtsc();
	while (rdtsc() - t < cycles)
		pause();
}

static u32 my_apic_id(void)
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

static u64 ap_check(void)
{
	u64 x = 0x2545f4914f6cdd1dUL;
	for (int i = 0; i < AP_CHECK_ITERS; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
	}
	return x;
}

/* Runs on each AP in ring 0: record the APIC ID, check long mode and a computation, halt. */
void ap_main(u32 index)
{
	u32 id = my_apic_id();
	int ok = (rdmsr(MSR_EFER) & EFER_LMA) && ap_check() == ap_check_expected;
	if (index < MAX_CPUS)
		ap_apic_ids[index] = id;
	if (!ok)
		__atomic_add_fetch(&ap_bad, 1, __ATOMIC_SEQ_CST);
	__atomic_add_fetch(&ap_online, 1, __ATOMIC_SEQ_CST);
	for (;;)
		__asm__ volatile("cli; hlt");
}

static int x2apic;
static u64 xapic_base;

static int send_ipi(u32 dest, u32 cmd)
{
	if (x2apic) {
		wrmsr(MSR_X2APIC_ICR, ((u64)dest << 32) | cmd);
		return 1;
	}
	mmio_write32(xapic_base + ICR_HI, dest << 24);
	mmio_write32(xapic_base + ICR_LO, cmd);
	for (int i = 0; i < 100000; i++)
		if (!(mmio_read32(xapic_base + ICR_LO) & ICR_BUSY))
			return 1;
	return 0;
}

static void sort(u32 *v, u32 n)
{
	for (u32 i = 1; i < n; i++)
		for (u32 j = i; j > 0 && v[j - 1] > v[j]; j--) {
			u32 t = v[j];
			v[j] = v[j - 1];
			v[j - 1] = t;
		}
}

int test_smp(const char *arg)
{
	(void)arg;
	/* The shell may run this again: the APs of an earlier run halt (cli; hlt) until INIT. */
	ap_online = 0;
	ap_bad = 0;
	ap_next_index = 0;
	u32 bsp = my_apic_id();
	u32 expected = acpi.nr_cpus;
	const char *err = NULL;
	u64 hz = tsc_hz();

	u64 apic_msr = rdmsr(MSR_APIC_BASE);
	x2apic = (apic_msr & APIC_BASE_EXTD) != 0;
	xapic_base = apic_msr & 0xffffff000UL;
	if (!(apic_msr & APIC_BASE_EN))
		err = "apic-disabled";
	else if (!x2apic && xapic_base + 0x1000 > boot.mapped_top)
		err = "apic-unmapped";
	else if (!acpi.found || !expected)
		err = "no-madt";
	if (expected > MAX_CPUS)
		expected = MAX_CPUS;

	u64 tramp_len = (u64)(ap_tramp_end - ap_tramp_start);
	if (!err && tramp_len > 0x1000)
		err = "trampoline-too-big";
	ap_check_expected = ap_check();

	if (!err)
		memcpy((void *)TRAMP_BASE, ap_tramp_start, tramp_len);
	u32 started = 0;
	for (u32 i = 0; !err && i < expected; i++) {
		u32 id = acpi.apic_ids[i];
		if (id == bsp)
			continue;
		if (started + 1 >= MAX_CPUS)
			break;
		u32 before = ap_online;
		started++;
		if (!send_ipi(id, ICR_INIT)) {
			err = "icr-stuck";
			break;
		}
		delay(hz / 100); /* 10 ms */
		send_ipi(id, ICR_SIPI | (TRAMP_BASE >> 12));
		delay(hz / 5000); /* 200 us */
		if (ap_online == before)
			send_ipi(id, ICR_SIPI | (TRAMP_BASE >> 12));
		u64 t0 = rdtsc();
		while (ap_online == before && rdtsc() - t0 < 2 * hz)
			pause();
	}
	/* Let a late AP finish checking in before reading the results. */
	u64 t0 = rdtsc();
	while (ap_online < started && rdtsc() - t0 < hz)
		pause();

	u32 online = 1 + ap_online;
	u32 ids[MAX_CPUS];
	u32 n = 0;
	ids[n++] = bsp;
	for (u32 i = 0; i < ap_online && i < MAX_CPUS - 1; i++)
		ids[n++] = ap_apic_ids[i];
	sort(ids, n);
	printk("KVMBOX-TEST smp expected=%u online=%u apic_ids=", expected, online);
	for (u32 i = 0; i < n; i++)
		printk(i ? ",%u" : "%u", ids[i]);
	if (ap_bad)
		printk(" ap_check_failures=%u", ap_bad);
	if (err)
		printk(" error=%s", err);
	printk("\n");
	return err || ap_bad || online != expected;
}
