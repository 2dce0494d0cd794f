//! kvmbox PCI host bridge, configuration space, BARs and MSI-X.
