//! fw_cfg through its ports, as a guest drives it (a guest reading it for real is in
//! crates/kvmbox/tests).

use super::*;

const IO: u64 = 0x510;
const DMA: u64 = 0x514;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

fn machine() -> Machine {
    Machine {
        cpus: 3,
        ram_size: 256 << 20,
        e820: vec![(0, 0x9fc00, 1), (0x10_0000, 0xff0_0000, 1)],
        kernel: Some((0x40_0000, 0x41_0000, 0x40_000c)),
        initrd: Some((0x41_0000, 0x41_0100)),
        cmdline: Some((0x2_0000, "a b".into())),
    }
}

fn select(d: &mut FwCfg, key: u16) {
    d.write(IO, 0, &key.to_le_bytes());
}

fn read_bytes(d: &mut FwCfg, n: usize) -> Vec<u8> {
    (0..n)
        .map(|_| {
            let mut b = [0u8];
            d.read(IO, 1, &mut b);
            b[0]
        })
        .collect()
}

fn read_item(d: &mut FwCfg, key: u16, n: usize) -> Vec<u8> {
    select(d, key);
    read_bytes(d, n)
}

#[test]
fn pc_items_through_the_data_port() {
    let mut d = FwCfg::with_machine(mem(), DMA, &machine()).unwrap();
    assert_eq!(read_item(&mut d, FW_CFG_SIGNATURE, 4), b"QEMU");
    assert_eq!(read_item(&mut d, FW_CFG_ID, 4), [3, 0, 0, 0]);
    assert_eq!(read_item(&mut d, FW_CFG_NB_CPUS, 2), [3, 0]);
    assert_eq!(read_item(&mut d, FW_CFG_MAX_CPUS, 2), [3, 0]);
    assert_eq!(
        read_item(&mut d, FW_CFG_RAM_SIZE, 8),
        (256u64 << 20).to_le_bytes()
    );
    assert_eq!(read_item(&mut d, FW_CFG_CMDLINE_DATA, 5), b"a b\0\0");
    assert_eq!(
        read_item(&mut d, FW_CFG_KERNEL_ENTRY, 4),
        0x40_000cu32.to_le_bytes()
    );
    assert_eq!(read_item(&mut d, FW_CFG_INITRD_SIZE, 4), [0, 1, 0, 0]);
    assert_eq!(read_item(&mut d, FW_CFG_IRQ0_OVERRIDE, 4), [1, 0, 0, 0]);
    // Unknown keys and reads past an item's end give zeros; the write channel bit is ignored.
    assert_eq!(read_item(&mut d, 0x1234, 3), [0, 0, 0]);
    assert_eq!(
        read_item(&mut d, FW_CFG_NB_CPUS | FW_CFG_WRITE_CHANNEL, 2),
        [3, 0]
    );
    // Data-port writes change nothing.
    select(&mut d, FW_CFG_NB_CPUS);
    d.write(IO, 1, &[9]);
    assert_eq!(read_bytes(&mut d, 2), [3, 0]);
    // The DMA register reads as "QEMU CFG".
    let mut sig = [0u8; 8];
    d.read(DMA, 0, &mut sig);
    assert_eq!(&sig, b"QEMU CFG");
}

#[test]
fn file_directory_finds_etc_e820() {
    let mut d = FwCfg::with_machine(mem(), DMA, &machine()).unwrap();
    d.add_file("zz/last", vec![1, 2, 3]).unwrap();
    let sel = d.add_file("bootorder", b"/x\0".to_vec()).unwrap();
    assert_eq!(sel, FW_CFG_FILE_FIRST, "sorted by name");
    let count = u32::from_be_bytes(read_item(&mut d, FW_CFG_FILE_DIR, 4).try_into().unwrap());
    assert_eq!(count, 3);
    let mut found = BTreeMap::new();
    for _ in 0..count {
        let e = read_bytes(&mut d, 64);
        let size = u32::from_be_bytes(e[0..4].try_into().unwrap());
        let sel = u16::from_be_bytes(e[4..6].try_into().unwrap());
        let name: Vec<u8> = e[8..].iter().copied().take_while(|&b| b != 0).collect();
        found.insert(String::from_utf8(name).unwrap(), (sel, size));
    }
    let (sel, size) = found["etc/e820"];
    assert_eq!(size, 40);
    let e820 = read_item(&mut d, sel, 40);
    assert_eq!(&e820[20..28], &0x10_0000u64.to_le_bytes());
    assert_eq!(&e820[36..40], &1u32.to_le_bytes());
    assert_eq!(read_item(&mut d, found["zz/last"].0, 3), [1, 2, 3]);
    assert_eq!(
        d.add_file("bootorder", vec![]),
        Err(FwCfgError::DuplicateFile("bootorder".into()))
    );
    assert!(d.add_file(&"x".repeat(56), vec![]).is_err());
}

/// Write a DMA request at `at` and start it through two 32-bit writes (high, then low).
fn dma(d: &mut FwCfg, at: u64, control: u32, len: u32, addr: u64) -> u32 {
    let mut req = Vec::new();
    req.extend_from_slice(&control.to_be_bytes());
    req.extend_from_slice(&len.to_be_bytes());
    req.extend_from_slice(&addr.to_be_bytes());
    d.mem.write_slice(&req, GuestAddress(at)).unwrap();
    d.write(DMA, 0, &((at >> 32) as u32).to_be_bytes());
    d.write(DMA, 4, &(at as u32).to_be_bytes());
    let mut c = [0u8; 4];
    d.mem.read_slice(&mut c, GuestAddress(at)).unwrap();
    u32::from_be_bytes(c)
}

#[test]
fn dma_reads_skips_and_zero_fills() {
    let mut d = FwCfg::with_machine(mem(), DMA, &machine()).unwrap();
    let sel = u32::from(FW_CFG_SIGNATURE) << 16;
    d.mem
        .write_slice(&[0xee; 16], GuestAddress(0x2000))
        .unwrap();
    let st = dma(
        &mut d,
        0x1000,
        sel | DMA_CTL_SELECT | DMA_CTL_READ,
        8,
        0x2000,
    );
    assert_eq!(st, 0);
    let mut got = [0u8; 9];
    d.mem.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
    assert_eq!(
        &got, b"QEMU\0\0\0\0\xee",
        "zero-filled past the item, no further"
    );
    // Skip then read continues where the skip left off.
    let sel = u32::from(FW_CFG_CMDLINE_DATA) << 16;
    assert_eq!(
        dma(&mut d, 0x1000, sel | DMA_CTL_SELECT | DMA_CTL_SKIP, 2, 0),
        0
    );
    assert_eq!(dma(&mut d, 0x1000, DMA_CTL_READ, 2, 0x3000), 0);
    let mut got = [0u8; 2];
    d.mem.read_slice(&mut got, GuestAddress(0x3000)).unwrap();
    assert_eq!(&got, b"b\0");
    // One 64-bit write of the address starts a request too.
    let mut req = Vec::new();
    req.extend_from_slice(&((u32::from(FW_CFG_NB_CPUS) << 16) | 0xa).to_be_bytes());
    req.extend_from_slice(&2u32.to_be_bytes());
    req.extend_from_slice(&0x4000u64.to_be_bytes());
    d.mem.write_slice(&req, GuestAddress(0x1000)).unwrap();
    d.write(DMA, 0, &0x1000u64.to_be_bytes());
    let v: u16 = d.mem.read_obj(GuestAddress(0x4000)).unwrap();
    assert_eq!(v, 3);
}

#[test]
fn hostile_dma_requests_fail_cleanly() {
    let mut d = FwCfg::with_machine(mem(), DMA, &machine()).unwrap();
    let sel = u32::from(FW_CFG_FILE_DIR) << 16 | DMA_CTL_SELECT | DMA_CTL_READ;
    // A target outside guest RAM, one that runs off its end, and one that wraps.
    assert_eq!(dma(&mut d, 0x1000, sel, 16, 0x1_0000_0000), DMA_CTL_ERROR);
    assert_eq!(
        dma(&mut d, 0x1000, sel, 0x1000, (1 << 20) - 8),
        DMA_CTL_ERROR
    );
    assert_eq!(dma(&mut d, 0x1000, sel, 16, u64::MAX - 4), DMA_CTL_ERROR);
    // The largest length: zero-fills to the end of RAM, then stops with an error.
    assert_eq!(dma(&mut d, 0x1000, sel, u32::MAX, 0x8_0000), DMA_CTL_ERROR);
    // Writes are refused.
    assert_eq!(dma(&mut d, 0x1000, DMA_CTL_WRITE, 4, 0x2000), DMA_CTL_ERROR);
    // A request outside RAM is ignored.
    d.write(DMA, 0, &0xffff_ffffu32.to_be_bytes());
    d.write(DMA, 4, &0xffff_fff0u32.to_be_bytes());
    // Odd access sizes and offsets do nothing.
    d.write(DMA, 2, &[1, 2]);
    d.write(IO, 0, &[5]);
    let mut b = [0u8; 4];
    d.read(IO, 0, &mut b);
    assert_eq!(b, [0; 4]);
}
