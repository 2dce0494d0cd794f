//! The x86-64 PC a kvmbox guest sees: where things live in guest-physical memory
//! ([`layout`]), and how a kernel is loaded and started.

pub mod layout;
