//! Tracking: where the agent learns what the guests do. It loads the eBPF
//! programs ([`ebpf`]), reads their events and feeds them to the registry
//! ([`tracker`]), and finds VMs no event announced: KVM VMs that started
//! before the agent, and QEMU guests without KVM whose RAM is shared memory
//! ([`qemu_guests`]). All I/O of the core happens here; the registry it
//! feeds is a pure state machine.

pub mod ebpf;
pub mod qemu_guests;
pub mod tracker;
