/*
 * A minimal virtio 1.x (modern) PCI driver and the blk, blkbench, net, netecho, netbench,
 * netrx, udpecho, rng and vsock scenarios.
 *
 * Ring 0 (emulated on this host, ~1 M instructions/s) scans PCI bus 0 through ports
 * 0xCF8/0xCFC, walks the virtio capabilities, negotiates features and sets the queues up.
 * Ring 3 (native) does the data path: it builds descriptors, writes the notify register
 * (an MMIO exit either way; from ring 3 it saves a ring switch per notify), polls the used
 * rings in memory and checks the data. No interrupts: MSI-X vectors are 0xffff.
 *
 * Memory the driver uses (queues, request headers, data buffers) comes from guest RAM at
 * and above ALLOC_BASE (see ram_alloc), never the VMM's low memory.
 */
#include "tg.h"

#define PCI_CONFIG_ADDRESS 0xcf8
#define PCI_CONFIG_DATA 0xcfc
#define VIRTIO_VENDOR 0x1af4
#define VIRTIO_DEVICE_BASE 0x1040
enum { VIRTIO_NET = 1, VIRTIO_BLK = 2, VIRTIO_RNG = 4, VIRTIO_VSOCK = 19 };

#define ALLOC_BASE (4UL << 20) /* above the image (which ends below 2 MiB) */

/* Device status bits. */
#define ST_ACKNOWLEDGE 1
#define ST_DRIVER 2
#define ST_DRIVER_OK 4
#define ST_FEATURES_OK 8

/* Feature bits. */
#define F_VERSION_1 (1UL << 32)
#define F_EVENT_IDX (1UL << 29)
#define BLK_F_SIZE_MAX (1UL << 1)
#define BLK_F_RO (1UL << 5)
#define BLK_F_FLUSH (1UL << 9)
#define NET_F_MAC (1UL << 5)

/* virtio_pci_common_cfg offsets. */
#define CC_DFSELECT 0
#define CC_DF 4
#define CC_GFSELECT 8
#define CC_GF 12
#define CC_NUMQ 18
#define CC_STATUS 20
#define CC_GEN 21
#define CC_QSELECT 22
#define CC_QSIZE 24
#define CC_QMSIX 26
#define CC_QENABLE 28
#define CC_QNOTIFYOFF 30
#define CC_QDESC 32
#define CC_QDRIVER 40
#define CC_QDEVICE 48
#define CC_MIN_LEN 56

#define CAP_VENDOR 0x09
#define CFG_COMMON 1
#define CFG_NOTIFY 2
#define CFG_ISR 3
#define CFG_DEVICE 4

#define VQ_MAX 256
#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define AVAIL_F_NO_INTERRUPT 1
#define USED_F_NO_NOTIFY 1

#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_T_GET_ID 8
#define BLK_S_OK 0
#define BLK_S_IOERR 1
#define BLK_ID_BYTES 20
#define BLK_MAX_SLOTS (VQ_MAX / 3)

#define NET_HDR_LEN 12 /* virtio_net_hdr_v1: VERSION_1 always has num_buffers */
#define NET_BUF 2048
#define ETH_ARP 0x0806
#define ETH_IP 0x0800
#define HOST_IP 0x0a000001  /* 10.0.0.1, the TAP's address in the host test's netns */
#define GUEST_IP 0x0a000002 /* 10.0.0.2 */
#define UDP_PAYLOAD 1472
#define UDP_SRC_PORT 5000
#define UDP_DST_PORT 5001
#define USER_GUEST_IP 0x0a00020f /* 10.0.2.15, the guest's address behind passt or slirp */
#define USER_GW_IP 0x0a000202	 /* 10.0.2.2, their gateway */
#define UDPECHO_PORT 7		 /* udpecho answers UDP datagrams to this port */
#define NETRX_PORT 5002		 /* netrx counts the UDP datagrams to this port */
#define NETRX_SECONDS 16	 /* netrx reports at most this many seconds one by one */

struct vring_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

struct vring_used_elem {
	u32 id;
	u32 len;
};

/* One split virtqueue; the rings live in guest RAM from ram_alloc. */
struct vq {
	u16 size, index;
	struct vring_desc *desc;
	volatile u16 *avail;			/* flags, idx, ring[size], used_event */
	volatile u16 *used;			/* flags, idx, then elements */
	volatile struct vring_used_elem *elems; /* used ring elements */
	u64 notify;				/* notify register address */
	u16 next_avail;				/* driver's copy of avail->idx */
	u16 last_used;				/* next used element to consume */
	int event_idx;
	u64 notifies;
};

struct vdev {
	u32 bdf;
	u64 common, notify_base, devcfg;
	u32 notify_mult;
	u64 offered, features;
	struct vq q[3];
};

/* ------------------------------------------------------------ MMIO, PCI, memory */

static inline u8 mmio_read8(u64 a)
{
	return *(volatile u8 *)a;
}
static inline u16 mmio_read16(u64 a)
{
	return *(volatile u16 *)a;
}
static inline void mmio_write8(u64 a, u8 v)
{
	*(volatile u8 *)a = v;
}
static inline void mmio_write16(u64 a, u16 v)
{
	*(volatile u16 *)a = v;
}

u32 pci_read(u32 bdf, u32 off)
{
	outl(PCI_CONFIG_ADDRESS, 0x80000000u | (bdf << 8) | (off & 0xfc));
	return inl(PCI_CONFIG_DATA);
}

static void pci_write(u32 bdf, u32 off, u32 v)
{
	outl(PCI_CONFIG_ADDRESS, 0x80000000u | (bdf << 8) | (off & 0xfc));
	outl(PCI_CONFIG_DATA, v);
}

/* The first function on bus 0 whose ID register (device << 16 | vendor) is `want`; 1 if found. */
int pci_find_id(u32 want, u32 *bdf)
{
	for (u32 dev = 0; dev < 32; dev++) {
		for (u32 fn = 0; fn < 8; fn++) {
			u32 b = (dev << 3) | fn;
			u32 id = pci_read(b, 0);
			if ((id & 0xffff) == 0xffff || (id & 0xffff) == 0) {
				if (fn == 0)
					break;
				continue;
			}
			if (id == want) {
				*bdf = b;
				return 1;
			}
			if (fn == 0 && !((pci_read(b, 0x0c) >> 16) & 0x80))
				break; /* not multi-function */
		}
	}
	return 0;
}

/* The first virtio function (vendor 0x1af4, device 0x1040 + type); 1 if found. */
static int pci_find(u16 type, u32 *bdf)
{
	return pci_find_id(((u32)(VIRTIO_DEVICE_BASE + type) << 16) | VIRTIO_VENDOR, bdf);
}

/* Address of memory BAR `bar` (32- or 64-bit); 0 if it is absent, I/O or unassigned. */
static u64 pci_bar(u32 bdf, u32 bar)
{
	if (bar > 5)
		return 0;
	u32 lo = pci_read(bdf, 0x10 + 4 * bar);
	if (lo & 1)
		return 0;
	u64 a = lo & ~0xfUL;
	if (((lo >> 1) & 3) == 2) {
		if (bar == 5)
			return 0;
		a |= (u64)pci_read(bdf, 0x14 + 4 * bar) << 32;
	}
	return a;
}

static u64 alloc_next;

static void ram_reset(void)
{
	alloc_next = ALLOC_BASE;
}

/* `size` bytes of guest RAM (4 KiB aligned) at or above ALLOC_BASE, inside the identity map; 0 if none. */
static u64 ram_alloc(u64 size)
{
	size = (size + 0xfff) & ~0xfffUL;
	for (u32 i = 0; i < boot.nr_memmap; i++) {
		if (boot.memmap[i].type != 1)
			continue;
		u64 s = boot.memmap[i].addr, e = s + boot.memmap[i].size;
		if (e < s)
			continue;
		if (e > boot.mapped_top)
			e = boot.mapped_top;
		if (s < alloc_next)
			s = alloc_next;
		s = (s + 0xfff) & ~0xfffUL;
		if (s < e && e - s >= size) {
			alloc_next = s + size;
			return s;
		}
	}
	return 0;
}

/* ------------------------------------------------------------ TSC rate */

static u64 hz;
static const char *hz_source;

/* PIT channel 2, mode 0, ~50 ms, OUT2 polled through port 0x61 bit 5; 0 if it does not behave. */
static u64 pit_calibrate(void)
{
	const u32 count = 59659; /* 1193182 Hz / 20 */
	outb(0x61, (u8)((inb(0x61) & ~0x02) | 0x01)); /* gate on, speaker off */
	outb(0x43, 0xb0);			     /* channel 2, lobyte/hibyte, mode 0 */
	outb(0x42, (u8)count);
	outb(0x42, (u8)(count >> 8));
	u64 t0 = rdtsc(), t1 = t0;
	u32 polls = 0;
	while (!(inb(0x61) & 0x20)) {
		t1 = rdtsc();
		if (++polls > 2000000 || t1 - t0 > 20000000000UL)
			return 0;
	}
	t1 = rdtsc();
	if (polls < 10)
		return 0; /* OUT2 was high at once: no working PIT */
	u64 f = (t1 - t0) * 1193182UL / count;
	return f > 100000000UL && f < 20000000000UL ? f : 0;
}

/* TSC rate: CPUID 0x15/0x16/0x40000010 when they give one, else the PIT, else 3 GHz. */
static void tsc_setup(void)
{
	u32 a, b, c, d, max;
	if (hz)
		return;
	cpuid(0, 0, &max, &b, &c, &d);
	if (max >= 0x15) {
		cpuid(0x15, 0, &a, &b, &c, &d);
		if (a && b && c) {
			hz = (u64)c * b / a;
			hz_source = "cpuid15";
			return;
		}
	}
	if (max >= 0x16) {
		cpuid(0x16, 0, &a, &b, &c, &d);
		if (a) {
			hz = (u64)a * 1000000;
			hz_source = "cpuid16";
			return;
		}
	}
	cpuid(1, 0, &a, &b, &c, &d);
	if (c >> 31) {
		cpuid(0x40000000, 0, &max, &b, &c, &d);
		if (max >= 0x40000010 && max < 0x40000100) {
			cpuid(0x40000010, 0, &a, &b, &c, &d);
			if (a) {
				hz = (u64)a * 1000;
				hz_source = "cpuid40000010";
				return;
			}
		}
	}
	hz = pit_calibrate();
	hz_source = "pit";
	if (!hz) {
		hz = 3000000000UL;
		hz_source = "default";
	}
}

/* Microseconds in `cycles` (at least 1). */
static u64 cycles_us(u64 cycles)
{
	u64 per_us = hz / 1000000;
	u64 us = cycles / (per_us ? per_us : 1);
	return us ? us : 1;
}

/* ------------------------------------------------------------ device setup (ring 0) */

/*
 * Finds the first virtio device of `type`, maps its capabilities, resets it and negotiates
 * `wanted` (VERSION_1 must be offered). Queues come next (vq_setup), then vdev_ready().
 * Returns NULL or the reason it failed.
 */
static const char *vdev_open(struct vdev *d, u16 type, u64 wanted)
{
	memset(d, 0, sizeof(*d));
	if (!pci_find(type, &d->bdf))
		return "no-device";
	u32 cmd = pci_read(d->bdf, 0x04);
	if (!((cmd >> 16) & 0x10))
		return "no-capabilities";
	pci_write(d->bdf, 0x04, (cmd & 0xffff) | 0x06); /* memory space + bus master */

	u32 ptr = pci_read(d->bdf, 0x34) & 0xfc;
	u64 notify_len = 0;
	for (u32 n = 0; ptr >= 0x40 && n < 48; n++) {
		u32 cap = pci_read(d->bdf, ptr);
		if ((cap & 0xff) == CAP_VENDOR) {
			u32 cfg_type = (cap >> 24) & 0xff;
			u32 bar = pci_read(d->bdf, ptr + 4) & 0xff;
			u64 off = pci_read(d->bdf, ptr + 8);
			u64 len = pci_read(d->bdf, ptr + 12);
			u64 base = pci_bar(d->bdf, bar);
			u64 addr = base + off;
			if (base && addr + len <= boot.mapped_top && addr + len > addr) {
				if (cfg_type == CFG_COMMON && !d->common && len >= CC_MIN_LEN) {
					d->common = addr;
				} else if (cfg_type == CFG_NOTIFY && !d->notify_base) {
					d->notify_base = addr;
					d->notify_mult = pci_read(d->bdf, ptr + 16);
					notify_len = len;
				} else if (cfg_type == CFG_DEVICE && !d->devcfg) {
					d->devcfg = addr;
				}
			} else if (base && cfg_type >= CFG_COMMON && cfg_type <= CFG_DEVICE &&
				   addr + len > boot.mapped_top) {
				printk("KVMBOX-TEST virtio note=bar-unmapped addr=0x%lx\n", addr);
			}
		}
		ptr = (cap >> 8) & 0xfc;
	}
	if (!d->common)
		return "no-common-cfg";
	if (!d->notify_base || notify_len < 2)
		return "no-notify-cfg";

	u64 cc = d->common;
	mmio_write8(cc + CC_STATUS, 0);
	for (u32 i = 0; mmio_read8(cc + CC_STATUS) != 0; i++)
		if (i > 100000)
			return "reset-timeout";
	mmio_write8(cc + CC_STATUS, ST_ACKNOWLEDGE | ST_DRIVER);
	mmio_write32(cc + CC_DFSELECT, 0);
	u64 lo = mmio_read32(cc + CC_DF);
	mmio_write32(cc + CC_DFSELECT, 1);
	u64 hi = mmio_read32(cc + CC_DF);
	d->offered = lo | (hi << 32);
	if (!(d->offered & F_VERSION_1))
		return "no-version-1";
	d->features = d->offered & (wanted | F_VERSION_1);
	mmio_write32(cc + CC_GFSELECT, 0);
	mmio_write32(cc + CC_GF, (u32)d->features);
	mmio_write32(cc + CC_GFSELECT, 1);
	mmio_write32(cc + CC_GF, (u32)(d->features >> 32));
	mmio_write8(cc + CC_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK);
	if (!(mmio_read8(cc + CC_STATUS) & ST_FEATURES_OK))
		return "features-rejected";
	return NULL;
}

/* The selected queue's rings: descriptors at `mem`, available ring 4 KiB and used ring 8 KiB
 * above. */
static void vq_set_rings(u64 cc, u64 mem)
{
	mmio_write32(cc + CC_QDESC, (u32)mem);
	mmio_write32(cc + CC_QDESC + 4, (u32)(mem >> 32));
	mmio_write32(cc + CC_QDRIVER, (u32)(mem + 4096));
	mmio_write32(cc + CC_QDRIVER + 4, (u32)((mem + 4096) >> 32));
	mmio_write32(cc + CC_QDEVICE, (u32)(mem + 8192));
	mmio_write32(cc + CC_QDEVICE + 4, (u32)((mem + 8192) >> 32));
}

/* Sets queue `index` up with at most `max` entries; rings from ram_alloc. */
static const char *vq_setup(struct vdev *d, u16 index, u16 max)
{
	u64 cc = d->common;
	struct vq *q = &d->q[index];
	if (index >= mmio_read16(cc + CC_NUMQ))
		return "too-few-queues";
	mmio_write16(cc + CC_QSELECT, index);
	u16 size = mmio_read16(cc + CC_QSIZE);
	if (size == 0)
		return "queue-unavailable";
	if (size > max)
		size = max;
	if (size & (size - 1)) { /* split rings need a power of two */
		u16 p = 1;
		while ((u16)(p << 1) <= size)
			p = (u16)(p << 1);
		size = p;
	}
	u64 mem = ram_alloc(3 * 4096);
	if (!mem)
		return "out-of-memory";
	q->size = size;
	q->index = index;
	q->desc = (struct vring_desc *)mem;
	q->avail = (volatile u16 *)(mem + 4096);
	q->used = (volatile u16 *)(mem + 8192);
	q->elems = (volatile struct vring_used_elem *)(mem + 8192 + 4);
	q->event_idx = (d->features & F_EVENT_IDX) != 0;
	/* A few stores here instead of zeroing three pages in emulated ring 0. */
	q->avail[0] = AVAIL_F_NO_INTERRUPT;
	q->avail[1] = 0;
	q->avail[2 + size] = 0xffff; /* used_event: no interrupt wanted soon */
	q->used[0] = 0;
	q->used[1] = 0;
	q->used[2 + 4 * size] = 0; /* avail_event: a previous run's value would suppress kicks */
	q->next_avail = 0;
	q->last_used = 0;
	q->notifies = 0;

	mmio_write16(cc + CC_QSIZE, size);
	mmio_write16(cc + CC_QMSIX, 0xffff);
	vq_set_rings(cc, mem);
	u64 off = mmio_read16(cc + CC_QNOTIFYOFF);
	q->notify = d->notify_base + off * d->notify_mult;
	if (q->notify + 2 > boot.mapped_top)
		return "notify-unmapped";
	mmio_write16(cc + CC_QENABLE, 1);
	return NULL;
}

static void vdev_ready(struct vdev *d)
{
	mmio_write8(d->common + CC_STATUS,
		    ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
}

/* Resets the device so it stops using our memory. */
static void vdev_close(struct vdev *d)
{
	if (!d->common)
		return;
	mmio_write8(d->common + CC_STATUS, 0);
	for (u32 i = 0; i < 100000 && mmio_read8(d->common + CC_STATUS); i++)
		;
}

/* A device-configuration field of 4 bytes (read under the generation counter for 8). */
static u64 devcfg_read64(struct vdev *d, u32 off)
{
	for (int tries = 0; tries < 8; tries++) {
		u8 g = mmio_read8(d->common + CC_GEN);
		u64 v = mmio_read32(d->devcfg + off) | ((u64)mmio_read32(d->devcfg + off + 4) << 32);
		if (mmio_read8(d->common + CC_GEN) == g)
			return v;
	}
	return 0;
}

/* ------------------------------------------------------------ virtqueue (ring 3) */

static inline void barrier(void)
{
	__asm__ volatile("" : : : "memory");
}

/* Puts descriptor chain `head` on the available ring (not yet published). */
static inline void vq_add(struct vq *q, u16 head)
{
	q->avail[2 + (q->next_avail & (q->size - 1))] = head;
	q->next_avail++;
}

/* Publishes what vq_add queued and notifies the device if it asked for it. */
static void vq_publish(struct vq *q)
{
	u16 old = q->avail[1], new = q->next_avail;
	if (old == new)
		return;
	barrier(); /* descriptors and ring entries before the index (x86 keeps stores in order) */
	q->avail[1] = new;
	__atomic_thread_fence(__ATOMIC_SEQ_CST); /* the index store before the event/flags load */
	int kick;
	if (q->event_idx) {
		u16 ev = q->used[2 + 4 * q->size]; /* avail_event after the used elements */
		kick = (u16)(new - ev - 1) < (u16)(new - old);
	} else {
		kick = !(q->used[0] & USED_F_NO_NOTIFY);
	}
	if (kick) {
		mmio_write16(q->notify, q->index);
		q->notifies++;
	}
}

/* The next used element, or 0 if none is there yet. */
static inline int vq_used(struct vq *q, u32 *id, u32 *len)
{
	if (q->used[1] == q->last_used)
		return 0;
	barrier();
	volatile struct vring_used_elem *e = &q->elems[q->last_used & (q->size - 1)];
	*id = e->id;
	*len = e->len;
	q->last_used++;
	return 1;
}

/* ------------------------------------------------------------ virtio-blk */

struct blk_hdr {
	u32 type;
	u32 reserved;
	u64 sector;
};

/* One batch of block requests, run by blk_run in ring 3. */
struct blk_job {
	struct vq *q;
	struct blk_hdr *hdrs; /* one per slot */
	volatile u8 *status;  /* one per slot */
	u32 type;
	u64 bytes;	 /* per request (0 for FLUSH) */
	u64 count;	 /* requests to issue; 0: until time_limit */
	u64 first_sector;
	u64 span_sectors; /* requests stay in [first, first + span) */
	int random;	  /* random request-aligned positions instead of sequential */
	int whole;	  /* buf mirrors the disk from first_sector (else one buffer per slot) */
	u8 *buf;
	u32 depth;
	u64 time_limit; /* cycles, 0: none */
	u64 timeout;	/* cycles without a completion before giving up */
	/* results */
	u64 done, failed, bytes_done, cycles;
	u8 first_bad_status;
	const char *error;
};

static u64 blk_run(u64 arg)
{
	struct blk_job *j = (struct blk_job *)arg;
	struct vq *q = j->q;
	u32 slots = q->size / 3;
	if (slots > j->depth)
		slots = j->depth;
	if (slots > BLK_MAX_SLOTS)
		slots = BLK_MAX_SLOTS;
	u16 freelist[BLK_MAX_SLOTS];
	u8 busy[BLK_MAX_SLOTS];
	u64 len_of[BLK_MAX_SLOTS];
	u32 nfree = slots;
	for (u32 i = 0; i < slots; i++) {
		freelist[i] = (u16)(slots - 1 - i);
		busy[i] = 0;
	}
	u64 sectors_per_req = j->bytes / 512;
	u64 issued = 0, rnd = 0x9e3779b97f4a7c15UL ^ j->first_sector;
	int stop = 0;
	u64 start = rdtsc(), progress = start;
	j->done = j->failed = j->bytes_done = 0;
	j->error = NULL;

	for (;;) {
		while (nfree && !stop) {
			if (j->count && issued >= j->count) {
				stop = 1;
				break;
			}
			if (j->time_limit && rdtsc() - start >= j->time_limit) {
				stop = 1;
				break;
			}
			u32 s = freelist[--nfree];
			u64 sector = j->first_sector, len = j->bytes;
			u8 *data = j->buf + (u64)s * j->bytes;
			if (j->whole) {
				u64 off = issued * j->bytes, total = j->span_sectors * 512;
				if (off >= total) {
					nfree++;
					stop = 1;
					break;
				}
				if (len > total - off)
					len = total - off;
				sector += off / 512;
				data = j->buf + off;
			} else if (j->random && sectors_per_req) {
				rnd ^= rnd << 13;
				rnd ^= rnd >> 7;
				rnd ^= rnd << 17;
				sector += (rnd % (j->span_sectors / sectors_per_req)) * sectors_per_req;
			} else if (sectors_per_req) {
				sector += (issued * sectors_per_req) % j->span_sectors;
			}
			struct blk_hdr *h = &j->hdrs[s];
			h->type = j->type;
			h->reserved = 0;
			h->sector = sector;
			j->status[s] = 0xff;
			struct vring_desc *d = &q->desc[3 * s];
			d[0].addr = (u64)h;
			d[0].len = sizeof(*h);
			d[0].flags = DESC_F_NEXT;
			d[0].next = (u16)(3 * s + (len ? 1 : 2));
			if (len) {
				d[1].addr = (u64)data;
				d[1].len = (u32)len;
				d[1].flags = DESC_F_NEXT |
					     (j->type == BLK_T_OUT ? 0 : DESC_F_WRITE);
				d[1].next = (u16)(3 * s + 2);
			}
			d[2].addr = (u64)&j->status[s];
			d[2].len = 1;
			d[2].flags = DESC_F_WRITE;
			d[2].next = 0;
			len_of[s] = len;
			busy[s] = 1;
			vq_add(q, (u16)(3 * s));
			issued++;
		}
		vq_publish(q);
		if (stop && nfree == slots)
			break;
		u32 id, len;
		int got = 0;
		while (vq_used(q, &id, &len)) {
			u32 s = id / 3;
			if (id % 3 || s >= slots || !busy[s]) {
				j->error = "bad-used-id";
				goto out;
			}
			busy[s] = 0;
			freelist[nfree++] = (u16)s;
			u8 st = j->status[s];
			j->done++;
			if (st == BLK_S_OK) {
				j->bytes_done += len_of[s];
			} else {
				if (!j->failed)
					j->first_bad_status = st;
				j->failed++;
			}
			got = 1;
		}
		u64 now = rdtsc();
		if (got) {
			progress = now;
		} else {
			if (now - progress > j->timeout) {
				j->error = "timeout";
				goto out;
			}
			pause();
		}
	}
out:
	j->cycles = rdtsc() - start;
	return 0;
}

/* Word at byte offset `pos` of the blk scenario's pattern (splitmix64 of the position). */
static inline u64 blk_pattern(u64 pos)
{
	u64 z = pos + 0x9e3779b97f4a7c15UL;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9UL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebUL;
	return z ^ (z >> 31);
}

struct region {
	u8 *buf;
	u64 len;  /* bytes, a multiple of 8 */
	u64 base; /* disk byte offset of buf[0] */
	u64 result;
};

static u64 region_fill(u64 arg)
{
	struct region *r = (struct region *)arg;
	u64 *w = (u64 *)r->buf;
	for (u64 i = 0; i < r->len / 8; i++)
		w[i] = blk_pattern(r->base + i * 8);
	return 0;
}

static u64 region_zero(u64 arg)
{
	struct region *r = (struct region *)arg;
	u64 *w = (u64 *)r->buf;
	for (u64 i = 0; i < r->len / 8; i++)
		w[i] = 0;
	return 0;
}

/* Words that differ from the pattern. */
static u64 region_verify(u64 arg)
{
	struct region *r = (struct region *)arg;
	const u64 *w = (const u64 *)r->buf;
	u64 bad = 0;
	for (u64 i = 0; i < r->len / 8; i++)
		if (w[i] != blk_pattern(r->base + i * 8))
			bad++;
	return bad;
}

/* FNV-1a 64 over the bytes. */
static u64 region_fnv(u64 arg)
{
	struct region *r = (struct region *)arg;
	u64 h = 0xcbf29ce484222325UL;
	for (u64 i = 0; i < r->len; i++) {
		h ^= r->buf[i];
		h *= 0x100000001b3UL;
	}
	return h;
}

struct blk_dev {
	struct vdev v;
	struct blk_hdr *hdrs;
	volatile u8 *status;
	u64 capacity; /* sectors */
	char serial[BLK_ID_BYTES + 1];
};

static void blk_job_init(struct blk_dev *b, struct blk_job *j, u32 type)
{
	memset(j, 0, sizeof(*j));
	j->q = &b->v.q[0];
	j->hdrs = b->hdrs;
	j->status = b->status;
	j->type = type;
	j->depth = BLK_MAX_SLOTS;
	j->timeout = 5 * hz;
}

/* Opens the first virtio-blk: features, queue 0, capacity and serial. */
static const char *blk_open(struct blk_dev *b)
{
	memset(b, 0, sizeof(*b));
	const char *e = vdev_open(&b->v, VIRTIO_BLK, F_EVENT_IDX | BLK_F_RO | BLK_F_FLUSH);
	if (e)
		return e;
	if (!b->v.devcfg)
		return "no-device-cfg";
	if (b->v.offered & BLK_F_SIZE_MAX) {
		u32 size_max = mmio_read32(b->v.devcfg + 8);
		if (size_max < (1u << 20))
			return "size-max-below-1mib";
	}
	e = vq_setup(&b->v, 0, VQ_MAX);
	if (e)
		return e;
	u64 meta = ram_alloc(4096);
	if (!meta)
		return "out-of-memory";
	b->hdrs = (struct blk_hdr *)meta;
	b->status = (volatile u8 *)(meta + BLK_MAX_SLOTS * sizeof(struct blk_hdr));
	u8 *id = (u8 *)(meta + 2048);
	vdev_ready(&b->v);
	b->capacity = devcfg_read64(&b->v, 0);

	struct blk_job j;
	blk_job_init(b, &j, BLK_T_GET_ID);
	j.bytes = BLK_ID_BYTES;
	j.count = 1;
	j.span_sectors = 1;
	j.buf = id;
	memset(id, 0, BLK_ID_BYTES);
	user(blk_run, (u64)&j);
	if (j.error)
		return j.error;
	u32 n = 0;
	if (!j.failed)
		for (; n < BLK_ID_BYTES && id[n]; n++)
			b->serial[n] = (id[n] > 0x20 && id[n] < 0x7f) ? (char)id[n] : '_';
	if (!n)
		b->serial[n++] = '-';
	b->serial[n] = 0;
	return NULL;
}

#define BLK_TEST_MAX (16UL << 20)
#define BLK_TEST_REQ (64UL << 10)

static int blk_fail(struct blk_dev *b, const char *scenario, const char *why)
{
	printk("KVMBOX-TEST %s error=%s\n", scenario, why);
	vdev_close(&b->v);
	return 1;
}

/*
 * blk: writes the pattern over the first min(capacity, 16 MiB) in 64 KiB requests, flushes,
 * reads it back and verifies it. blk:ro: a write must fail with IOERR on a read-only disk;
 * the region is read and checksummed as it is.
 */
int test_blk(const char *arg)
{
	static struct blk_dev b;
	int ro = arg[0] != 0;
	ram_reset();
	tsc_setup();
	const char *e = blk_open(&b);
	if (e)
		return blk_fail(&b, "blk", e);
	u64 sectors = b.capacity < BLK_TEST_MAX / 512 ? b.capacity : BLK_TEST_MAX / 512;
	if (!sectors)
		return blk_fail(&b, "blk", "empty-disk");
	int dev_ro = (b.v.offered & BLK_F_RO) != 0;
	if (ro != dev_ro)
		return blk_fail(&b, "blk", ro ? "disk-not-read-only" : "disk-read-only");
	struct region r = {(u8 *)ram_alloc(sectors * 512), sectors * 512, 0, 0};
	if (!r.buf)
		return blk_fail(&b, "blk", "out-of-memory");

	struct blk_job j;
	u64 errors = 0, cycles_write = 0, cycles_flush = 0;
	int write_status = -1;
	if (ro) {
		user(region_zero, (u64)&r);
		blk_job_init(&b, &j, BLK_T_OUT);
		j.bytes = 512;
		j.count = 1;
		j.span_sectors = 1;
		j.buf = r.buf;
		user(blk_run, (u64)&j);
		if (j.error)
			return blk_fail(&b, "blk", j.error);
		write_status = j.failed ? j.first_bad_status : BLK_S_OK;
	} else {
		user(region_fill, (u64)&r);
		blk_job_init(&b, &j, BLK_T_OUT);
		j.bytes = BLK_TEST_REQ;
		j.whole = 1;
		j.span_sectors = sectors;
		j.buf = r.buf;
		user(blk_run, (u64)&j);
		if (j.error)
			return blk_fail(&b, "blk", j.error);
		errors += j.failed;
		cycles_write = j.cycles;
		if (b.v.features & BLK_F_FLUSH) {
			blk_job_init(&b, &j, BLK_T_FLUSH);
			j.count = 1;
			j.span_sectors = 1;
			user(blk_run, (u64)&j);
			if (j.error)
				return blk_fail(&b, "blk", j.error);
			errors += j.failed;
			cycles_flush = j.cycles;
		}
		user(region_zero, (u64)&r);
	}
	blk_job_init(&b, &j, BLK_T_IN);
	j.bytes = BLK_TEST_REQ;
	j.whole = 1;
	j.span_sectors = sectors;
	j.buf = r.buf;
	user(blk_run, (u64)&j);
	if (j.error)
		return blk_fail(&b, "blk", j.error);
	errors += j.failed;
	u64 cycles_read = j.cycles;
	u64 mismatched = ro ? 0 : user(region_verify, (u64)&r);
	u64 sum = user(region_fnv, (u64)&r);
	vdev_close(&b.v);

	printk("KVMBOX-TEST blk capacity_sectors=%lu serial=%s sectors=%lu", b.capacity, b.serial,
	       sectors);
	if (ro)
		printk(" ro=1 write_status=%d read_mib=%lu errors=%lu checksum=0x%lx cycles_read=%lu\n",
		       write_status, (sectors * 512) >> 20, errors, sum, cycles_read);
	else
		printk(" written_mib=%lu errors=%lu mismatched_words=%lu checksum=0x%lx "
		       "cycles_write=%lu cycles_flush=%lu cycles_read=%lu notifies=%lu\n",
		       (sectors * 512) >> 20, errors, mismatched, sum, cycles_write, cycles_flush,
		       cycles_read, b.v.q[0].notifies);
	if (ro)
		return errors != 0 || write_status != BLK_S_IOERR;
	return errors != 0 || mismatched != 0;
}

#define BENCH_REGION_MAX (1UL << 30)
#define BENCH_SEQ_REQ (1UL << 20)
#define BENCH_SEQ_DEPTH 32
#define BENCH_RAND_REQ 4096UL
#define BENCH_RAND_DEPTH BLK_MAX_SLOTS

/*
 * blkbench[:MS]: each phase runs MS milliseconds (default 1000) over the first
 * min(capacity, 1 GiB): sequential 1 MiB writes, sequential 1 MiB reads, random 4 KiB
 * reads, random 4 KiB writes, queue depth 32 for 1 MiB, min(queue size / 3, 85) for 4 KiB.
 */
int test_blkbench(const char *arg)
{
	static struct blk_dev b;
	u64 ms = parse_u64(arg, 1000);
	ram_reset();
	tsc_setup();
	const char *e = blk_open(&b);
	if (e)
		return blk_fail(&b, "blkbench", e);
	if (b.v.offered & BLK_F_RO)
		return blk_fail(&b, "blkbench", "disk-read-only");
	u64 region = b.capacity * 512 < BENCH_REGION_MAX ? b.capacity * 512 : BENCH_REGION_MAX;
	region &= ~(BENCH_SEQ_REQ - 1);
	if (!region)
		return blk_fail(&b, "blkbench", "disk-below-1mib");
	u8 *buf = (u8 *)ram_alloc(BENCH_SEQ_DEPTH * BENCH_SEQ_REQ);
	if (!buf)
		return blk_fail(&b, "blkbench", "out-of-memory");

	static const struct {
		u32 type;
		u64 bytes;
		int random;
		u32 depth;
	} phases[4] = {
		{BLK_T_OUT, BENCH_SEQ_REQ, 0, BENCH_SEQ_DEPTH},
		{BLK_T_IN, BENCH_SEQ_REQ, 0, BENCH_SEQ_DEPTH},
		{BLK_T_IN, BENCH_RAND_REQ, 1, BENCH_RAND_DEPTH},
		{BLK_T_OUT, BENCH_RAND_REQ, 1, BENCH_RAND_DEPTH},
	};
	u64 rate[4], errors = 0, depth[4];
	for (int p = 0; p < 4; p++) {
		struct blk_job j;
		blk_job_init(&b, &j, phases[p].type);
		j.bytes = phases[p].bytes;
		j.random = phases[p].random;
		j.depth = phases[p].depth;
		j.span_sectors = region / 512;
		j.buf = buf;
		j.time_limit = ms * (hz / 1000);
		user(blk_run, (u64)&j);
		if (j.error)
			return blk_fail(&b, "blkbench", j.error);
		errors += j.failed;
		u64 us = cycles_us(j.cycles);
		depth[p] = j.depth < b.v.q[0].size / 3 ? j.depth : b.v.q[0].size / 3;
		rate[p] = phases[p].random ? j.done * 1000000 / us
					   : (j.bytes_done * 1000000 / us) >> 20;
	}
	vdev_close(&b.v);
	printk("KVMBOX-TEST blkbench seq_read_mibs=%lu seq_write_mibs=%lu rand4k_read_iops=%lu "
	       "rand4k_write_iops=%lu errors=%lu region_mib=%lu depth_seq=%lu depth_4k=%lu "
	       "notifies=%lu tsc_hz=%lu tsc_source=%s\n",
	       rate[1], rate[0], rate[2], rate[3], errors, region >> 20, depth[0], depth[2],
	       b.v.q[0].notifies, hz, hz_source);
	return errors != 0;
}

/* ------------------------------------------------------------ virtio-net */

struct net_dev {
	struct vdev v; /* q[0] receive, q[1] transmit */
	u8 mac[6], peer[6];
	u32 ip, peer_ip; /* ours (ARP, ping, udpecho) and the one ARP requests ask for */
	int have_peer;
	u8 *rxbuf, *txbuf;
	u16 tx_free[VQ_MAX];
	u8 tx_busy[VQ_MAX];
	u32 tx_nfree;
	u64 rx_frames, rx_bad, tx_frames, tx_done;
	u64 arp_replies, arp_answered, echo_answered;
	u64 udp_answered, udp_quit; /* udpecho: datagrams answered; "quit" seen */
	char udp_id[24];	    /* udpecho: appended to every answer */
	u64 udp_id_len;
	int no_pad; /* send frames under 60 bytes unpadded (Debian 12's passt drops padded UDP) */
	u64 timeout;
	const char *error;
};
static struct net_dev net;

static inline u16 be16(const u8 *p)
{
	return (u16)((p[0] << 8) | p[1]);
}
static inline u32 be32(const u8 *p)
{
	return ((u32)p[0] << 24) | ((u32)p[1] << 16) | ((u32)p[2] << 8) | p[3];
}
static inline void put16(u8 *p, u16 v)
{
	p[0] = (u8)(v >> 8);
	p[1] = (u8)v;
}
static inline void put32(u8 *p, u32 v)
{
	put16(p, (u16)(v >> 16));
	put16(p + 2, (u16)v);
}

/* Internet checksum of `len` bytes. */
static u16 inet_csum(const u8 *p, u64 len)
{
	u64 s = 0;
	for (u64 i = 0; i + 1 < len; i += 2)
		s += be16(p + i);
	if (len & 1)
		s += (u64)p[len - 1] << 8;
	while (s >> 16)
		s = (s & 0xffff) + (s >> 16);
	return (u16)~s;
}

/* Transmit completions back on the free list. */
static void net_tx_reap(void)
{
	struct vq *q = &net.v.q[1];
	u32 id, len;
	while (vq_used(q, &id, &len)) {
		if (id >= q->size || !net.tx_busy[id]) {
			net.error = "bad-tx-used-id";
			return;
		}
		net.tx_busy[id] = 0;
		net.tx_free[net.tx_nfree++] = (u16)id;
		net.tx_done++;
	}
}

/* A free transmit buffer (waits up to the timeout for one); its frame starts NET_HDR_LEN in. */
static int net_tx_slot(void)
{
	u64 t0 = rdtsc();
	for (;;) {
		net_tx_reap();
		if (net.error)
			return -1;
		if (net.tx_nfree)
			return net.tx_free[--net.tx_nfree];
		if (rdtsc() - t0 > net.timeout) {
			net.error = "tx-timeout";
			return -1;
		}
		pause();
	}
}

/* Queues slot `s` holding a frame of `len` bytes (after the header); publish separately. */
static void net_tx_queue(int s, u64 len)
{
	struct vq *q = &net.v.q[1];
	u8 *b = net.txbuf + (u64)s * NET_BUF;
	memset(b, 0, NET_HDR_LEN);
	q->desc[s].addr = (u64)b;
	q->desc[s].len = (u32)(NET_HDR_LEN + len);
	q->desc[s].flags = 0;
	q->desc[s].next = 0;
	net.tx_busy[s] = 1;
	vq_add(q, (u16)s);
	net.tx_frames++;
}

static void net_send(const u8 *frame, u64 len)
{
	int s = net_tx_slot();
	if (s < 0)
		return;
	u8 *b = net.txbuf + (u64)s * NET_BUF + NET_HDR_LEN;
	memcpy(b, frame, len);
	if (len < 60 && !net.no_pad) {
		memset(b + len, 0, 60 - len);
		len = 60;
	}
	net_tx_queue(s, len);
	vq_publish(&net.v.q[1]);
}

static void arp_frame(u8 *f, u16 op, const u8 *dst_mac, u32 target_ip, const u8 *target_mac)
{
	memcpy(f, dst_mac, 6);
	memcpy(f + 6, net.mac, 6);
	put16(f + 12, ETH_ARP);
	put16(f + 14, 1);      /* Ethernet */
	put16(f + 16, ETH_IP); /* IPv4 */
	f[18] = 6;
	f[19] = 4;
	put16(f + 20, op);
	memcpy(f + 22, net.mac, 6);
	put32(f + 28, net.ip);
	memcpy(f + 32, target_mac, 6);
	put32(f + 38, target_ip);
}

static const u8 broadcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
static const u8 zero_mac[6];

/* Sum of the UDP pseudo-header and the UDP header + payload (`ulen` bytes), as a checksum. */
static u16 udp_csum(const u8 *ip, const u8 *udp, u64 ulen)
{
	u64 s = be16(ip + 12) + be16(ip + 14) + be16(ip + 16) + be16(ip + 18) + 17 + ulen;
	for (u64 i = 0; i + 1 < ulen; i += 2)
		s += be16(udp + i);
	if (ulen & 1)
		s += (u64)udp[ulen - 1] << 8;
	while (s >> 16)
		s = (s & 0xffff) + (s >> 16);
	u16 c = (u16)~s;
	return c ? c : 0xffff;
}

/*
 * udpecho: a UDP datagram to our port `UDPECHO_PORT` goes back to its sender with the
 * scenario's ID appended to the payload (a 20-byte IPv4 header, checksums filled in), built
 * in `out` (NET_BUF bytes).
 */
static void udp_answer(u8 *out, const u8 *f, const u8 *ip, u64 ihl, u64 tot)
{
	const u8 *udp = ip + ihl;
	u64 ulen = be16(udp + 4);
	if (ulen < 8 || ulen > tot - ihl || be16(udp + 2) != UDPECHO_PORT)
		return;
	u64 plen = ulen - 8;
	u64 olen = 14 + 20 + 8 + plen + net.udp_id_len;
	if (olen > NET_BUF - NET_HDR_LEN)
		return;
	memcpy(out, f + 6, 6);
	memcpy(out + 6, net.mac, 6);
	put16(out + 12, ETH_IP);
	u8 *oip = out + 14;
	oip[0] = 0x45;
	oip[1] = 0;
	put16(oip + 2, (u16)(olen - 14));
	put16(oip + 4, 0);
	put16(oip + 6, 0x4000); /* DF */
	oip[8] = 64;
	oip[9] = 17;
	put16(oip + 10, 0);
	put32(oip + 12, net.ip);
	memcpy(oip + 16, ip + 12, 4);
	put16(oip + 10, inet_csum(oip, 20));
	u8 *oudp = oip + 20;
	memcpy(oudp, udp + 2, 2); /* our port */
	memcpy(oudp + 2, udp, 2); /* theirs */
	put16(oudp + 4, (u16)(8 + plen + net.udp_id_len));
	put16(oudp + 6, 0);
	memcpy(oudp + 8, udp + 8, plen);
	memcpy(oudp + 8 + plen, net.udp_id, net.udp_id_len);
	put16(oudp + 6, udp_csum(oip, oudp, 8 + plen + net.udp_id_len));
	net_send(out, olen);
	net.udp_answered++;
	if (plen == 4 && !memcmp(udp + 8, "quit", 4))
		net.udp_quit = 1;
}

/*
 * One received frame: count ARP replies from net.peer_ip, answer ARP and ICMP echo for
 * net.ip, and (udpecho) UDP datagrams to UDPECHO_PORT.
 */
static void net_frame(u8 *f, u64 len)
{
	u8 out[NET_BUF];
	if (len < 14)
		return;
	u16 type = be16(f + 12);
	if (type == ETH_ARP && len >= 42 && be16(f + 14) == 1 && be16(f + 16) == ETH_IP &&
	    f[18] == 6 && f[19] == 4) {
		u16 op = be16(f + 20);
		u32 sip = be32(f + 28), tip = be32(f + 38);
		if (op == 2 && sip == net.peer_ip && tip == net.ip) {
			net.arp_replies++;
			memcpy(net.peer, f + 22, 6);
			net.have_peer = 1;
		} else if (op == 1 && tip == net.ip) {
			arp_frame(out, 2, f + 22, sip, f + 22);
			net_send(out, 42);
			net.arp_answered++;
		}
		return;
	}
	if (type != ETH_IP || len < 34)
		return;
	u8 *ip = f + 14;
	u64 ihl = (u64)(ip[0] & 0xf) * 4;
	u64 tot = be16(ip + 2);
	if ((ip[0] >> 4) != 4 || ihl < 20 || tot < ihl + 8 || 14 + tot > len || tot > NET_BUF - 64)
		return;
	if (be32(ip + 16) != net.ip)
		return;
	if (ip[9] == 17 && net.udp_id_len) {
		udp_answer(out, f, ip, ihl, tot);
		return;
	}
	if (ip[9] != 1 || ip[ihl] != 8)
		return;
	/* ICMP echo request to us: the same frame back as an echo reply. */
	memcpy(out, f + 6, 6);
	memcpy(out + 6, net.mac, 6);
	memcpy(out + 12, f + 12, 2 + tot);
	u8 *oip = out + 14;
	memcpy(oip + 12, ip + 16, 4);
	memcpy(oip + 16, ip + 12, 4);
	oip[8] = 64;
	put16(oip + 10, 0);
	put16(oip + 10, inet_csum(oip, ihl));
	u8 *icmp = oip + ihl;
	icmp[0] = 0;
	put16(icmp + 2, 0);
	put16(icmp + 2, inet_csum(icmp, tot - ihl));
	net_send(out, 14 + tot);
	net.echo_answered++;
}

/* Handles every received frame and gives the buffers back. */
static void net_rx_poll(void)
{
	struct vq *q = &net.v.q[0];
	u32 id, len;
	int any = 0;
	while (vq_used(q, &id, &len)) {
		if (id >= q->size) {
			net.error = "bad-rx-used-id";
			return;
		}
		net.rx_frames++;
		if (len < NET_HDR_LEN || len > NET_BUF)
			net.rx_bad++;
		else
			net_frame(net.rxbuf + (u64)id * NET_BUF + NET_HDR_LEN, len - NET_HDR_LEN);
		vq_add(q, (u16)id);
		any = 1;
	}
	if (any)
		vq_publish(q);
}

/* Ring 3: every receive buffer on the ring, every transmit buffer free. */
static u64 net_start(u64 unused)
{
	(void)unused;
	struct vq *rx = &net.v.q[0], *tx = &net.v.q[1];
	for (u16 i = 0; i < rx->size; i++) {
		rx->desc[i].addr = (u64)(net.rxbuf + (u64)i * NET_BUF);
		rx->desc[i].len = NET_BUF;
		rx->desc[i].flags = DESC_F_WRITE;
		rx->desc[i].next = 0;
		vq_add(rx, i);
	}
	vq_publish(rx);
	net.tx_nfree = 0;
	for (u16 i = 0; i < tx->size; i++) {
		net.tx_busy[i] = 0;
		net.tx_free[net.tx_nfree++] = (u16)(tx->size - 1 - i);
	}
	return 0;
}

static const char *net_open(void)
{
	memset(&net, 0, sizeof(net));
	net.ip = GUEST_IP;
	net.peer_ip = HOST_IP;
	const char *e = vdev_open(&net.v, VIRTIO_NET, F_EVENT_IDX | NET_F_MAC);
	if (e)
		return e;
	if (!(net.v.features & NET_F_MAC) || !net.v.devcfg)
		return "no-mac";
	for (int i = 0; i < 6; i++)
		net.mac[i] = mmio_read8(net.v.devcfg + (u64)i);
	if ((e = vq_setup(&net.v, 0, VQ_MAX)) || (e = vq_setup(&net.v, 1, VQ_MAX)))
		return e;
	net.rxbuf = (u8 *)ram_alloc((u64)net.v.q[0].size * NET_BUF);
	net.txbuf = (u8 *)ram_alloc((u64)net.v.q[1].size * NET_BUF);
	if (!net.rxbuf || !net.txbuf)
		return "out-of-memory";
	net.timeout = 2 * hz;
	vdev_ready(&net.v);
	user(net_start, 0);
	return NULL;
}

static void mac_string(char *s, const u8 *m)
{
	static const char hex[] = "0123456789abcdef";
	for (int i = 0; i < 6; i++) {
		s[3 * i] = hex[m[i] >> 4];
		s[3 * i + 1] = hex[m[i] & 0xf];
		s[3 * i + 2] = i < 5 ? ':' : 0;
	}
}

static int net_fail(const char *scenario, const char *why)
{
	printk("KVMBOX-TEST %s error=%s\n", scenario, why);
	vdev_close(&net.v);
	return 1;
}

struct net_arp_job {
	u64 count;   /* ARP requests to send */
	u64 wait;    /* cycles to keep receiving after the last one */
	u64 want;    /* stop early once this many replies arrived */
	u64 spacing; /* cycles between requests */
};

/* Sends ARP requests for net.peer_ip and counts the replies. */
static u64 net_arp_run(u64 arg)
{
	struct net_arp_job *j = (struct net_arp_job *)arg;
	u8 f[64];
	for (u64 i = 0; i < j->count && !net.error; i++) {
		arp_frame(f, 1, broadcast, net.peer_ip, zero_mac);
		net_send(f, 42);
		u64 t = rdtsc();
		while (rdtsc() - t < j->spacing && !net.error) {
			net_rx_poll();
			net_tx_reap();
			pause();
		}
	}
	u64 t = rdtsc();
	while (rdtsc() - t < j->wait && net.arp_replies < j->want && !net.error) {
		net_rx_poll();
		net_tx_reap();
		pause();
	}
	return 0;
}

/* net[:N]: N ARP requests for 10.0.0.1 from 10.0.0.2 (default 8); counts the replies. */
int test_net(const char *arg)
{
	u64 n = parse_u64(arg, 8);
	char mac[18], peer[18];
	ram_reset();
	tsc_setup();
	const char *e = net_open();
	if (e)
		return net_fail("net", e);
	struct net_arp_job j = {n, 2 * hz, n, hz / 100};
	user(net_arp_run, (u64)&j);
	vdev_close(&net.v);
	mac_string(mac, net.mac);
	mac_string(peer, net.have_peer ? net.peer : zero_mac);
	printk("KVMBOX-TEST net mac=%s sent=%lu received=%lu arp_replies=%lu peer_mac=%s "
	       "arp_answered=%lu notifies=%lu",
	       mac, net.tx_frames, net.rx_frames, net.arp_replies, peer, net.arp_answered,
	       net.v.q[1].notifies);
	if (net.error)
		printk(" error=%s", net.error);
	printk("\n");
	return net.error != NULL || net.arp_replies == 0;
}

struct net_echo_job {
	u64 cycles;
};

static u64 net_echo_run(u64 arg)
{
	struct net_echo_job *j = (struct net_echo_job *)arg;
	u64 t = rdtsc();
	while (rdtsc() - t < j->cycles && !net.error) {
		net_rx_poll();
		net_tx_reap();
		pause();
	}
	return 0;
}

/* netecho[:T]: answers ARP and ICMP echo requests for 10.0.0.2 for T seconds (default 5). */
int test_netecho(const char *arg)
{
	u64 secs = parse_u64(arg, 5);
	char mac[18];
	ram_reset();
	tsc_setup();
	const char *e = net_open();
	if (e)
		return net_fail("netecho", e);
	mac_string(mac, net.mac);
	printk("netecho: answering ARP and ping for 10.0.0.2 at %s for %lu s\n", mac, secs);
	struct net_echo_job j = {secs * hz};
	user(net_echo_run, (u64)&j);
	vdev_close(&net.v);
	printk("KVMBOX-TEST netecho mac=%s seconds=%lu received=%lu arp_answered=%lu "
	       "echo_replies=%lu sent=%lu",
	       mac, secs, net.rx_frames, net.arp_answered, net.echo_answered, net.tx_frames);
	if (net.error)
		printk(" error=%s", net.error);
	printk("\n");
	return net.error != NULL || net.echo_answered == 0;
}

struct net_bench_job {
	u64 cycles;
	u64 frame_len;
	u64 frames, elapsed;
};

/* Keeps the transmit ring full of the prepared UDP frame for j->cycles. */
static u64 net_bench_run(u64 arg)
{
	struct net_bench_job *j = (struct net_bench_job *)arg;
	struct vq *q = &net.v.q[1];
	/* Every transmit buffer gets the same frame: the loop below only re-queues them. */
	const u8 *frame = net.txbuf + (u64)net.tx_free[0] * NET_BUF;
	for (u16 i = 0; i < q->size; i++)
		if (net.txbuf + (u64)i * NET_BUF != frame)
			memcpy(net.txbuf + (u64)i * NET_BUF, frame, NET_HDR_LEN + j->frame_len);
	u64 done0 = net.tx_done;
	u64 start = rdtsc(), now = start, progress = start;
	while (now - start < j->cycles && !net.error) {
		u64 before = net.tx_done;
		net_tx_reap();
		int queued = 0;
		while (net.tx_nfree) {
			int s = net.tx_free[--net.tx_nfree];
			net_tx_queue(s, j->frame_len);
			queued = 1;
		}
		if (queued)
			vq_publish(q);
		now = rdtsc();
		if (net.tx_done != before) {
			progress = now;
		} else if (now - progress > net.timeout) {
			net.error = "tx-timeout";
			break;
		} else {
			pause();
		}
	}
	j->frames = net.tx_done - done0;
	j->elapsed = rdtsc() - start;
	/* Let the frames in flight go out before the device is reset. */
	u64 t = rdtsc();
	while (net.tx_nfree < q->size && rdtsc() - t < net.timeout && !net.error)
		net_tx_reap();
	return 0;
}

/* netbench[:MS]: UDP datagrams of 1472 bytes to 10.0.0.1:5001 for MS ms (default 1000). */
int test_netbench(const char *arg)
{
	u64 ms = parse_u64(arg, 1000);
	char mac[18], peer[18];
	ram_reset();
	tsc_setup();
	const char *e = net_open();
	if (e)
		return net_fail("netbench", e);
	/* The peer's MAC, so the kernel takes the datagrams as addressed to it. */
	struct net_arp_job aj = {3, hz / 2, 1, hz / 10};
	user(net_arp_run, (u64)&aj);
	if (net.error)
		return net_fail("netbench", net.error);

	/* Build the frame in the first free transmit buffer. */
	u8 *f = net.txbuf + (u64)net.tx_free[0] * NET_BUF + NET_HDR_LEN;
	u64 flen = 14 + 20 + 8 + UDP_PAYLOAD;
	memcpy(f, net.have_peer ? net.peer : broadcast, 6);
	memcpy(f + 6, net.mac, 6);
	put16(f + 12, ETH_IP);
	u8 *ip = f + 14;
	ip[0] = 0x45;
	ip[1] = 0;
	put16(ip + 2, 20 + 8 + UDP_PAYLOAD);
	put16(ip + 4, 0);
	put16(ip + 6, 0x4000); /* DF */
	ip[8] = 64;
	ip[9] = 17;
	put16(ip + 10, 0);
	put32(ip + 12, GUEST_IP);
	put32(ip + 16, HOST_IP);
	put16(ip + 10, inet_csum(ip, 20));
	u8 *udp = ip + 20;
	put16(udp, UDP_SRC_PORT);
	put16(udp + 2, UDP_DST_PORT);
	put16(udp + 4, 8 + UDP_PAYLOAD);
	put16(udp + 6, 0); /* no checksum */
	for (u64 i = 0; i < UDP_PAYLOAD; i++)
		udp[8 + i] = (u8)i;

	struct net_bench_job j = {ms * (hz / 1000), flen, 0, 0};
	user(net_bench_run, (u64)&j);
	vdev_close(&net.v);
	u64 us = cycles_us(j.elapsed);
	mac_string(mac, net.mac);
	mac_string(peer, net.have_peer ? net.peer : broadcast);
	printk("KVMBOX-TEST netbench frames=%lu mbits=%lu frame_bytes=%lu us=%lu mac=%s peer_mac=%s "
	       "notifies=%lu tsc_hz=%lu tsc_source=%s",
	       j.frames, j.frames * UDP_PAYLOAD * 8 / us, flen, us, mac, peer, net.v.q[1].notifies,
	       hz, hz_source);
	if (net.error)
		printk(" error=%s", net.error);
	printk("\n");
	return net.error != NULL || j.frames == 0;
}

struct net_rx_job {
	u64 start;	       /* rdtsc before the device was opened */
	u64 seconds;	       /* to count after the first datagram */
	u64 first, end;	       /* rdtsc of the first datagram seen, of the end of the count */
	u64 frames, bytes;     /* datagrams to NETRX_PORT since `start`; their used lengths */
	u64 sec[NETRX_SECONDS]; /* their used lengths, second by second from `first` */
	u64 other;	       /* any other frame */
};

/* Whether a received frame (after the virtio header) is a UDP datagram to 10.0.0.2:NETRX_PORT. */
static int netrx_frame(const u8 *f, u64 len)
{
	if (len < 42 || be16(f + 12) != ETH_IP)
		return 0;
	const u8 *ip = f + 14;
	u64 ihl = (u64)(ip[0] & 0xf) * 4;
	if ((ip[0] >> 4) != 4 || ip[9] != 17 || ihl < 20 || 14 + ihl + 8 > len)
		return 0;
	return be32(ip + 16) == GUEST_IP && be16(ip + ihl + 2) == NETRX_PORT;
}

/*
 * Receives and counts for j->seconds after the first datagram (waits up to 10 s for it),
 * every receive buffer back on the ring at once.
 */
static u64 net_rx_run(u64 arg)
{
	struct net_rx_job *j = (struct net_rx_job *)arg;
	struct vq *q = &net.v.q[0];
	u64 deadline = 10 * hz;
	for (;;) {
		u64 now = rdtsc();
		if (j->first ? now - j->first >= j->seconds * hz : now - j->start >= deadline)
			break;
		u32 id, len;
		int any = 0;
		while (vq_used(q, &id, &len)) {
			if (id >= q->size) {
				net.error = "bad-rx-used-id";
				return 0;
			}
			net.rx_frames++;
			u8 *f = net.rxbuf + (u64)id * NET_BUF + NET_HDR_LEN;
			if (len >= NET_HDR_LEN && len <= NET_BUF && netrx_frame(f, len - NET_HDR_LEN)) {
				u64 t = rdtsc();
				if (!j->first)
					j->first = t;
				u64 s = (t - j->first) / hz;
				if (s < NETRX_SECONDS && s < j->seconds)
					j->sec[s] += len;
				j->frames++;
				j->bytes += len;
			} else {
				j->other++;
			}
			vq_add(q, (u16)id);
			any = 1;
		}
		if (any)
			vq_publish(q);
		else
			pause();
	}
	j->end = rdtsc();
	if (!j->first)
		net.error = "no-datagram";
	return 0;
}

/*
 * netrx[:S] (3): counts the UDP datagrams to 10.0.0.2:5002 the host sends, for S seconds
 * after the first one, and the bytes of their receive buffers the device used (virtio header
 * included: what an rx rate limiter counts), in total since just before the device was opened
 * and second by second from the first datagram. Answers nothing (not even ARP: the sender
 * needs a static neighbour entry for 52:54:00:12:34:56).
 */
int test_netrx(const char *arg)
{
	struct net_rx_job j;
	memset(&j, 0, sizeof(j));
	j.seconds = parse_u64(arg, 3);
	if (j.seconds == 0 || j.seconds > NETRX_SECONDS)
		j.seconds = 3;
	char mac[18];
	ram_reset();
	tsc_setup();
	j.start = rdtsc();
	const char *e = net_open();
	if (e)
		return net_fail("netrx", e);
	mac_string(mac, net.mac);
	printk("netrx: counting UDP to 10.0.0.2:%d at %s for %lu s after the first\n", NETRX_PORT,
	       mac, j.seconds);
	user(net_rx_run, (u64)&j);
	vdev_close(&net.v);
	printk("KVMBOX-TEST netrx frames=%lu bytes=%lu cycles=%lu first_cycles=%lu seconds=%lu "
	       "other=%lu mac=%s tsc_hz=%lu tsc_source=%s sec_bytes=",
	       j.frames, j.bytes, j.end - j.start, j.first ? j.first - j.start : 0, j.seconds,
	       j.other, mac, hz, hz_source);
	for (u64 i = 0; i < j.seconds; i++)
		printk(i ? ",%lu" : "%lu", j.sec[i]);
	if (net.error)
		printk(" error=%s", net.error);
	printk("\n");
	return net.error != NULL || j.frames == 0;
}

/* Answers until a "quit" datagram (no time limit: the VM runs until it ends or is killed). */
static u64 net_udpecho_run(u64 arg)
{
	(void)arg;
	while (!net.udp_quit && !net.error) {
		net_rx_poll();
		net_tx_reap();
		pause();
	}
	return 0;
}

/*
 * udpecho[:ID] (ID 0): 10.0.2.15 behind a user-mode NAT (passt, slirp) with gateway 10.0.2.2.
 * Asks for the gateway's MAC by ARP (which also tells a NAT that learns the guest's MAC from
 * its frames where the guest is), prints a ready line, then answers ARP and ping for
 * 10.0.2.15 and every UDP datagram to port 7 with its payload followed by ID in decimal,
 * until a datagram "quit" (answered like the others) ends the scenario.
 */
int test_udpecho(const char *arg)
{
	u64 id = parse_u64(arg, 0);
	char mac[18], gw[18];
	ram_reset();
	tsc_setup();
	const char *e = net_open();
	if (e)
		return net_fail("udpecho", e);
	net.ip = USER_GUEST_IP;
	net.peer_ip = USER_GW_IP;
	net.no_pad = 1;
	/* The ID in decimal, most significant digit first. */
	char digits[24];
	u64 n = 0, v = id;
	do {
		digits[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	for (u64 i = 0; i < n; i++)
		net.udp_id[i] = digits[n - 1 - i];
	net.udp_id_len = n;
	struct net_arp_job aj = {5, hz, 1, hz / 5};
	user(net_arp_run, (u64)&aj);
	if (net.error)
		return net_fail("udpecho", net.error);
	mac_string(mac, net.mac);
	mac_string(gw, net.have_peer ? net.peer : zero_mac);
	printk("udpecho: id=%lu answering UDP to 10.0.2.15:%d at %s, gateway 10.0.2.2 at %s\n", id,
	       UDPECHO_PORT, mac, gw);
	user(net_udpecho_run, 0);
	vdev_close(&net.v);
	printk("KVMBOX-TEST udpecho id=%lu mac=%s gateway_mac=%s arp_replies=%lu received=%lu "
	       "arp_answered=%lu udp_answered=%lu sent=%lu",
	       id, mac, gw, net.arp_replies, net.rx_frames, net.arp_answered, net.udp_answered,
	       net.tx_frames);
	if (net.error)
		printk(" error=%s", net.error);
	printk("\n");
	return net.error != NULL || net.arp_replies == 0 || !net.udp_quit;
}

/* ------------------------------------------------------------ virtio-rng */

struct rng_job {
	struct vq *q;
	u8 *buf;
	u64 want, got, timeout;
	const char *error;
};

static u64 rng_run(u64 arg)
{
	struct rng_job *j = (struct rng_job *)arg;
	struct vq *q = j->q;
	for (int round = 0; round < 64 && j->got < j->want; round++) {
		q->desc[0].addr = (u64)(j->buf + j->got);
		q->desc[0].len = (u32)(j->want - j->got);
		q->desc[0].flags = DESC_F_WRITE;
		q->desc[0].next = 0;
		vq_add(q, 0);
		vq_publish(q);
		u32 id, len;
		u64 t = rdtsc();
		while (!vq_used(q, &id, &len)) {
			if (rdtsc() - t > j->timeout) {
				j->error = "timeout";
				return 0;
			}
			pause();
		}
		if (id != 0 || len > j->want - j->got) {
			j->error = "bad-used-element";
			return 0;
		}
		j->got += len;
	}
	return 0;
}

/* rng: 64 bytes from virtio-rng; fails if they are all equal. */
int test_rng(const char *arg)
{
	(void)arg;
	static struct vdev d;
	ram_reset();
	tsc_setup();
	const char *e = vdev_open(&d, VIRTIO_RNG, 0);
	if (!e)
		e = vq_setup(&d, 0, VQ_MAX);
	u8 *buf = (u8 *)ram_alloc(4096);
	if (!e && !buf)
		e = "out-of-memory";
	if (e) {
		printk("KVMBOX-TEST rng error=%s\n", e);
		vdev_close(&d);
		return 1;
	}
	vdev_ready(&d);
	struct rng_job j = {&d.q[0], buf, 64, 0, 2 * hz, NULL};
	user(rng_run, (u64)&j);
	vdev_close(&d);
	if (j.error) {
		printk("KVMBOX-TEST rng error=%s bytes=%lu\n", j.error, j.got);
		return 1;
	}
	u8 seen[256];
	memset(seen, 0, sizeof(seen));
	u32 distinct = 0;
	for (u64 i = 0; i < j.got; i++)
		if (!seen[buf[i]]++)
			distinct++;
	printk("KVMBOX-TEST rng bytes=%lu distinct=%u\n", j.got, distinct);
	return j.got != 64 || distinct < 2;
}

/* ------------------------------------------------------------ virtio-vsock */

/* The 44-byte packet header (virtio 1.2, 5.10.6), little-endian like x86. */
struct vsock_hdr {
	u64 src_cid, dst_cid;
	u32 src_port, dst_port, len;
	u16 type, op;
	u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

enum { VS_REQUEST = 1, VS_RESPONSE = 2, VS_RST = 3, VS_SHUTDOWN = 4, VS_RW = 5 };
#define VS_RX_BUFS 8
#define VS_BUF 4096
#define VS_GUEST_PORT 7000 /* the guest's port for its connection to the host */
#define VS_HOST_PORT 1234  /* host port the guest connects to: the host's PATH_1234 */
#define VS_LISTEN_PORT 5000 /* the guest "listens" here for the host's CONNECT 5000 */

struct vsock_job {
	struct vq *rx, *tx;
	u8 *rxbuf, *txbuf;
	u64 cid, timeout;
	u32 fwd; /* data bytes consumed on the current connection, in every header */
	const char *error;
	char got[64]; /* data of the last packet received */
	char h2g[64]; /* what the host sent on its connection */
};

static void vs_send(struct vsock_job *j, u16 op, u32 sport, u32 dport, u32 flags, const char *data)
{
	struct vsock_hdr *h = (struct vsock_hdr *)j->txbuf;
	u32 n = data ? (u32)strlen(data) : 0;
	memset(h, 0, sizeof(*h));
	h->src_cid = j->cid;
	h->dst_cid = 2;
	h->src_port = sport;
	h->dst_port = dport;
	h->len = n;
	h->type = 1;
	h->op = op;
	h->flags = flags;
	h->buf_alloc = 65536;
	h->fwd_cnt = j->fwd;
	if (n)
		memcpy(j->txbuf + sizeof(*h), data, n);
	struct vq *q = j->tx;
	q->desc[0].addr = (u64)j->txbuf;
	q->desc[0].len = (u32)sizeof(*h) + n;
	q->desc[0].flags = 0;
	q->desc[0].next = 0;
	vq_add(q, 0);
	vq_publish(q);
	u32 id, len;
	u64 t = rdtsc();
	while (!vq_used(q, &id, &len)) {
		if (rdtsc() - t > j->timeout) {
			j->error = "tx-timeout";
			return;
		}
		pause();
	}
}

/* Waits for the next packet; copies it out and gives the buffer back. 0 on timeout. */
static int vs_recv(struct vsock_job *j, struct vsock_hdr *out)
{
	struct vq *q = j->rx;
	u32 id, len;
	u64 t = rdtsc();
	while (!vq_used(q, &id, &len)) {
		if (rdtsc() - t > j->timeout) {
			j->error = "rx-timeout";
			return 0;
		}
		pause();
	}
	if (id >= VS_RX_BUFS || len < sizeof(*out) || len > VS_BUF) {
		j->error = "bad-used-element";
		return 0;
	}
	u8 *b = j->rxbuf + id * VS_BUF;
	memcpy(out, b, sizeof(*out));
	u32 n = out->len < sizeof(j->got) - 1 ? out->len : (u32)sizeof(j->got) - 1;
	if (out->len != len - sizeof(*out)) {
		j->error = "bad-length";
		return 0;
	}
	memcpy(j->got, b + sizeof(*out), n);
	j->got[n] = 0;
	if (out->op == VS_RW)
		j->fwd += out->len;
	vq_add(q, (u16)id);
	vq_publish(q);
	return 1;
}

/* The next packet must be `op` between `sport` (host) and `dport` (guest). */
static int vs_expect(struct vsock_job *j, u16 op, u32 sport, u32 dport, const char *why)
{
	struct vsock_hdr h;
	if (!vs_recv(j, &h))
		return 0;
	if (h.op != op || h.src_port != sport || h.dst_port != dport || h.src_cid != 2 ||
	    h.dst_cid != j->cid) {
		j->error = why;
		return 0;
	}
	return 1;
}

static u64 vsock_run(u64 arg)
{
	struct vsock_job *j = (struct vsock_job *)arg;
	struct vq *rx = j->rx;
	for (u16 i = 0; i < VS_RX_BUFS; i++) {
		rx->desc[i].addr = (u64)(j->rxbuf + i * VS_BUF);
		rx->desc[i].len = VS_BUF;
		rx->desc[i].flags = DESC_F_WRITE;
		rx->desc[i].next = 0;
		vq_add(rx, i);
	}
	vq_publish(rx);
	/* Guest to host: connect to host port 1234, send, read the echo, close. */
	vs_send(j, VS_REQUEST, VS_GUEST_PORT, VS_HOST_PORT, 0, NULL);
	if (j->error || !vs_expect(j, VS_RESPONSE, VS_HOST_PORT, VS_GUEST_PORT, "g2h-no-response"))
		return 1;
	vs_send(j, VS_RW, VS_GUEST_PORT, VS_HOST_PORT, 0, "ping-from-guest");
	if (j->error || !vs_expect(j, VS_RW, VS_HOST_PORT, VS_GUEST_PORT, "g2h-no-echo"))
		return 1;
	if (strlen(j->got) != 15 || memcmp(j->got, "ping-from-guest", 15)) {
		j->error = "g2h-wrong-echo";
		return 1;
	}
	vs_send(j, VS_SHUTDOWN, VS_GUEST_PORT, VS_HOST_PORT, 3, NULL);
	if (j->error || !vs_expect(j, VS_RST, VS_HOST_PORT, VS_GUEST_PORT, "g2h-no-rst"))
		return 1;
	/* Host to guest: the host's CONNECT 5000 arrives as a REQUEST; accept, echo, close. */
	struct vsock_hdr h;
	if (!vs_recv(j, &h))
		return 1;
	if (h.op != VS_REQUEST || h.dst_port != VS_LISTEN_PORT) {
		j->error = "h2g-no-request";
		return 1;
	}
	u32 hp = h.src_port;
	j->fwd = 0; /* credit counts per connection */
	vs_send(j, VS_RESPONSE, VS_LISTEN_PORT, hp, 0, NULL);
	if (j->error || !vs_expect(j, VS_RW, hp, VS_LISTEN_PORT, "h2g-no-data"))
		return 1;
	memcpy(j->h2g, j->got, sizeof(j->h2g));
	vs_send(j, VS_RW, VS_LISTEN_PORT, hp, 0, j->h2g);
	if (j->error || !vs_expect(j, VS_SHUTDOWN, hp, VS_LISTEN_PORT, "h2g-no-shutdown"))
		return 1;
	vs_send(j, VS_RST, VS_LISTEN_PORT, hp, 0, NULL);
	/* A request to a host port nobody listens on is refused. */
	vs_send(j, VS_REQUEST, VS_GUEST_PORT + 1, 4321, 0, NULL);
	if (j->error || !vs_expect(j, VS_RST, 4321, VS_GUEST_PORT + 1, "no-refusal"))
		return 1;
	return 0;
}

/*
 * vsock: with `--vsock cid=3,uds=PATH` and a host test that echoes on PATH_1234 and then
 * connects to PATH with "CONNECT 5000": the guest's connection to host port 1234 (data
 * echoed back), the host's connection to guest port 5000 (data echoed back), a refusal.
 */
int test_vsock(const char *arg)
{
	(void)arg;
	static struct vdev d;
	ram_reset();
	tsc_setup();
	const char *e = vdev_open(&d, VIRTIO_VSOCK, 0);
	for (u16 i = 0; !e && i < 3; i++)
		e = vq_setup(&d, i, 64);
	u8 *rxbuf = (u8 *)ram_alloc(VS_RX_BUFS * VS_BUF);
	u8 *txbuf = (u8 *)ram_alloc(VS_BUF);
	if (!e && (!rxbuf || !txbuf))
		e = "out-of-memory";
	if (e) {
		printk("KVMBOX-TEST vsock error=%s\n", e);
		vdev_close(&d);
		return 1;
	}
	static struct vsock_job j;
	memset(&j, 0, sizeof(j));
	j.rx = &d.q[0];
	j.tx = &d.q[1];
	j.rxbuf = rxbuf;
	j.txbuf = txbuf;
	j.timeout = 20 * hz;
	j.cid = devcfg_read64(&d, 0);
	vdev_ready(&d);
	user(vsock_run, (u64)&j);
	vdev_close(&d);
	if (j.error) {
		printk("KVMBOX-TEST vsock error=%s cid=%lu\n", j.error, j.cid);
		return 1;
	}
	printk("KVMBOX-TEST vsock cid=%lu h2g=%s\n", j.cid, j.h2g);
	return 0;
}

/* ------------------------------------------------------------ raw queue access (attack.c) */

/*
 * attack.c drives one queue of one device by hand, with whatever descriptors and ring
 * addresses it likes: queue 0, or for virtio-net queue 1 (transmit: receive only moves when
 * the host sends). rings != 0 moves that queue's rings there (desc, avail, used 4 KiB apart)
 * before DRIVER_OK. No EVENT_IDX: every publish notifies.
 */
static struct vdev raw_dev;
static u16 raw_qi;

const char *vio_open(u16 type, u64 rings)
{
	ram_reset();
	const char *e = vdev_open(&raw_dev, type, 0);
	raw_qi = type == VIRTIO_NET ? 1 : 0;
	for (u16 i = 0; !e && i <= raw_qi; i++)
		e = vq_setup(&raw_dev, i, VQ_MAX);
	if (e) {
		vdev_close(&raw_dev);
		return e;
	}
	if (rings) {
		u64 cc = raw_dev.common;
		mmio_write16(cc + CC_QSELECT, raw_qi);
		vq_set_rings(cc, rings);
	}
	vdev_ready(&raw_dev);
	return NULL;
}

u16 vio_qsize(void)
{
	return raw_dev.q[raw_qi].size;
}

u64 vio_alloc(u64 size)
{
	return ram_alloc(size);
}

void vio_desc(u16 i, u64 addr, u32 len, u16 flags, u16 next)
{
	struct vring_desc *d = &raw_dev.q[raw_qi].desc[i & (raw_dev.q[raw_qi].size - 1)];
	d->addr = addr;
	d->len = len;
	d->flags = flags;
	d->next = next;
}

/* Puts `head` on the available ring, advances the index by `advance` and notifies. */
void vio_submit(u16 head, u16 advance)
{
	struct vq *q = &raw_dev.q[raw_qi];
	q->avail[2 + (q->next_avail & (q->size - 1))] = head;
	q->next_avail = (u16)(q->next_avail + advance);
	barrier();
	q->avail[1] = q->next_avail;
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	mmio_write16(q->notify, 0);
}

/* Writes `value` to the queue's notify register (any value: a queue index that may not exist). */
void vio_notify(u16 value)
{
	mmio_write16(raw_dev.q[raw_qi].notify, value);
}

u16 vio_used_idx(void)
{
	return raw_dev.q[raw_qi].used[1];
}

/* The first used element's length. */
u32 vio_used_len(u16 i)
{
	return raw_dev.q[raw_qi].elems[i & (raw_dev.q[raw_qi].size - 1)].len;
}

u8 vio_status(void)
{
	return mmio_read8(raw_dev.common + CC_STATUS);
}

void vio_close(void)
{
	vdev_close(&raw_dev);
}

/*
 * Enables MSI-X on the raw device with table entry 0 = (addr, data), unmasked, asks for an
 * interrupt on every used buffer of queue 0 and writes `vector` as that queue's MSI-X vector.
 * Returns the vector the device reports back (0xffff: it refused), 0xfffe if there is no
 * MSI-X capability.
 */
u16 vio_msix(u64 addr, u32 data, u16 vector)
{
	u32 bdf = raw_dev.bdf, ptr = pci_read(bdf, 0x34) & 0xfc;
	for (u32 n = 0; ptr >= 0x40 && n < 48 && (pci_read(bdf, ptr) & 0xff) != 0x11; n++)
		ptr = (pci_read(bdf, ptr) >> 8) & 0xfc;
	if (ptr < 0x40 || (pci_read(bdf, ptr) & 0xff) != 0x11)
		return 0xfffe;
	u32 table = pci_read(bdf, ptr + 4);
	u64 entry = pci_bar(bdf, table & 7) + (table & ~7u);
	pci_write(bdf, ptr, pci_read(bdf, ptr) | (1u << 31)); /* Message Control: MSI-X enable */
	mmio_write32(entry, (u32)addr);
	mmio_write32(entry + 4, (u32)(addr >> 32));
	mmio_write32(entry + 8, data);
	mmio_write32(entry + 12, 0); /* unmasked */
	u64 cc = raw_dev.common;
	mmio_write16(cc + CC_QSELECT, raw_qi);
	mmio_write16(cc + CC_QMSIX, vector);
	raw_dev.q[raw_qi].avail[0] = 0; /* interrupts wanted */
	return mmio_read16(cc + CC_QMSIX);
}

/* ------------------------------------------- virtio-blk for scenarios in other files */

static struct blk_dev vblk;

/* Opens the first virtio-blk (resetting this file's allocator); capacity in sectors and the
 * disk's serial (printable, "-" if none; valid until the next open). */
const char *vblk_open(u64 *sectors, const char **serial)
{
	ram_reset();
	tsc_setup();
	const char *e = blk_open(&vblk);
	if (e)
		return e;
	*sectors = vblk.capacity;
	*serial = vblk.serial;
	return NULL;
}

/* Guest RAM for request data, usable from ring 3; NULL when out of memory. */
void *vblk_alloc(u64 bytes)
{
	return (void *)ram_alloc(bytes);
}

/* One request, waited for: BLK_T_OUT / BLK_T_IN of `bytes` (a multiple of 512, at most 1 MiB)
 * from / into `buf` at `sector`, or a FLUSH. NULL on success, else what failed. */
static const char *vblk_request(u32 type, u64 sector, void *buf, u64 bytes)
{
	struct blk_job j;
	blk_job_init(&vblk, &j, type);
	j.bytes = bytes;
	j.count = 1;
	j.first_sector = sector;
	j.span_sectors = bytes ? bytes / 512 : 1;
	j.buf = buf;
	user(blk_run, (u64)&j);
	if (j.error)
		return j.error;
	return j.failed ? "request-failed" : NULL;
}

const char *vblk_write(u64 sector, void *buf, u64 bytes)
{
	return vblk_request(BLK_T_OUT, sector, buf, bytes);
}

const char *vblk_read(u64 sector, void *buf, u64 bytes)
{
	return vblk_request(BLK_T_IN, sector, buf, bytes);
}

const char *vblk_flush(void)
{
	if (!(vblk.v.features & BLK_F_FLUSH))
		return "no-flush-feature";
	return vblk_request(BLK_T_FLUSH, 0, NULL, 0);
}

void vblk_close(void)
{
	vdev_close(&vblk.v);
}
