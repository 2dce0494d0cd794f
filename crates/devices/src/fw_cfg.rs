//! QEMU's firmware configuration interface (fw_cfg), as firmware (SeaBIOS, OVMF) and test
//! kernels (kvm-unit-tests) read it on a PC: a 16-bit selector port, a data port read a byte at
//! a time, and a DMA interface whose 64-bit big-endian address register makes the device read a
//! request (control, length, address) from guest memory, carry it out and write the result back.
//!
//! Items are numbered (`FW_CFG_*` keys) or named files listed in the file directory
//! ([`FW_CFG_FILE_DIR`]). [`FwCfg::add_item`] and [`FwCfg::add_file`] add any item, so firmware
//! that needs more (ACPI tables, a boot order, SMBIOS) only needs more calls.
//!
//! Everything the guest controls is checked: a DMA request's address and length are guest
//! values, so the device copies only within guest RAM (an access outside it ends the request
//! with the error bit), never more than the item holds, and zero-fills past its end as QEMU does.

use crate::BusDevice;
use kvmbox_cpu::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use vm_memory::{Bytes, GuestAddress};

/// "QEMU": item 0.
pub const FW_CFG_SIGNATURE: u16 = 0x00;
/// Feature bits: 1 = the traditional interface, 2 = DMA.
pub const FW_CFG_ID: u16 = 0x01;
/// The machine's UUID (16 bytes).
pub const FW_CFG_UUID: u16 = 0x02;
/// RAM size in bytes (u64).
pub const FW_CFG_RAM_SIZE: u16 = 0x03;
/// Whether there is no graphical console (u16).
pub const FW_CFG_NOGRAPHIC: u16 = 0x04;
/// vCPUs at boot (u16).
pub const FW_CFG_NB_CPUS: u16 = 0x05;
/// Where the kernel was loaded (u32).
pub const FW_CFG_KERNEL_ADDR: u16 = 0x07;
/// Kernel size (u32).
pub const FW_CFG_KERNEL_SIZE: u16 = 0x08;
/// Where the kernel command line is in guest memory (u32).
pub const FW_CFG_KERNEL_CMDLINE: u16 = 0x09;
/// Where the initrd was loaded (u32).
pub const FW_CFG_INITRD_ADDR: u16 = 0x0a;
/// Initrd size (u32).
pub const FW_CFG_INITRD_SIZE: u16 = 0x0b;
/// Boot menu enabled (u16).
pub const FW_CFG_BOOT_MENU: u16 = 0x0e;
/// Most vCPUs the machine can have (u16).
pub const FW_CFG_MAX_CPUS: u16 = 0x0f;
/// Kernel entry point (u32).
pub const FW_CFG_KERNEL_ENTRY: u16 = 0x10;
/// Command-line address (u32).
pub const FW_CFG_CMDLINE_ADDR: u16 = 0x13;
/// Command-line size including the NUL (u32).
pub const FW_CFG_CMDLINE_SIZE: u16 = 0x14;
/// The command line's bytes, NUL-terminated.
pub const FW_CFG_CMDLINE_DATA: u16 = 0x15;
/// The file directory: a big-endian count, then 64-byte entries.
pub const FW_CFG_FILE_DIR: u16 = 0x19;
/// Selector of the first named file.
pub const FW_CFG_FILE_FIRST: u16 = 0x20;
/// Architecture-specific items have this bit.
pub const FW_CFG_ARCH_LOCAL: u16 = 0x8000;
/// x86: IRQ0 is routed to IOAPIC pin 2 (u32 1).
pub const FW_CFG_IRQ0_OVERRIDE: u16 = FW_CFG_ARCH_LOCAL + 2;
/// A selector with this bit asks for writing (kvmbox has no writable items).
pub const FW_CFG_WRITE_CHANNEL: u16 = 0x4000;
/// The selector bits that name the item.
const ENTRY_MASK: u16 = !(FW_CFG_WRITE_CHANNEL | FW_CFG_ARCH_LOCAL);
/// Longest file name, without its NUL.
pub const FILE_NAME_MAX: usize = 55;

/// FW_CFG_ID bits.
const ID_TRADITIONAL: u32 = 1;
const ID_DMA: u32 = 2;
/// What reading the DMA address register returns: "QEMU CFG".
const DMA_SIGNATURE: &[u8; 8] = b"QEMU CFG";
/// DMA control bits.
const DMA_CTL_ERROR: u32 = 0x01;
const DMA_CTL_READ: u32 = 0x02;
const DMA_CTL_SKIP: u32 = 0x04;
const DMA_CTL_SELECT: u32 = 0x08;
const DMA_CTL_WRITE: u32 = 0x10;
/// A DMA request in guest memory: control, length (big-endian u32s), address (big-endian u64).
const DMA_ACCESS_SIZE: usize = 16;
/// Zero-filling goes in chunks of this size.
const ZERO_CHUNK: usize = 4096;

/// Ports the selector/data range covers (selector 16-bit at +0, data at +1).
pub const FW_CFG_IO_LEN: u64 = 2;
/// Ports the DMA address register covers.
pub const FW_CFG_DMA_LEN: u64 = 8;

/// Errors building the item list.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FwCfgError {
    /// A file name that does not fit the directory entry.
    #[error("fw_cfg file name '{0}' is empty or longer than {FILE_NAME_MAX} bytes")]
    FileName(String),
    /// Two files with one name.
    #[error("fw_cfg file '{0}' added twice")]
    DuplicateFile(String),
    /// More files than selectors.
    #[error("fw_cfg has no selector left for file '{0}'")]
    TooManyFiles(String),
    /// An item larger than fw_cfg can describe (4 GiB).
    #[error("fw_cfg item {0:#x} is larger than 4 GiB")]
    TooLarge(u16),
}

/// The device's state as plain data: its items and where the guest is in reading them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FwCfgState {
    /// Numbered items by key (with [`FW_CFG_ARCH_LOCAL`] for x86 ones).
    pub items: BTreeMap<u16, Vec<u8>>,
    /// Named files, sorted by name; file `i` is selector [`FW_CFG_FILE_FIRST`] + i.
    pub files: Vec<(String, Vec<u8>)>,
    /// The selected key as the guest wrote it.
    pub selector: u16,
    /// Next byte of the selected item.
    pub offset: u32,
    /// The high half of the DMA address, written first.
    pub dma_addr_high: u32,
}

/// Facts about the machine fw_cfg reports (QEMU's PC items).
#[derive(Debug, Clone, Default)]
pub struct Machine {
    /// vCPUs at boot and at most.
    pub cpus: u16,
    /// Guest RAM in bytes.
    pub ram_size: u64,
    /// The memory map as (address, length, E820 type).
    pub e820: Vec<(u64, u64, u32)>,
    /// Where the kernel is loaded, `[start, end)`, and its entry point.
    pub kernel: Option<(u64, u64, u64)>,
    /// Where the initrd is, `[start, end)`.
    pub initrd: Option<(u64, u64)>,
    /// Where the command line is, and its text.
    pub cmdline: Option<(u64, String)>,
}

/// The fw_cfg device: its state and the guest memory DMA reaches.
pub struct FwCfg {
    state: FwCfgState,
    mem: GuestMemoryMmap,
    dma_base: u64,
}

impl FwCfg {
    /// A device with the signature, the ID (traditional + DMA) and an empty file directory. Its
    /// DMA register is the range inserted at `dma_base` on the port bus.
    pub fn new(mem: GuestMemoryMmap, dma_base: u64) -> Self {
        let mut d = FwCfg {
            state: FwCfgState::default(),
            mem,
            dma_base,
        };
        d.state.items.insert(FW_CFG_SIGNATURE, b"QEMU".to_vec());
        d.add_u32(FW_CFG_ID, ID_TRADITIONAL | ID_DMA);
        d.rebuild_dir();
        d
    }

    /// A device with QEMU's PC items for `m`: UUID (zero), RAM size, no graphics, CPU counts,
    /// boot menu off, IRQ0 override, the kernel/initrd/command-line items of a direct kernel
    /// boot, and the file `etc/e820`.
    pub fn with_machine(
        mem: GuestMemoryMmap,
        dma_base: u64,
        m: &Machine,
    ) -> Result<Self, FwCfgError> {
        let mut d = FwCfg::new(mem, dma_base);
        d.add_item(FW_CFG_UUID, vec![0; 16])?;
        d.add_u64(FW_CFG_RAM_SIZE, m.ram_size);
        d.add_u16(FW_CFG_NOGRAPHIC, 1);
        d.add_u16(FW_CFG_NB_CPUS, m.cpus);
        d.add_u16(FW_CFG_MAX_CPUS, m.cpus);
        d.add_u16(FW_CFG_BOOT_MENU, 0);
        d.add_u32(FW_CFG_IRQ0_OVERRIDE, 1);
        if let Some((start, end, entry)) = m.kernel {
            d.add_u32(FW_CFG_KERNEL_ADDR, start as u32);
            d.add_u32(FW_CFG_KERNEL_SIZE, (end - start) as u32);
            d.add_u32(FW_CFG_KERNEL_ENTRY, entry as u32);
        }
        if let Some((start, end)) = m.initrd {
            d.add_u32(FW_CFG_INITRD_ADDR, start as u32);
            d.add_u32(FW_CFG_INITRD_SIZE, (end - start) as u32);
        }
        if let Some((addr, text)) = &m.cmdline {
            let mut data = text.as_bytes().to_vec();
            data.push(0);
            d.add_u32(FW_CFG_KERNEL_CMDLINE, *addr as u32);
            d.add_u32(FW_CFG_CMDLINE_ADDR, *addr as u32);
            d.add_u32(FW_CFG_CMDLINE_SIZE, data.len() as u32);
            d.add_item(FW_CFG_CMDLINE_DATA, data)?;
        }
        let mut e820 = Vec::with_capacity(m.e820.len() * 20);
        for &(addr, len, kind) in &m.e820 {
            e820.extend_from_slice(&addr.to_le_bytes());
            e820.extend_from_slice(&len.to_le_bytes());
            e820.extend_from_slice(&kind.to_le_bytes());
        }
        d.add_file("etc/e820", e820)?;
        Ok(d)
    }

    /// The state as plain data.
    pub fn state(&self) -> &FwCfgState {
        &self.state
    }

    /// Set (or replace) numbered item `key`.
    pub fn add_item(&mut self, key: u16, data: Vec<u8>) -> Result<(), FwCfgError> {
        if u32::try_from(data.len()).is_err() {
            return Err(FwCfgError::TooLarge(key));
        }
        self.state.items.insert(key, data);
        Ok(())
    }

    /// A little-endian u16 item.
    pub fn add_u16(&mut self, key: u16, v: u16) {
        self.state.items.insert(key, v.to_le_bytes().to_vec());
    }

    /// A little-endian u32 item.
    pub fn add_u32(&mut self, key: u16, v: u32) {
        self.state.items.insert(key, v.to_le_bytes().to_vec());
    }

    /// A little-endian u64 item.
    pub fn add_u64(&mut self, key: u16, v: u64) {
        self.state.items.insert(key, v.to_le_bytes().to_vec());
    }

    /// Add a named file; the directory stays sorted by name (as QEMU keeps it), so selectors
    /// are final once every file is added. Returns the file's selector now.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<u16, FwCfgError> {
        if name.is_empty() || name.len() > FILE_NAME_MAX || name.contains('\0') {
            return Err(FwCfgError::FileName(name.into()));
        }
        if u32::try_from(data.len()).is_err() {
            return Err(FwCfgError::TooLarge(FW_CFG_FILE_FIRST));
        }
        let at = match self
            .state
            .files
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
        {
            Ok(_) => return Err(FwCfgError::DuplicateFile(name.into())),
            Err(i) => i,
        };
        if self.state.files.len() >= usize::from(ENTRY_MASK - FW_CFG_FILE_FIRST) {
            return Err(FwCfgError::TooManyFiles(name.into()));
        }
        self.state.files.insert(at, (name.to_string(), data));
        self.rebuild_dir();
        Ok(FW_CFG_FILE_FIRST + at as u16)
    }

    fn rebuild_dir(&mut self) {
        let files = &self.state.files;
        let mut dir = Vec::with_capacity(4 + files.len() * 64);
        dir.extend_from_slice(&(files.len() as u32).to_be_bytes());
        for (i, (name, data)) in files.iter().enumerate() {
            dir.extend_from_slice(&(data.len() as u32).to_be_bytes());
            dir.extend_from_slice(&(FW_CFG_FILE_FIRST + i as u16).to_be_bytes());
            dir.extend_from_slice(&0u16.to_be_bytes());
            let mut n = [0u8; 56];
            n[..name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&n);
        }
        self.state.items.insert(FW_CFG_FILE_DIR, dir);
    }

    /// The bytes of the selected item (none for an unknown key).
    fn current(&self) -> &[u8] {
        let key = self.state.selector & !FW_CFG_WRITE_CHANNEL;
        let index = key & ENTRY_MASK;
        if key & FW_CFG_ARCH_LOCAL == 0 && index >= FW_CFG_FILE_FIRST {
            return self
                .state
                .files
                .get(usize::from(index - FW_CFG_FILE_FIRST))
                .map_or(&[], |(_, d)| d.as_slice());
        }
        self.state.items.get(&key).map_or(&[], |d| d.as_slice())
    }

    fn select(&mut self, key: u16) {
        self.state.selector = key;
        self.state.offset = 0;
    }

    /// The next byte of the selected item; 0 past its end.
    fn read_byte(&mut self) -> u8 {
        let off = self.state.offset as usize;
        match self.current().get(off) {
            Some(&b) => {
                self.state.offset += 1;
                b
            }
            None => 0,
        }
    }

    /// Carry out the DMA request at guest-physical `addr` and write its status back.
    fn dma(&mut self, addr: u64) {
        let mut req = [0u8; DMA_ACCESS_SIZE];
        if self.mem.read_slice(&mut req, GuestAddress(addr)).is_err() {
            // Nowhere to report to: the request is not in RAM.
            return;
        }
        let control = u32::from_be_bytes([req[0], req[1], req[2], req[3]]);
        let length = u32::from_be_bytes([req[4], req[5], req[6], req[7]]);
        let mut target = u64::from_be_bytes([
            req[8], req[9], req[10], req[11], req[12], req[13], req[14], req[15],
        ]);
        if control & DMA_CTL_SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        let status = if control & DMA_CTL_READ != 0 {
            self.dma_read(&mut target, length)
        } else if control & DMA_CTL_WRITE != 0 {
            // No item is writable.
            DMA_CTL_ERROR
        } else if control & DMA_CTL_SKIP != 0 {
            let left = (self.current().len() as u64).saturating_sub(u64::from(self.state.offset));
            self.state.offset += left.min(u64::from(length)) as u32;
            0
        } else {
            0
        };
        // The status goes where the control word was; if that fails the guest gets nothing.
        let _ = self
            .mem
            .write_slice(&status.to_be_bytes(), GuestAddress(addr));
    }

    /// Copy up to `length` bytes of the selected item to guest memory at `*target`, then zeros
    /// for the rest; an address outside guest RAM (or wrapping) is an error.
    fn dma_read(&mut self, target: &mut u64, length: u32) -> u32 {
        let off = self.state.offset as usize;
        let item = self.current();
        let avail = item.len().saturating_sub(off);
        let n = avail.min(length as usize);
        if n > 0 {
            let data = item[off..off + n].to_vec();
            if target.checked_add(n as u64).is_none()
                || self.mem.write_slice(&data, GuestAddress(*target)).is_err()
            {
                return DMA_CTL_ERROR;
            }
            self.state.offset += n as u32;
            *target += n as u64;
        }
        let mut rest = length as usize - n;
        let zeros = [0u8; ZERO_CHUNK];
        while rest > 0 {
            let k = rest.min(ZERO_CHUNK);
            if target.checked_add(k as u64).is_none()
                || self
                    .mem
                    .write_slice(&zeros[..k], GuestAddress(*target))
                    .is_err()
            {
                return DMA_CTL_ERROR;
            }
            *target += k as u64;
            rest -= k;
        }
        0
    }
}

impl BusDevice for FwCfg {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        if base == self.dma_base {
            for (i, b) in data.iter_mut().enumerate() {
                *b = DMA_SIGNATURE.get(offset as usize + i).copied().unwrap_or(0);
            }
            return;
        }
        match (offset, data.len()) {
            // The data port: one byte of the item per byte read.
            (1, _) => data.iter_mut().for_each(|b| *b = self.read_byte()),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        if base == self.dma_base {
            match (offset, data.len()) {
                (0, 4) => {
                    self.state.dma_addr_high =
                        u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                }
                (4, 4) => {
                    let low = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                    let addr = (u64::from(self.state.dma_addr_high) << 32) | u64::from(low);
                    self.state.dma_addr_high = 0;
                    self.dma(addr);
                }
                (0, 8) => {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(data);
                    self.state.dma_addr_high = 0;
                    self.dma(u64::from_be_bytes(a));
                }
                _ => {}
            }
            return;
        }
        // A 16-bit write to the selector port selects; data-port writes are ignored (no item is
        // writable, as in QEMU since 2.4).
        if offset == 0 && data.len() == 2 {
            self.select(u16::from_le_bytes([data[0], data[1]]));
        }
    }
}

pub mod persist;
#[cfg(test)]
mod tests;
