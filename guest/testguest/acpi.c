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
		}
		off += elen;
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
		else if (!memcmp(t, "FACP", 4))
			check_dsdt(t, len);
	}
	return 0;
}

/* Walks the ACPI tables once (in ring 3) and caches the result in `acpi`. */
void acpi_parse(void)
{
	memset(&acpi, 0, sizeof(acpi));
	user(acpi_walk, 0);
	acpi.parsed = 1;
}
