//! Types shared by the eBPF programs (`agent-ebpf`) and the agent.
//!
//! Every type is `#[repr(C)]` with explicit padding so that the kernel side and
//! user space agree on the layout byte for byte.
#![no_std]

/// KVM ioctl numbers the eBPF programs watch (from `linux/kvm.h`, x86_64).
pub mod ioctl {
    /// `_IO(KVMIO, 0x01)`: returns a VM fd.
    pub const KVM_CREATE_VM: u32 = 0xae01;
    /// `_IOW(KVMIO, 0x46, struct kvm_userspace_memory_region)`.
    pub const KVM_SET_USER_MEMORY_REGION: u32 = 0x4020_ae46;
    /// `_IOW(KVMIO, 0x49, struct kvm_userspace_memory_region2)`.
    pub const KVM_SET_USER_MEMORY_REGION2: u32 = 0x40a0_ae49;
    /// `_IOW(KVMIO, 0xa3, struct kvm_enable_cap)`.
    pub const KVM_ENABLE_CAP: u32 = 0x4068_aea3;
    /// `_IOW(KVMIO, 0x42, struct kvm_dirty_log)`.
    pub const KVM_GET_DIRTY_LOG: u32 = 0x4010_ae42;
    /// `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`.
    pub const KVM_CLEAR_DIRTY_LOG: u32 = 0xc018_aec0;
    /// `_IO(KVMIO, 0xc7)`.
    pub const KVM_RESET_DIRTY_RINGS: u32 = 0xaec7;

    pub const KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: u32 = 168;
    pub const KVM_CAP_DIRTY_LOG_RING: u32 = 192;
    pub const KVM_CAP_DIRTY_LOG_RING_ACQ_REL: u32 = 223;

    /// Memory-slot flag: dirty logging enabled for the slot.
    pub const KVM_MEM_LOG_DIRTY_PAGES: u32 = 1;
    /// Memory-slot flag: the guest cannot write the slot.
    pub const KVM_MEM_READONLY: u32 = 2;
}

/// What an [`Event`] reports. Stored as `u32` in the event.
pub mod kind {
    /// `KVM_CREATE_VM` returned `fd` in process `pid`.
    pub const VM_CREATED: u32 = 1;
    /// A memory slot was set: `slot`, `flags`, `addr` = guest physical address,
    /// `size` = bytes (0 deletes the slot), `uaddr` = userspace address.
    pub const SLOT_SET: u32 = 2;
    /// `KVM_ENABLE_CAP` succeeded: `slot` = capability, `addr` = args\[0\].
    pub const CAP_ENABLED: u32 = 3;
    /// `kvm:kvm_dirty_ring_push`: `ring` = vCPU ring, `seq` = entry index,
    /// `slot` = as_id<<16 | slot id, `addr` = page offset inside the slot.
    pub const DIRTY_RING_PUSH: u32 = 4;
    /// `kvm:kvm_dirty_ring_reset`: `ring`, `seq` = reset index (entries below
    /// it are write-protected again), `addr` = dirty index at that moment.
    pub const DIRTY_RING_RESET: u32 = 5;
    /// `KVM_RESET_DIRTY_RINGS` started on VM fd `fd`.
    pub const RESET_RINGS_BEGIN: u32 = 6;
    /// `KVM_RESET_DIRTY_RINGS` returned: every ring's reset event came before.
    pub const RESET_RINGS_END: u32 = 7;
    /// `KVM_GET_DIRTY_LOG` returned 0 for `slot`: re-protection point of the
    /// bitmap (unless manual protection is enabled).
    pub const DIRTY_LOG_GET: u32 = 8;
    /// `KVM_CLEAR_DIRTY_LOG` returned 0 for `slot`, pages `addr`..`addr+size`.
    pub const DIRTY_LOG_CLEAR: u32 = 9;
    /// `mark_page_dirty_in_slot` (fentry): `addr` = guest frame number.
    pub const DIRTY_GFN: u32 = 10;
    /// A write fault on `addr` = guest physical address (`kvm:kvm_page_fault`).
    pub const WRITE_FAULT: u32 = 11;
    /// The process `pid` exited (its last thread).
    pub const PROCESS_EXIT: u32 = 12;
}

/// One event from the kernel, delivered through the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// One of [`kind`].
    pub kind: u32,
    /// Process id (thread group id) of the VMM.
    pub pid: u32,
    /// The VM file descriptor, where known.
    pub fd: u32,
    /// Memory slot (as_id << 16 | slot id) or capability number.
    pub slot: u32,
    /// Slot flags.
    pub flags: u32,
    /// Dirty-ring index (the vCPU's ring).
    pub ring: u32,
    /// Ring entry index or reset index.
    pub seq: u32,
    /// Explicit padding; always 0.
    pub _pad: u32,
    /// Guest physical address, page offset, frame number or page index.
    pub addr: u64,
    /// Size in bytes or pages.
    pub size: u64,
    /// Userspace address of a slot.
    pub uaddr: u64,
    /// `bpf_ktime_get_ns()` when the event was made.
    pub ktime_ns: u64,
}

/// Per-process count of events that could not be delivered (ring buffer full).
/// Key: pid. The last loss time lets user space order losses with events.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LossRecord {
    pub count: u64,
    pub last_ktime_ns: u64,
}

/// Tracepoint field offsets, read by user space from the tracefs format files
/// and written into the `CONFIG` array map before the programs attach.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceOffsets {
    pub ring_push_index: u32,
    pub ring_push_dirty_index: u32,
    pub ring_push_slot: u32,
    pub ring_push_offset: u32,
    pub ring_reset_index: u32,
    pub ring_reset_dirty_index: u32,
    pub ring_reset_reset_index: u32,
    pub ioctl_enter_fd: u32,
    pub ioctl_enter_cmd: u32,
    pub ioctl_enter_arg: u32,
    pub ioctl_exit_ret: u32,
    pub page_fault_address: u32,
    pub page_fault_error_code: u32,
    pub process_exit_group_dead: u32,
    /// Explicit padding; always 0.
    pub _pad: u32,
    /// 1 once user space has filled this struct; programs do nothing before.
    pub ready: u32,
}

/// An ioctl seen at `sys_enter_ioctl`, kept per thread until `sys_exit_ioctl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingIoctl {
    pub cmd: u32,
    pub fd: u32,
    pub slot: u32,
    pub flags: u32,
    pub addr: u64,
    pub size: u64,
    pub uaddr: u64,
}

#[cfg(feature = "user")]
mod user {
    use super::{Event, LossRecord, PendingIoctl, TraceOffsets};
    // SAFETY: all four are repr(C) structs of integers with no implicit padding
    // (checked by the size tests below), so every byte pattern is valid.
    unsafe impl aya::Pod for Event {}
    // SAFETY: as above.
    unsafe impl aya::Pod for LossRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TraceOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PendingIoctl {}
    // SAFETY: as above; bytemuck's requirements are the same as aya's.
    unsafe impl bytemuck::Zeroable for Event {}
    // SAFETY: as above.
    unsafe impl bytemuck::Pod for Event {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Event>(), 8 * 4 + 4 * 8);
        assert_eq!(size_of::<LossRecord>(), 16);
        assert_eq!(size_of::<TraceOffsets>(), 16 * 4);
        assert_eq!(size_of::<PendingIoctl>(), 4 * 4 + 3 * 8);
    }

    #[cfg(feature = "user")]
    #[test]
    fn event_round_trips_through_bytes() {
        let event = Event {
            kind: kind::DIRTY_RING_PUSH,
            pid: 42,
            fd: 7,
            slot: (1 << 16) | 3,
            flags: 1,
            ring: 2,
            seq: 0xffff_fffe,
            _pad: 0,
            addr: 0x1234,
            size: 4096,
            uaddr: 0x7f00_0000_0000,
            ktime_ns: 99,
        };
        let bytes = bytemuck::bytes_of(&event);
        let back: Event = bytemuck::pod_read_unaligned(bytes);
        assert_eq!(back, event);
    }

    #[test]
    fn ioctl_numbers_match_their_encoding() {
        const fn iow(nr: u32, size: u32) -> u32 {
            (1 << 30) | (size << 16) | (0xae << 8) | nr
        }
        assert_eq!(ioctl::KVM_SET_USER_MEMORY_REGION, iow(0x46, 32));
        assert_eq!(ioctl::KVM_SET_USER_MEMORY_REGION2, iow(0x49, 160));
        assert_eq!(ioctl::KVM_ENABLE_CAP, iow(0xa3, 104));
        assert_eq!(ioctl::KVM_GET_DIRTY_LOG, iow(0x42, 16));
        assert_eq!(
            ioctl::KVM_CLEAR_DIRTY_LOG,
            (3 << 30) | (24 << 16) | (0xae << 8) | 0xc0
        );
    }
}
