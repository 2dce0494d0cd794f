/*
 * Leaving the VM: ACPI S5 power-off (PM1a_CNT from the FADT, SLP_TYPa from the DSDT's
 * \_S5_), resets through the i8042 and the FADT reset register, and a triple fault. Each
 * prints its KVMBOX-TEST line first; if the VM is still running a while after the write,
 * the VMM did not act on it and the scenario fails. And ACPI S3 (\_S3_), woken by the RTC
 * alarm: the guest resumes in real mode at the waking vector it left in the FACS, where a
 * few bytes of 16-bit code print the scenario's result and exit.
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

/* ------------------------------------------------------------ s3 */

#define PM1_RTC_EN (1u << 10)
#define RTC_INDEX_PORT 0x70
#define RTC_DATA_PORT 0x71
#define RTC_SEC_ALARM 0x01
#define RTC_MIN_ALARM 0x03
#define RTC_HOUR_ALARM 0x05
#define RTC_REG_A 0x0a
#define RTC_REG_B 0x0b
#define RTC_REG_C 0x0c
#define RTC_A_UIP 0x80
#define RTC_B_AIE 0x20
#define RTC_ALARM_ANY 0xc0
#define RTC_UIP_SPINS 100000000ul /* UIP toggles once a second: far more than that */
/* Where the resume code goes: the boot parameters' page, copied away at boot (README). */
#define S3_WAKE_ADDR 0x7000u
#define FACS_WAKING_VECTOR 12

/*
 * 16-bit code run at the waking vector (CS = 0x700, IP = 0): print the message that follows
 * it on COM1, then exit through isa-debug-exit with 0.
 *   push cs; pop ds; mov si, msg; mov dx, 0x3f8
 *   1: lodsb; test al, al; jz 2f; out dx, al; jmp 1b
 *   2: mov dx, 0xf4; xor al, al; out dx, al; 3: hlt; jmp 3b
 *   msg: ...
 */
static const u8 s3_wake_code[] = {
	0x0e, 0x1f, 0xbe, 0x19, 0x00, 0xba, 0xf8, 0x03, 0xac, 0x84, 0xc0, 0x74, 0x03,
	0xee, 0xeb, 0xf8, 0xba, 0xf4, 0x00, 0x30, 0xc0, 0xee, 0xf4, 0xeb, 0xfd,
};
static const char s3_wake_msg[] = "KVMBOX-TEST s3 resumed=yes\nKVMBOX-TEST done result=ok\n";

static u8 rtc_read(u8 index)
{
	outb(RTC_INDEX_PORT, index);
	return inb(RTC_DATA_PORT);
}

static void rtc_write(u8 index, u8 v)
{
	outb(RTC_INDEX_PORT, index);
	outb(RTC_DATA_PORT, v);
}

/* Wait until the RTC's update-in-progress flag is `want`; 0 if it never is. */
static int rtc_uip_is(u8 want)
{
	for (u64 i = 0; i < RTC_UIP_SPINS; i++)
		if ((rtc_read(RTC_REG_A) & RTC_A_UIP) == want)
			return 1;
	return 0;
}

/*
 * ACPI S3, woken by an RTC alarm or (`button`) only by the power button. Returns only if the VM
 * is still running: then, what went wrong.
 */
static const char *acpi_suspend(int button)
{
	if (!acpi.parsed)
		acpi_parse();
	if (!acpi.found)
		return "no-acpi";
	if (!acpi.facs)
		return "no-facs";
	if (!acpi.pm1a_cnt || acpi.pm1a_cnt > 0xffff || !acpi.pm1a_evt || acpi.pm1a_evt > 0xffff)
		return "no-pm1a-ports";
	if (acpi.s3_slp_typ < 0)
		return "no-s3";
	u8 *wake = (u8 *)(u64)S3_WAKE_ADDR;
	memcpy(wake, s3_wake_code, sizeof(s3_wake_code));
	memcpy(wake + sizeof(s3_wake_code), s3_wake_msg, sizeof(s3_wake_msg));
	*(volatile u32 *)(acpi.facs + FACS_WAKING_VECTOR) = S3_WAKE_ADDR;
	if (!button) {
		/* Right after a second starts (UIP falls), so the alarm is ~1 s away: an alarm
		 * every second (don't-care in all three alarm registers), interrupt enabled. */
		if (!rtc_uip_is(RTC_A_UIP) || !rtc_uip_is(0))
			return "rtc-not-ticking";
		rtc_read(RTC_REG_C);
		rtc_write(RTC_SEC_ALARM, RTC_ALARM_ANY);
		rtc_write(RTC_MIN_ALARM, RTC_ALARM_ANY);
		rtc_write(RTC_HOUR_ALARM, RTC_ALARM_ANY);
		rtc_write(RTC_REG_B, rtc_read(RTC_REG_B) | RTC_B_AIE);
		outw((u16)(acpi.pm1a_evt + 2), PM1_RTC_EN);
	}
	u16 port = (u16)acpi.pm1a_cnt;
	u16 typ = (u16)acpi.s3_slp_typ;
	printk("KVMBOX-TEST s3 pm1a_cnt=0x%x slp_typ=%u waking_vector=0x%x wake=%s\n", port, typ,
	       S3_WAKE_ADDR, button ? "button" : "rtc");
	u16 v = inw(port);
	v = (u16)((v & ~(SLP_TYP_MASK | SLP_EN)) | (typ << SLP_TYP_SHIFT) | SLP_EN);
	outw(port, v);
	if (button) /* asleep until someone presses the button: nothing to wait for */
		for (;;)
			pause();
	wait_for_vmm();
	return "still-running";
}

/* s3 or s3:button. Must be the last scenario: the guest ends in the resume code. */
int test_s3(const char *arg)
{
	const char *err = acpi_suspend(!memcmp(arg, "button", 7));
	printk("KVMBOX-TEST s3 error=%s\n", err);
	return 1;
}
