/*
 * Numbered, checksummed disk records, and the two scenarios that write them:
 *
 * crashrec[:B]: for scripts/crash-consistency.py. Record n of stream 0 goes to sector n of the
 * first virtio-blk disk; the guest writes B records (default 8) in one request, flushes, and
 * after each completed flush prints "crashrec flushed N": records 0..N-1 are durable. It stops
 * when the disk is full. The host kills the VMM at a random moment and checks every record the
 * guest saw flushed.
 *
 * soak[:S]: for scripts/soak.py. For S seconds (default 60), rounds of: the first 4 MiB of the
 * disk written with the records of stream hash(serial) + round, flushed, read back and
 * verified; then the net scenario (ARP to 10.0.0.1). At the end one line with the number of
 * rounds and the stream the disk must now hold, which the host verifies.
 *
 * A record (512 bytes, little-endian u64 words): RECORD_MAGIC, n, stream, then 60 words of
 * record_word(stream, n, i), then the FNV-1a 64 hash of the first 504 bytes.
 * scripts/kvmbox_records.py is the host side of this format.
 */
#include "tg.h"

#define RECORD_MAGIC 0x31434552424d564bUL /* "KVMBREC1" */
#define REC_BYTES 512
#define REC_WORDS (REC_BYTES / 8)
#define MAX_BATCH 64
#define SOAK_SECTORS 8192UL /* 4 MiB */
#define SOAK_REQ_SECTORS 2048UL /* 1 MiB per request */

static u64 fnv1a(const u8 *p, u64 len)
{
	u64 h = 0xcbf29ce484222325UL;
	for (u64 i = 0; i < len; i++) {
		h ^= p[i];
		h *= 0x100000001b3UL;
	}
	return h;
}

/* Payload word i of record n of `stream` (splitmix64). */
static u64 record_word(u64 stream, u64 n, u64 i)
{
	u64 z = stream * 0x2545f4914f6cdd1dUL + n * 61 + i + 0x9e3779b97f4a7c15UL;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9UL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebUL;
	return z ^ (z >> 31);
}

struct batch {
	u64 *buf;
	u64 stream;
	u64 first;
	u64 count;
	u64 bad; /* records that did not verify (verify) */
};

/* Fill a batch with records first..first+count-1 (ring 3: memory work runs natively there). */
static u64 fill(u64 arg)
{
	struct batch *b = (struct batch *)arg;
	for (u64 r = 0; r < b->count; r++) {
		u64 *w = b->buf + r * REC_WORDS;
		u64 n = b->first + r;
		w[0] = RECORD_MAGIC;
		w[1] = n;
		w[2] = b->stream;
		for (u64 i = 3; i < REC_WORDS - 1; i++)
			w[i] = record_word(b->stream, n, i);
		w[REC_WORDS - 1] = fnv1a((const u8 *)w, REC_BYTES - 8);
	}
	return 0;
}

/* Count the records of the batch that are not what fill() writes; zero the buffer after. */
static u64 verify(u64 arg)
{
	struct batch *b = (struct batch *)arg;
	b->bad = 0;
	for (u64 r = 0; r < b->count; r++) {
		u64 *w = b->buf + r * REC_WORDS;
		u64 n = b->first + r;
		int ok = w[0] == RECORD_MAGIC && w[1] == n && w[2] == b->stream &&
			 w[REC_WORDS - 1] == fnv1a((const u8 *)w, REC_BYTES - 8);
		for (u64 i = 3; ok && i < REC_WORDS - 1; i++)
			ok = w[i] == record_word(b->stream, n, i);
		b->bad += !ok;
		for (u64 i = 0; i < REC_WORDS; i++)
			w[i] = 0;
	}
	return 0;
}

int test_crashrec(const char *arg)
{
	u64 per = parse_u64(arg, 8);
	if (per == 0 || per > MAX_BATCH) {
		printk("KVMBOX-TEST crashrec error=batch-not-1-to-%d\n", MAX_BATCH);
		return 1;
	}
	u64 sectors;
	const char *serial;
	const char *e = vblk_open(&sectors, &serial);
	struct batch b = {vblk_alloc(per * REC_BYTES), 0, 0, per, 0};
	if (!e && !b.buf)
		e = "out-of-memory";
	u64 n = 0;
	while (!e && n < sectors) {
		b.first = n;
		b.count = sectors - n < per ? sectors - n : per;
		user(fill, (u64)&b);
		e = vblk_write(n, b.buf, b.count * REC_BYTES);
		if (!e)
			e = vblk_flush();
		if (!e) {
			n += b.count;
			printk("crashrec flushed %lu\n", n);
		}
	}
	vblk_close();
	if (e) {
		printk("KVMBOX-TEST crashrec error=%s records=%lu\n", e, n);
		return 1;
	}
	printk("KVMBOX-TEST crashrec records=%lu batch=%lu\n", n, per);
	return 0;
}

/* One soak round on the disk: write, flush, read back and verify the records of `stream`. */
static const char *soak_disk(u64 stream, u64 *sectors, u64 *bad, const char **serial)
{
	u64 cap;
	const char *e = vblk_open(&cap, serial);
	struct batch b = {NULL, stream, 0, 0, 0};
	if (!e)
		b.buf = vblk_alloc(SOAK_REQ_SECTORS * REC_BYTES);
	if (!e && !b.buf)
		e = "out-of-memory";
	*sectors = cap < SOAK_SECTORS ? cap : SOAK_SECTORS;
	for (u64 n = 0; !e && n < *sectors; n += b.count) {
		b.first = n;
		b.count = *sectors - n < SOAK_REQ_SECTORS ? *sectors - n : SOAK_REQ_SECTORS;
		user(fill, (u64)&b);
		e = vblk_write(n, b.buf, b.count * REC_BYTES);
	}
	if (!e)
		e = vblk_flush();
	for (u64 n = 0; !e && n < *sectors; n += b.count) {
		b.first = n;
		b.count = *sectors - n < SOAK_REQ_SECTORS ? *sectors - n : SOAK_REQ_SECTORS;
		e = vblk_read(n, b.buf, b.count * REC_BYTES);
		if (!e) {
			user(verify, (u64)&b);
			*bad += b.bad;
		}
	}
	vblk_close();
	return e;
}

int test_soak(const char *arg)
{
	u64 secs = parse_u64(arg, 60);
	u64 hz = tsc_hz();
	u64 start = rdtsc();
	u64 rounds = 0, blk_errors = 0, bad = 0, net_failures = 0, sectors = 0, base = 0;
	const char *serial = "-", *first_error = "none";
	do {
		const char *e = soak_disk(base + rounds, &sectors, &bad, &serial);
		if (rounds == 0 && !e) {
			base = fnv1a((const u8 *)serial, strlen(serial));
			e = soak_disk(base, &sectors, &bad, &serial);
		}
		if (e) {
			blk_errors++;
			first_error = e;
		}
		net_failures += test_net("8") != 0;
		rounds++;
	} while (rdtsc() - start < secs * hz);
	printk("KVMBOX-TEST soak serial=%s rounds=%lu stream=0x%lx sectors=%lu blk_errors=%lu "
	       "bad_records=%lu net_failures=%lu first_error=%s\n",
	       serial, rounds, base + rounds - 1, sectors, blk_errors, bad, net_failures,
	       first_error);
	return blk_errors || bad || net_failures;
}
