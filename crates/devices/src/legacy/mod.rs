//! PC platform devices: serial port, i8042, debug-exit port, ACPI power management.
