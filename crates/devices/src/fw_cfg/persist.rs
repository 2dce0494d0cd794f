//! Loading a saved [`FwCfgState`] (saving is [`FwCfg::state`]): the items and files go back
//! through the same checks as when the machine was built, so a damaged state is refused
//! whole, and a guest in the middle of reading an item continues where it was.

use super::*;

impl FwCfg {
    /// Replace the device's items, files and read position with `s`. Checked whole first:
    /// on an error nothing changes.
    pub fn restore_state(&mut self, s: &FwCfgState) -> Result<(), FwCfgError> {
        let mut d = FwCfg::new(self.mem.clone(), self.dma_base);
        for (&key, data) in &s.items {
            // The directory is rebuilt from the files.
            if key != FW_CFG_FILE_DIR {
                d.add_item(key, data.clone())?;
            }
        }
        for (name, data) in &s.files {
            d.add_file(name, data.clone())?;
        }
        d.state.selector = s.selector;
        d.state.offset = s.offset;
        d.state.dma_addr_high = s.dma_addr_high;
        self.state = d.state;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn a_restored_device_continues_a_half_read_item_and_refuses_bad_files() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let m = Machine {
            cpus: 2,
            ram_size: 0x10000,
            cmdline: Some((0x2000, "console=ttyS0".into())),
            ..Default::default()
        };
        let mut a = FwCfg::with_machine(mem.clone(), 0x514, &m).unwrap();
        a.add_file("opt/kvmbox/x", b"hello".to_vec()).unwrap();
        // The guest has read "QE" of the signature "QEMU".
        a.write(0x510, 0, &FW_CFG_SIGNATURE.to_le_bytes());
        let mut two = [0u8; 2];
        a.read(0x510, 1, &mut two);
        assert_eq!(&two, b"QE");
        let mut b = FwCfg::new(mem.clone(), 0x514);
        b.restore_state(a.state()).unwrap();
        assert_eq!(b.state(), a.state());
        b.read(0x510, 1, &mut two);
        assert_eq!(&two, b"MU");

        let mut bad = a.state().clone();
        bad.files.push(("opt/kvmbox/x".into(), vec![]));
        let mut c = FwCfg::new(mem, 0x514);
        let before = c.state().clone();
        assert_eq!(
            c.restore_state(&bad),
            Err(FwCfgError::DuplicateFile("opt/kvmbox/x".into()))
        );
        assert_eq!(c.state(), &before, "a refused state changes nothing");
        bad.files.pop();
        bad.files.push(("x".repeat(80), vec![]));
        assert!(c.restore_state(&bad).is_err());
    }
}
