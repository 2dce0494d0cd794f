/*
 * An interactive shell on COM1, interrupt driven: the UART's received-data interrupt goes
 * through the IOAPIC to the local APIC, and the CPU waits in `sti; hlt` between keys.
 *
 * Interrupts are enabled only inside that `sti; hlt`, so the interrupt handler (which reads
 * the receive FIFO, edits the line and echoes) never runs while a command prints. Bytes that
 * arrive after a complete line wait in a backlog until the command has run, so input typed
 * ahead (or pasted) is neither lost nor mixed into the command's output.
 */
#include "tg.h"

#define PROMPT "kvmbox-testguest# "
#define LINE_MAX 128
#define BACKLOG 1024 /* power of two */
#define RX_DRAIN_LIMIT 256 /* bytes per interrupt: a UART whose LSR always says "data" cannot hang us */

#define UART_RBR 0
#define UART_IER 1
#define UART_IIR 2
#define UART_MCR 4
#define UART_LSR 5
#define IER_RDA 0x01
#define MCR_DTR_RTS_OUT2 0x0b
#define LSR_DR 0x01

static char line[LINE_MAX];
static u32 line_len;
static char command[LINE_MAX];
static volatile int command_ready;
static int last_was_cr;
static u8 backlog[BACKLOG];
static u32 backlog_head, backlog_tail; /* head: next to read; tail: next to write */

/* One typed byte: line editing and echo. Runs in the interrupt handler, or with IF=0. */
static void feed(u8 c)
{
	if (command_ready) {
		if (backlog_tail - backlog_head < BACKLOG)
			backlog[backlog_tail++ % BACKLOG] = c;
		return;
	}
	int was_cr = last_was_cr;
	last_was_cr = c == '\r';
	if (c == '\n' && was_cr)
		return; /* CR LF is one Enter */
	if (c == '\r' || c == '\n') {
		printk("\n");
		memcpy(command, line, line_len);
		command[line_len] = 0;
		line_len = 0;
		command_ready = 1;
	} else if (c == 0x08 || c == 0x7f) {
		if (line_len) {
			line_len--;
			printk("\b \b");
		}
	} else if (c == 0x03) { /* Ctrl-C: drop the line */
		line_len = 0;
		printk("^C\n" PROMPT);
	} else if (c >= 0x20 && c < 0x7f && line_len < LINE_MAX - 1) {
		line[line_len++] = (char)c;
		printk("%c", c);
	}
}

/* The COM1 interrupt: acknowledge, then drain the receive FIFO. */
static void rx_interrupt(void)
{
	(void)inb(COM1_PORT + UART_IIR);
	for (int i = 0; i < RX_DRAIN_LIMIT && (inb(COM1_PORT + UART_LSR) & LSR_DR); i++)
		feed(inb(COM1_PORT + UART_RBR));
}

static int is_space(char c)
{
	return c == ' ' || c == '\t';
}

static void help(void)
{
	printk("commands:\n"
	       "  help           this list\n"
	       "  echo WORDS     print WORDS\n"
	       "  cpuid          run the cpuid scenario\n"
	       "  acpi           run the acpi scenario\n"
	       "  mem            run the mem scenario\n"
	       "  smp            run the smp scenario\n"
	       "  compute [N]    run the compute scenario (N iterations)\n"
	       "  poweroff       ACPI S5 power-off\n"
	       "  reboot         reset through the i8042 (command 0xfe)\n"
	       "  exit N         debug-exit with byte N (0-255)\n");
}

static void run_command(char *cmd)
{
	while (is_space(*cmd))
		cmd++;
	u64 n = strlen(cmd);
	while (n && is_space(cmd[n - 1]))
		cmd[--n] = 0;
	if (!n)
		return;
	char *args = cmd;
	while (*args && !is_space(*args))
		args++;
	if (*args) {
		*args++ = 0;
		while (is_space(*args))
			args++;
	}
#define IS(name) (!memcmp(cmd, name, sizeof(name)))
	if (IS("help")) {
		help();
	} else if (IS("echo")) {
		printk("%s\n", args);
	} else if (IS("cpuid")) {
		test_cpuid("");
	} else if (IS("acpi")) {
		test_acpi("");
	} else if (IS("mem")) {
		test_mem("");
	} else if (IS("smp")) {
		test_smp("");
	} else if (IS("compute")) {
		if (*args && !valid_number(args))
			printk("compute: not a number: %s\n", args);
		else
			test_compute(args);
	} else if (IS("poweroff")) {
		printk("poweroff failed: %s\n", acpi_poweroff());
	} else if (IS("reboot")) {
		printk("reboot failed: %s\n", i8042_reset());
	} else if (IS("exit")) {
		if (!valid_number(args) || strlen(args) > 5 || parse_u64(args, 0) > 255)
			printk("exit: expected a number 0-255, got '%s'\n", args);
		else
			exit_vm((u8)parse_u64(args, 0));
	} else {
		printk("unknown command: %s\n", cmd);
	}
#undef IS
}

/* Never returns: the user leaves through poweroff, reboot or exit (or the VMM's Ctrl-A x). */
int test_shell(const char *arg)
{
	(void)arg;
	printk("kvmbox test guest shell: type help\n");
	const char *err = irq_setup(rx_interrupt);
	if (err) {
		printk("KVMBOX-TEST shell error=%s\n", err);
		return 1;
	}
	/* Anything typed before now is still in the FIFO: enabling RDA raises the interrupt. */
	outb(COM1_PORT + UART_MCR, MCR_DTR_RTS_OUT2);
	outb(COM1_PORT + UART_IER, IER_RDA);
	printk("KVMBOX-TEST shell ready\n" PROMPT);
	for (;;) {
		cli();
		if (!command_ready) {
			sti_hlt();
			continue;
		}
		run_command(command);
		printk(PROMPT);
		command_ready = 0;
		/* Bytes that came in while the command waited or ran; may complete another line. */
		while (!command_ready && backlog_head != backlog_tail)
			feed(backlog[backlog_head++ % BACKLOG]);
	}
}
