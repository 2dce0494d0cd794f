/*
 * Leaving the VM: ACPI S5 power-off (PM1a_CNT from the FADT, SLP_TYPa from the DSDT's
 * \_S5_), resets through the i8042 and the FADT reset register, and a triple fault. Each
 * prints its KVMBOX-TEST line first; if the VM is still running a while after the write,
 * the VMM did not act on it and the scenario fails.
 */
#include "tg.h"

#define SLP_TYP_SHIFT 10
#define SLP_TYP_MASK (7u << SLP_TYP_SHIFT)
#define SLP_EN (1u << 13)
#define I8042_STATUS_IBF 0x02 /* input buffer full: the controller has not taken the last byte */
#define I8042_CMD_RESET 0xfe
#define I8042_POLL_LIMIT 100000
#define VMM_GRACE_SECONDS 2 /* how long the VMM gets to stop the vCPU after the request */

struct desc_ptr {
	u16 limit;
	u64 base;
} __attribute__((packed));
extern struct desc_ptr idt_ptr;

static void wait_for_vmm(void)
{
	delay(VMM_GRACE_SECONDS * tsc_hz());
}

/* ACPI S5. Returns only if the VM is still running afterwards: then, what went wrong. */
const char *acpi_poweroff(void)
{
	if (!acpi.parsed)
		acpi_parse();
	if (!acpi.found)
		return "no-acpi";
	if (!acpi.pm1a_cnt)
		return "no-pm1a-cnt";
	if (acpi.pm1a_cnt > 0xffff)
		return "pm1a-cnt-not-a-port";
	if (acpi.s5_slp_typ < 0)
		return "no-s5";
	u16 port = (u16)acpi.pm1a_cnt;
	u16 typ = (u16)acpi.s5_slp_typ;
	printk("KVMBOX-TEST poweroff pm1a_cnt=0x%x slp_typ=%u\n", port, typ);
	u16 v = inw(port);
	v = (u16)((v & ~(SLP_TYP_MASK | SLP_EN)) | (typ << SLP_TYP_SHIFT) | SLP_EN);
	outw(port, v);
	wait_for_vmm();
	return "still-running";
}

/* The keyboard controller's reset line (command 0xfe), as Linux's reboot=k does. */
const char *i8042_reset(void)
{
	printk("KVMBOX-TEST reboot method=i8042\n");
	for (int i = 0; i < I8042_POLL_LIMIT && (inb(I8042_CMD_PORT) & I8042_STATUS_IBF); i++)
		pause();
	outb(I8042_CMD_PORT, I8042_CMD_RESET);
	wait_for_vmm();
	return "still-running";
}

/* The FADT reset register (I/O space only: that is what the FADT flags must promise). */
const char *acpi_reset(void)
{
	if (!acpi.parsed)
		acpi_parse();
	if (!acpi.found)
		return "no-acpi";
	if (!acpi.reset_supported)
		return "no-reset-register";
	if (acpi.reset_port > 0xffff)
		return "reset-register-not-a-port";
	printk("KVMBOX-TEST reboot method=acpi port=0x%x value=0x%x\n", acpi.reset_port,
	       acpi.reset_value);
	outb((u16)acpi.reset_port, acpi.reset_value);
	wait_for_vmm();
	return "still-running";
}

int test_poweroff(const char *arg)
{
	(void)arg;
	const char *err = acpi_poweroff();
	printk("KVMBOX-TEST poweroff error=%s\n", err);
	return 1;
}

/* reboot (i8042) or reboot:acpi (FADT reset register). */
int test_reboot(const char *arg)
{
	const char *err = memcmp(arg, "acpi", 5) ? i8042_reset() : acpi_reset();
	printk("KVMBOX-TEST reboot error=%s\n", err);
	return 1;
}

/*
 * An empty IDT (limit 0) and ud2: the #UD cannot be delivered (#GP), nor can the #GP (#DF),
 * nor the #DF: a triple fault, which resets a PC. Not int3: on this host's kvm_pvm, ring 0
 * is emulated and KVM's emulator handles INT n only in real mode, so int3 ends in a KVM
 * "emulation failure" instead of the triple fault.
 */
int test_triplefault(const char *arg)
{
	(void)arg;
	static const struct desc_ptr empty = {0, 0};
	printk("KVMBOX-TEST triplefault\n");
	__asm__ volatile("lidt %0\n\tud2" : : "m"(empty) : "memory");
	__asm__ volatile("lidt %0" : : "m"(idt_ptr));
	printk("KVMBOX-TEST triplefault error=survived\n");
	return 1;
}
