/* COM1 16550 output and a small printf. Runs in ring 0 (port I/O). */
#include <stdarg.h>
#include "tg.h"

#define LSR_THRE 0x20
#define LSR_POLL_LIMIT 100000 /* a missing UART reads 0xff or 0x00: never spin forever */

static volatile u32 print_lock;

/*
 * Ring 0 is emulated instruction by instruction on kvm_pvm (~1 us each), so these work a
 * word at a time where they can: a byte loop over the 600-byte ACPI results cost ~2,900
 * emulated instructions at every start.
 */
typedef u64 __attribute__((may_alias, aligned(1))) word_t;

void *memset(void *d, int c, u64 n)
{
	u8 *p = d;
	u64 w = 0x0101010101010101UL * (u8)c;
	for (; n >= 8; n -= 8, p += 8)
		*(word_t *)p = w;
	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, u64 n)
{
	u8 *p = d;
	const u8 *q = s;
	for (; n >= 8; n -= 8, p += 8, q += 8)
		*(word_t *)p = *(const word_t *)q;
	while (n--)
		*p++ = *q++;
	return d;
}

int memcmp(const void *a, const void *b, u64 n)
{
	const u8 *p = a, *q = b;
	for (; n >= 8 && *(const word_t *)p == *(const word_t *)q; n -= 8, p += 8, q += 8)
		;
	for (; n; n--, p++, q++)
		if (*p != *q)
			return *p < *q ? -1 : 1;
	return 0;
}

u64 strlen(const char *s)
{
	u64 n = 0;
	while (s[n])
		n++;
	return n;
}

void serial_init(void)
{
	outb(COM1_PORT + 1, 0x00); /* IER: no interrupts */
	outb(COM1_PORT + 3, 0x80); /* LCR: DLAB */
	outb(COM1_PORT + 0, 0x01); /* 115200 baud */
	outb(COM1_PORT + 1, 0x00);
	outb(COM1_PORT + 3, 0x03); /* 8N1 */
	outb(COM1_PORT + 2, 0x07); /* FIFO on, cleared */
	outb(COM1_PORT + 4, 0x03); /* DTR | RTS */
}

/*
 * Each port access is a VM exit (~10 us here), so poll LSR.THRE once per FIFO load: with
 * the FIFO enabled, THRE set means all 16 bytes are free (what Linux's 8250 driver does).
 */
#define TX_FIFO 16
static u32 tx_room;

static void serial_putc(char c)
{
	if (!tx_room) {
		for (int i = 0; i < LSR_POLL_LIMIT; i++)
			if (inb(COM1_PORT + 5) & LSR_THRE)
				break;
		tx_room = TX_FIFO;
	}
	tx_room--;
	outb(COM1_PORT, (u8)c);
}

/*
 * Formatting writes each character straight to the UART (no line buffer to fill and read
 * back): every instruction here is emulated in ring 0 on kvm_pvm.
 */
static void put(char c)
{
	if (c == '\n')
		serial_putc('\r');
	serial_putc(c);
}

static void put_num(u64 v, unsigned base, int neg)
{
	char tmp[24];
	int n = 0;
	if (neg)
		put('-');
	do {
		unsigned d = (unsigned)(v % base);
		tmp[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
		v /= base;
	} while (v);
	while (n)
		put(tmp[--n]);
}

static void vformat(const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			put(*fmt);
			continue;
		}
		fmt++;
		int lng = 0;
		while (*fmt == 'l') {
			lng = 1;
			fmt++;
		}
		switch (*fmt) {
		case 's': {
			const char *s = va_arg(ap, const char *);
			if (!s)
				s = "(null)";
			while (*s)
				put(*s++);
			break;
		}
		case 'c':
			put((char)va_arg(ap, int));
			break;
		case 'd': {
			i64 v = lng ? va_arg(ap, i64) : va_arg(ap, int);
			put_num(v < 0 ? (u64)(-v) : (u64)v, 10, v < 0);
			break;
		}
		case 'u':
			put_num(lng ? va_arg(ap, u64) : va_arg(ap, u32), 10, 0);
			break;
		case 'x':
			put_num(lng ? va_arg(ap, u64) : va_arg(ap, u32), 16, 0);
			break;
		case '%':
			put('%');
			break;
		case 0:
			return;
		default:
			put('?');
			break;
		}
	}
}

/* Formats one message to COM1 under a lock shared by all CPUs, so lines do not interleave. */
void printk(const char *fmt, ...)
{
	while (__atomic_exchange_n(&print_lock, 1, __ATOMIC_ACQUIRE))
		pause();
	va_list ap;
	va_start(ap, fmt);
	vformat(fmt, ap);
	va_end(ap);
	__atomic_store_n(&print_lock, 0, __ATOMIC_RELEASE);
}

/* Used on the fatal-exception path: the faulting code may have held the lock. */
void printk_break_lock(void)
{
	__atomic_store_n(&print_lock, 0, __ATOMIC_RELEASE);
}
