//! kvmbox interrupt controllers (local APIC, IOAPIC, 8259 PIC) for the software engine.
