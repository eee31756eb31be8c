//! Types shared by the eBPF programs (`agent-ebpf`) and the agent.
//!
//! Every type is `#[repr(C)]` with explicit padding so that the kernel side and
//! user space agree on the layout byte for byte.
//!
//! Kernel events ([`event`]) are built by the eBPF programs only through
//! [`Event`]'s constructors and read by user space only by decoding them into
//! a [`KernelEvent`]; their fields are private, so what each word of an event
//! means is written once. An ioctl followed from entry to exit is a
//! [`PendingIoctl`] ([`pending`]), which makes its event at exit.
#![no_std]

pub mod bitmap;
pub mod event;
pub mod pending;

pub use bitmap::{BitmapChunk, BitmapHead, BitmapOf, DirtyBitmap};
pub use event::{DecodeError, Event, EventKind, KernelEvent, SlotRegion};
pub use pending::{BitmapCopy, PendingIoctl};

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
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` flags in `args[0]`.
    pub const KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: u64 = 1;
    pub const KVM_DIRTY_LOG_INITIALLY_SET: u64 = 2;
    pub const KVM_CAP_DIRTY_LOG_RING: u32 = 192;
    pub const KVM_CAP_DIRTY_LOG_RING_ACQ_REL: u32 = 223;

    /// Memory-slot flag: dirty logging enabled for the slot.
    pub const KVM_MEM_LOG_DIRTY_PAGES: u32 = 1;
    /// Memory-slot flag: the guest cannot write the slot.
    pub const KVM_MEM_READONLY: u32 = 2;
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
/// and given to the programs as the read-only global `TRACE_OFFSETS` before
/// they load (so the verifier knows them as constants, and no program looks
/// them up in a map).
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

impl TraceOffsets {
    /// All zero, not ready: the globals' value in the object file.
    pub const UNSET: Self = Self {
        ring_push_index: 0,
        ring_push_dirty_index: 0,
        ring_push_slot: 0,
        ring_push_offset: 0,
        ring_reset_index: 0,
        ring_reset_dirty_index: 0,
        ring_reset_reset_index: 0,
        ioctl_enter_fd: 0,
        ioctl_enter_cmd: 0,
        ioctl_enter_arg: 0,
        ioctl_exit_ret: 0,
        page_fault_address: 0,
        page_fault_error_code: 0,
        process_exit_group_dead: 0,
        _pad: 0,
        ready: 0,
    };
}

/// Where `struct kvm_dirty_ring`'s indexes are (byte offsets, from the
/// kernel's BTF): the BTF-typed and raw dirty-ring-push programs read them
/// from the ring the tracepoint is given, so the kernel formats no trace
/// record for the hottest event. The read-only global `RING_LAYOUT`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingLayout {
    /// `dirty_index`: the next entry's index (already moved past the new one
    /// when the tracepoint fires).
    pub dirty_index: u32,
    /// `index`: the ring's (the vCPU's) number.
    pub index: u32,
}

impl RingLayout {
    /// Bytes of the ring the raw program reads at once (one helper call);
    /// it is attached only if both indexes are within them.
    pub const HEAD_BYTES: usize = 32;

    /// Unknown: the programs that need it are not attached.
    pub const UNSET: Self = Self {
        dirty_index: 0,
        index: 0,
    };
}

#[cfg(feature = "user")]
mod user {
    use super::{BitmapChunk, Event, LossRecord, PendingIoctl, RingLayout, TraceOffsets};
    // SAFETY: all of them are repr(C) structs of integers with no implicit padding
    // (checked by the size tests below), so every byte pattern is valid.
    unsafe impl aya::Pod for Event {}
    // SAFETY: as above.
    unsafe impl aya::Pod for LossRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TraceOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RingLayout {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PendingIoctl {}
    // SAFETY: as above; bytemuck's requirements are the same as aya's.
    unsafe impl bytemuck::Zeroable for Event {}
    // SAFETY: as above.
    unsafe impl bytemuck::Pod for Event {}
    // SAFETY: as above (a head of integers, then u64 words).
    unsafe impl bytemuck::Zeroable for BitmapChunk {}
    // SAFETY: as above.
    unsafe impl bytemuck::Pod for BitmapChunk {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        // kind, pid, ktime_ns, 4 × u32, 3 × u64.
        assert_eq!(size_of::<Event>(), 4 + 4 + 8 + 4 * 4 + 3 * 8);
        assert_eq!(size_of::<EventKind>(), 4);
        assert_eq!(size_of::<SlotRegion>(), 2 * 4 + 3 * 8);
        assert_eq!(size_of::<LossRecord>(), 16);
        assert_eq!(size_of::<TraceOffsets>(), 16 * 4);
        assert_eq!(size_of::<RingLayout>(), 2 * 4);
        // kind, fd, 2 × u32, enter_ns, 3 × u64.
        assert_eq!(size_of::<PendingIoctl>(), 4 * 4 + 4 * 8);
        // kind, pid, enter_ns, slot, ioctl, first_page, pages, pad; the words.
        assert_eq!(size_of::<BitmapHead>(), 4 + 4 + 8 + 4 + 4 + 8 + 4 + 4);
        assert_eq!(
            size_of::<BitmapChunk>(),
            size_of::<BitmapHead>() + 8 * bitmap::BITMAP_CHUNK_WORDS
        );
    }

    #[cfg(feature = "user")]
    #[test]
    fn event_round_trips_through_bytes() {
        let event = Event::slot_set(
            42,
            99,
            7,
            SlotRegion {
                slot: (1 << 16) | 3,
                flags: 1,
                gpa: 0x1234_0000,
                size: 4096,
                uaddr: 0x7f00_0000_0000,
            },
        );
        let bytes = bytemuck::bytes_of(&event);
        assert_eq!(bytes.len(), size_of::<Event>());
        let back: Event = bytemuck::pod_read_unaligned(bytes);
        assert_eq!(back, event);
        assert_eq!(KernelEvent::try_from(&back), KernelEvent::try_from(&event));
    }

    #[cfg(feature = "user")]
    #[test]
    fn the_wire_header_is_kind_pid_time() {
        let event = Event::dirty_gfn(0x0102_0304, 0x1122_3344_5566_7788, 9);
        let bytes = bytemuck::bytes_of(&event);
        assert_eq!(bytes[0..4], EventKind::DIRTY_GFN.raw().to_ne_bytes());
        assert_eq!(bytes[4..8], 0x0102_0304u32.to_ne_bytes());
        assert_eq!(bytes[8..16], 0x1122_3344_5566_7788u64.to_ne_bytes());
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
