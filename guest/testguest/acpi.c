/*
 * ACPI walk: RSDP -> XSDT/RSDT -> every table (checksums), FADT -> DSDT, MADT -> CPUs and
 * IOAPIC. Pure memory reads, so it runs in ring 3 (ring 0 is emulated and slow on this host).
 */
#include "tg.h"

#define MAX_TABLE_LEN (16UL << 20)

struct acpi_info acpi;

static int mapped(u64 addr, u64 len)
{
	return addr + len >= addr && addr + len <= boot.mapped_top;
}

static int checksum_ok(const u8 *p, u64 len)
{
	u8 sum = 0;
	for (u64 i = 0; i < len; i++)
		sum = (u8)(sum + p[i]);
	return sum == 0;
}

static u32 rd32(const u8 *p)
{
	return (u32)p[0] | (u32)p[1] << 8 | (u32)p[2] << 16 | (u32)p[3] << 24;
}

static u64 rd64(const u8 *p)
{
	return rd32(p) | (u64)rd32(p + 4) << 32;
}

static void problem(const char *what)
{
	acpi.checksums_ok = 0;
	if (!acpi.error)
		acpi.error = what;
}

static int rsdp_valid(u64 addr)
{
	if (!mapped(addr, 36))
		return 0;
	const u8 *p = (const u8 *)addr;
	if (memcmp(p, "RSD PTR ", 8) || !checksum_ok(p, 20))
		return 0;
	if (p[15] >= 2 && !checksum_ok(p, 36))
		return 0;
	return 1;
}

/* Returns the table's length if its header is sane and mapped, else 0. */
static u32 table_len(u64 addr)
{
	if (!addr || !mapped(addr, 36))
		return 0;
	u32 len = rd32((const u8 *)addr + 4);
	if (len < 36 || len > MAX_TABLE_LEN || !mapped(addr, len))
		return 0;
	return len;
}

static void parse_madt(const u8 *t, u32 len)
{
	u32 off = 44;
	while (off + 2 <= len) {
		u8 type = t[off], elen = t[off + 1];
		if (elen < 2 || off + elen > len) {
			problem("madt-bad-entry");
			return;
		}
		const u8 *e = t + off;
		if (type == 0 && elen >= 8 && (rd32(e + 4) & 1)) {
			if (acpi.nr_cpus < MAX_CPUS)
				acpi.apic_ids[acpi.nr_cpus] = e[3];
			acpi.nr_cpus++;
		} else if (type == 9 && elen >= 16 && (rd32(e + 8) & 1)) {
			if (acpi.nr_cpus < MAX_CPUS)
				acpi.apic_ids[acpi.nr_cpus] = rd32(e + 4);
			acpi.nr_cpus++;
		} else if (type == 1 && elen >= 12 && !acpi.ioapic) {
			acpi.ioapic = rd32(e + 4);
			acpi.ioapic_gsi_base = rd32(e + 8);
		} else if (type == 2 && elen >= 10 && e[2] == 0 && e[3] < 16) {
			/* Interrupt source override: ISA IRQ e[3] is GSI rd32(e + 4). */
			acpi.isa_gsi[e[3]] = rd32(e + 4);
			acpi.isa_flags[e[3]] = (u16)(e[8] | e[9] << 8);
		}
		off += elen;
	}
}

/*
 * SLP_TYPa of `Name (NAME, Package () { a, b, ... })` (NAME: "_S5_", "_S3_") in the DSDT's
 * AML, or -1. Only the encodings a Name of a constant package uses: NameOp (optionally with a
 * root prefix '\'), PackageOp, PkgLength, NumElements, then ZeroOp / OneOp / BytePrefix /
 * WordPrefix.
 */
static int find_sleep_type(const u8 *d, u32 len, const char *name)
{
	for (u32 i = 36 + 1; i + 4 <= len; i++) {
		if (memcmp(d + i, name, 4))
			continue;
		if (d[i - 1] != 0x08 && !(d[i - 1] == '\\' && i >= 38 && d[i - 2] == 0x08))
			continue;
		u32 p = i + 4;
		if (p + 2 > len || d[p] != 0x12) /* PackageOp */
			continue;
		p += 1 + 1 + (d[p + 1] >> 6); /* PkgLength: lead byte + 0-3 more */
		p += 1;			   /* NumElements */
		if (p >= len)
			return -1;
		switch (d[p]) {
		case 0x00: /* ZeroOp */
			return 0;
		case 0x01: /* OneOp */
			return 1;
		case 0x0a: /* BytePrefix */
			return p + 1 < len ? d[p + 1] & 7 : -1;
		case 0x0b: /* WordPrefix */
			return p + 2 < len ? d[p + 1] & 7 : -1;
		default:
			return -1;
		}
	}
	return -1;
}

/* Power-management facts from the FADT (ACPI 6.x offsets; older, shorter FADTs have fewer). */
static void parse_fadt(const u8 *f, u32 len)
{
	/* FIRMWARE_CTRL at 36; X_FIRMWARE_CTRL at 132 when FIRMWARE_CTRL is 0. */
	if (len >= 40)
		acpi.facs = rd32(f + 36);
	if (!acpi.facs && len >= 140)
		acpi.facs = rd64(f + 132);
	if (len >= 60)
		acpi.pm1a_evt = rd32(f + 56);
	/* X_PM1a_EVT_BLK (a Generic Address Structure at 148) wins when it names I/O space. */
	if (len >= 160 && f[148] == 1 && rd64(f + 152)) {
		u64 port = rd64(f + 152);
		acpi.pm1a_evt = port <= 0xffff ? (u32)port : 0xffffffff;
	}
	if (len >= 68)
		acpi.pm1a_cnt = rd32(f + 64);
	/* X_PM1a_CNT_BLK (a Generic Address Structure at 172) wins when it names I/O space. */
	if (len >= 184 && f[172] == 1 && rd64(f + 176)) {
		u64 port = rd64(f + 176);
		acpi.pm1a_cnt = port <= 0xffff ? (u32)port : 0xffffffff;
	}
	/* Flags at 112, RESET_REG_SUP is bit 10; RESET_REG at 116 (I/O space), RESET_VALUE at 128. */
	if (len >= 129 && (rd32(f + 112) & (1u << 10)) && f[116] == 1) {
		u64 port = rd64(f + 120);
		acpi.reset_supported = 1;
		acpi.reset_port = port <= 0xffff ? (u32)port : 0xffffffff;
		acpi.reset_value = f[128];
	}
}

static void check_dsdt(const u8 *fadt, u32 len)
{
	u64 dsdt = 0;
	if (len >= 148)
		dsdt = rd64(fadt + 140);
	if (!dsdt && len >= 44)
		dsdt = rd32(fadt + 40);
	if (!dsdt)
		return;
	u32 dlen = table_len(dsdt);
	if (!dlen || memcmp((const u8 *)dsdt, "DSDT", 4)) {
		problem("bad-dsdt");
		return;
	}
	if (!checksum_ok((const u8 *)dsdt, dlen))
		problem("dsdt-checksum");
	acpi.dsdt = 1;
	acpi.s5_slp_typ = find_sleep_type((const u8 *)dsdt, dlen, "_S5_");
	acpi.s3_slp_typ = find_sleep_type((const u8 *)dsdt, dlen, "_S3_");
}

static u64 acpi_walk(u64 unused)
{
	(void)unused;
	u64 rsdp = 0;
	acpi.checksums_ok = 1;
	if (boot.rsdp && rsdp_valid(boot.rsdp))
		rsdp = boot.rsdp;
	for (u64 a = 0xe0000; !rsdp && a < 0x100000; a += 16)
		if (rsdp_valid(a))
			rsdp = a;
	if (!rsdp) {
		problem("no-rsdp");
		return 0;
	}
	acpi.found = 1;
	acpi.rsdp_addr = rsdp;
	const u8 *p = (const u8 *)rsdp;
	acpi.rsdp_rev = p[15];
	u64 root = rd32(p + 16);
	u32 esize = 4;
	if (p[15] >= 2 && rd64(p + 24)) {
		root = rd64(p + 24);
		esize = 8;
	}
	u32 rlen = table_len(root);
	if (!rlen) {
		problem("bad-root-table");
		return 0;
	}
	const u8 *r = (const u8 *)root;
	if (memcmp(r, esize == 8 ? "XSDT" : "RSDT", 4))
		problem("bad-root-signature");
	if (!checksum_ok(r, rlen))
		problem("root-checksum");
	for (u32 off = 36; off + esize <= rlen; off += esize) {
		u64 addr = esize == 8 ? rd64(r + off) : rd32(r + off);
		u32 len = table_len(addr);
		if (!len) {
			problem("bad-table-header");
			continue;
		}
		const u8 *t = (const u8 *)addr;
		if (!checksum_ok(t, len))
			problem("table-checksum");
		if (acpi.nr_tables < MAX_TABLES) {
			for (int i = 0; i < 4; i++) {
				char c = (char)t[i];
				acpi.sigs[acpi.nr_tables][i] = (c >= 0x21 && c < 0x7f && c != ',') ? c : '?';
			}
			acpi.sigs[acpi.nr_tables][4] = 0;
			acpi.nr_tables++;
		}
		if (!memcmp(t, "APIC", 4))
			parse_madt(t, len);
		else if (!memcmp(t, "FACP", 4)) {
			parse_fadt(t, len);
			check_dsdt(t, len);
		}
	}
	return 0;
}

/* Walks the ACPI tables once (in ring 3) and caches the result in `acpi`. */
void acpi_parse(void)
{
	memset(&acpi, 0, sizeof(acpi));
	acpi.s5_slp_typ = -1;
	acpi.s3_slp_typ = -1;
	for (u32 i = 0; i < 16; i++)
		acpi.isa_gsi[i] = i;
	user(acpi_walk, 0);
	acpi.parsed = 1;
}
