//! kvmbox virtio transports (PCI, MMIO) and devices (block, net, rng).
